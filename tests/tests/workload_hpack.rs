//! HTTP/2 attacks on the real agent's Workload API socket: an HPACK expansion bomb, a huge
//! dynamic-table size update and an oversized frame. Each must close only the attacker's
//! connection, cost the agent no memory in proportion to the attacker's multiplier, and leave
//! py-spiffe served before and after.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use continuity_tests::agent::TestAgent;
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::uid;

const ALIAS: &str = "spiffe://example.org/node/hpack";
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// py-spiffe's SPIFFE IDs for this process (it must get its SVID).
fn py_spiffe_ids(agent: &TestAgent) -> String {
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/list_ids.py"))
        .arg(agent.endpoint())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "py-spiffe failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Peak resident memory of a process, in KiB (/proc/<pid>/status VmHWM).
fn peak_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// An HPACK integer with a `prefix`-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, mut value: usize, prefix: u8, mask: u8) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(mask | value as u8);
        return;
    }
    out.push(mask | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block split into HEADERS + CONTINUATION frames of 16,384 bytes (legal sizes).
fn header_frames(block: &[u8]) -> Vec<u8> {
    let chunks: Vec<&[u8]> = block.chunks(16_384).collect();
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let kind = if i == 0 { 0x1 } else { 0x9 };
        let flags = if i + 1 == chunks.len() { 0x4 } else { 0 };
        out.extend(frame(kind, flags, 1, c));
    }
    out
}

/// The bomb of the review: a ~4 KB literal entered into the dynamic table, then `refs`
/// one-byte references to it (250,000 of them decode to ~1 GB without a budget).
fn bomb(refs: usize) -> Vec<u8> {
    let mut block = vec![0x82, 0x87, 0x84]; // :method GET, :scheme https, :path /
    block.push(0x40); // literal with incremental indexing, new name
    hpack_int(&mut block, 1, 7, 0);
    block.push(b'x');
    hpack_int(&mut block, 4000, 7, 0);
    block.extend(std::iter::repeat_n(b'a', 4000));
    block.extend(std::iter::repeat_n(0xbe, refs)); // index 62: that entry
    block
}

/// Sends `bytes` after the preface and an empty SETTINGS, then reads until the agent closes
/// the connection (EOF or reset). Panics if it is still open after 20 s.
fn attack(agent: &TestAgent, bytes: &[u8]) {
    let mut s = UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend_from_slice(bytes);
    // The agent may close before everything is written: a broken pipe is a fine answer.
    let _ = s.write_all(&out);
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the agent kept the attacking connection open: {e}"),
        }
    }
}

#[test]
fn http2_attacks_close_the_connection_and_cost_no_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    let token = server.token(Some(ALIAS));
    let agent = TestAgent::start(&dir.path().join("agent"), &server, &token);
    server.create_entry(
        "spiffe://example.org/hpack",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    let start = std::time::Instant::now();
    let ids = loop {
        let out = agent.cli(&["api", "fetch", "x509"]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no SVID");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(ids.contains("spiffe://example.org/hpack"), "{ids}");
    assert_eq!(py_spiffe_ids(&agent), "spiffe://example.org/hpack");

    let pid = agent.pid().unwrap();
    let before = agent.rss_kib().unwrap();

    // The full bomb (250,000 references, legal frame sizes) and a smaller one that fits in one
    // header block of 16 KiB, several times over.
    attack(&agent, &header_frames(&bomb(250_000)));
    for _ in 0..4 {
        attack(&agent, &header_frames(&bomb(12_000)));
    }
    // A dynamic-table size update to 2^27, then fields that would fill it.
    let mut update = Vec::new();
    hpack_int(&mut update, 1 << 27, 5, 0x20);
    update.extend_from_slice(&bomb(12_000)[3..]);
    attack(&agent, &header_frames(&update));
    // A 16 MiB HEADERS frame, announced and sent.
    let mut huge = frame(0x1, 0x4, 1, &[]);
    huge[..3].copy_from_slice(&[0xff, 0xff, 0xff]);
    huge.extend(std::iter::repeat_n(0u8, 4 << 20));
    attack(&agent, &huge);

    // Peak resident memory, not just the current one: nothing may have ballooned and shrunk.
    let peak = peak_kib(pid);
    assert!(
        peak < before + 50 * 1024,
        "agent RSS was {before} KiB, peaked at {peak} KiB"
    );
    assert_eq!(py_spiffe_ids(&agent), "spiffe://example.org/hpack");
    let log = agent.log();
    assert!(
        log.contains("broke the HTTP/2 limits"),
        "each closed connection is logged:\n{log}"
    );
}
