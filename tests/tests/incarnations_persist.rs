//! Incarnation reports survive: the server records the Engine calls it serves itself, and the
//! agent journals what it still owes the server in its data_dir (kill -9, a server outage,
//! and a torn journal tail lose nothing that was written whole).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use continuity_tests::agent::TestAgent;
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::{bin, uid};

const ALIAS: &str = "spiffe://example.org/node/incarnations";

/// Agents sync only at start here: a report is delivered by a restart, never by a timely
/// sync that would hide a lost one.
const SLOW_SYNC: &str = "sync_interval = \"1h\"\n";

fn wait_for<F: FnMut() -> bool>(secs: u64, what: &str, mut f: F) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server with a transit Engine `orders` (signing key) bound to this uid on `ALIAS`, and an
/// agent that has its JWKS cached.
fn setup(dir: &Path) -> (TestServer, TestAgent) {
    let s = TestServer::start(&dir.join("server"), ServerOptions::default());
    s.cli_ok(&[
        "engine",
        "create",
        "orders",
        "--tier",
        "2",
        "--custody",
        "transit",
    ]);
    s.cli_ok(&[
        "engine",
        "key",
        "create",
        "orders",
        "signing",
        "--purpose",
        "sign",
    ]);
    s.create_entry_with_engine(ALIAS, &format!("unix:uid:{}", uid()), "orders");
    let agent = TestAgent::start_with(&dir.join("agent"), &s, &s.token(Some(ALIAS)), SLOW_SYNC);
    wait_for(20, "Engine JWKS cached", || {
        String::from_utf8_lossy(&agent.cli(&["engine", "jwks"]).stdout).contains("signing-v1")
    });
    (s, agent)
}

/// Runs an agent client command; returns the pid it ran as (its workload's pid) and its output.
fn run_with_pid(agent: &TestAgent, args: &[&str]) -> (u32, Output) {
    let child = Command::new(bin("continuity-agent"))
        .args(&args[..2])
        .arg("--socket-path")
        .arg(&agent.socket)
        .args(&args[2..])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    (pid, child.wait_with_output().unwrap())
}

/// A local Engine use (Verify, answered from the cached JWKS): works with the server down.
fn verify(agent: &TestAgent) -> u32 {
    let msg = agent.dir.join("msg.txt");
    std::fs::write(&msg, "order 7").unwrap();
    let sig = agent.dir.join("sig.bin");
    std::fs::write(&sig, b"not a signature").unwrap();
    let (pid, out) = run_with_pid(
        agent,
        &[
            "engine",
            "verify",
            "--key",
            "signing",
            "--message-file",
            msg.to_str().unwrap(),
            "--signature-file",
            sig.to_str().unwrap(),
        ],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("not valid") || text.contains("invalid") || !out.status.success(),
        "{text}"
    );
    pid
}

/// The pids of the workloads `engine incarnations orders` lists.
fn incarnation_pids(s: &TestServer) -> Vec<u64> {
    let out = s.cli_ok(&["engine", "incarnations", "orders", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["incarnations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_u64().unwrap())
        .collect()
}

fn journal(agent: &TestAgent) -> PathBuf {
    agent.dir.join("data").join("incarnations.journal")
}

#[test]
fn a_sign_just_before_an_agent_kill_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let (s, mut agent) = setup(dir.path());
    let msg = agent.dir.join("m.txt");
    std::fs::write(&msg, "pay 10").unwrap();
    let (pid, out) = run_with_pid(
        &agent,
        &[
            "engine",
            "sign",
            "--key",
            "signing",
            "--message-file",
            msg.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SIGKILL right after the use, before any sync could report it.
    agent.stop();
    wait_for(10, "the sign is listed in engine incarnations", || {
        incarnation_pids(&s).contains(&u64::from(pid))
    });
    // And it is still listed once the agent is back (its report, if any, only refreshes it).
    agent.spawn();
    assert!(incarnation_pids(&s).contains(&u64::from(pid)));
}

#[test]
fn a_use_while_the_server_is_down_is_delivered_after_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, mut agent) = setup(dir.path());
    s.stop();
    let pid = verify(&agent);
    // Persisted at once, 0600.
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(journal(&agent)).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(meta.len() > 0, "the report is in the journal");
    agent.stop();
    s.spawn();
    agent.spawn();
    wait_for(20, "the use during the outage is listed", || {
        incarnation_pids(&s).contains(&u64::from(pid))
    });
    // Acknowledged reports leave the journal.
    wait_for(10, "journal removed after the server acknowledged", || {
        !journal(&agent).exists()
    });
}

#[test]
fn a_torn_journal_tail_is_dropped_and_earlier_reports_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, mut agent) = setup(dir.path());
    s.stop();
    let first = verify(&agent);
    let second = verify(&agent);
    agent.stop();
    // A crash in the middle of an append: half a line, no newline.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(journal(&agent))
        .unwrap();
    f.write_all(b"0123456789abcdef CgVvcmRlc").unwrap();
    drop(f);
    s.spawn();
    agent.spawn();
    wait_for(20, "both earlier reports are listed", || {
        let pids = incarnation_pids(&s);
        pids.contains(&u64::from(first)) && pids.contains(&u64::from(second))
    });
    assert!(
        agent.log().contains("dropped damaged records"),
        "the torn tail is reported: {}",
        agent.log()
    );
}
