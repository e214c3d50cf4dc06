//! Exhaustion by workloads, against the real agent and server: floods of idle connections,
//! of distinct JWT-SVID audiences and of EngineAPI calls are bounded by `[workload_api]`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use continuity_proto::engine::engine_api_client::EngineApiClient;
use continuity_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use continuity_proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest, X509svidRequest};
use continuity_tests::agent::TestAgent;
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::{fetch_x509, uid, with_header};
use tonic::Code;

const ALIAS: &str = "spiffe://example.org/node/limits";
const NOBODY: u32 = 65534;

struct Env {
    _dir: tempfile::TempDir,
    server: TestServer,
    agent: TestAgent,
    metrics_port: u16,
}

/// A server (with metrics) and an agent with `workload_api` as its `[workload_api]` table; an
/// entry for this uid.
async fn env(workload_api: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = continuity_tests::free_port();
    let opts = ServerOptions {
        extra_toml: format!("[metrics]\nbind_address = \"127.0.0.1:{metrics_port}\"\n"),
        ..Default::default()
    };
    let server = TestServer::start(&dir.path().join("server"), opts);
    server.create_entry(
        "spiffe://example.org/victim",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    let token = server.token(Some(ALIAS));
    let agent = TestAgent::start_with(
        &dir.path().join("agent"),
        &server,
        &token,
        &format!("[workload_api]\n{workload_api}"),
    );
    let e = Env {
        _dir: dir,
        server,
        agent,
        metrics_port,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while fetch_x509(&e.agent).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "no SVID; log:\n{}",
            e.agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    e
}

async fn channel(agent: &TestAgent) -> tonic::transport::Channel {
    continuity_common::grpc::uds_channel(&agent.socket)
        .await
        .unwrap()
}

/// Raises this process's (and so its children's) open-files limit.
fn raise_nofile() {
    let _ = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            "--nofile=65536:65536",
        ])
        .status();
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        soft >= 5000,
        "open-files limit {soft} too low for this test"
    );
}

/// py-spiffe, unmodified: seconds it took to get an X.509-SVID on a fresh connection.
fn py_spiffe_fetch_secs(agent: &TestAgent) -> f64 {
    let script = "import json, sys, time\nfrom spiffe import WorkloadApiClient\nt = time.monotonic()\nwith WorkloadApiClient(sys.argv[1]) as c:\n    svid = c.fetch_x509_svid()\nprint(json.dumps({'id': str(svid.spiffe_id), 'secs': time.monotonic() - t}))\n";
    let out = Command::new("python3")
        .args(["-c", script, &agent.endpoint()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "py-spiffe failed:\n{}\n{}\nagent log tail:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&agent.log())
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["id"], "spiffe://example.org/victim");
    v["secs"].as_f64().unwrap()
}

fn tail(log: &str) -> String {
    let lines: Vec<_> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Helper run as another process (and uid) by the idle-connection test: opens HOLD_COUNT raw
/// connections that never send a byte, prints `CONNECTED`, then reads each until EOF and
/// prints `EOF <closed> <ms since CONNECTED, one per closed connection...>`.
#[test]
#[ignore = "helper: run by idle_connections_never_lock_out_a_client_and_are_closed"]
fn hold_idle_connections() {
    let socket = std::env::var("HOLD_SOCKET").unwrap();
    let count: usize = std::env::var("HOLD_COUNT").unwrap().parse().unwrap();
    let wait = Duration::from_secs(std::env::var("HOLD_SECS").unwrap().parse().unwrap());
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        // Blocking connect: waits for backlog room instead of failing.
        let s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.set_nonblocking(true).unwrap();
        streams.push(s);
    }
    println!("CONNECTED {}", streams.len());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let times = rt.block_on(async move {
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for s in streams {
            tasks.push(tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut s = tokio::net::UnixStream::from_std(s).unwrap();
                let mut buf = [0u8; 512];
                // The agent may send its SETTINGS first: read until EOF (or an error).
                let read = async {
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                };
                tokio::time::timeout_at(start + wait, read)
                    .await
                    .ok()
                    .map(|()| start.elapsed().as_millis())
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            if let Some(ms) = t.await.unwrap() {
                times.push(ms);
            }
        }
        times
    });
    let list: Vec<String> = times.iter().map(u128::to_string).collect();
    println!("EOF {} {}", times.len(), list.join(" "));
}

/// A running `hold_idle_connections` helper.
struct Holder {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Holder {
    /// Starts the helper as `uid` and waits until its connections are open.
    fn start(uid: u32, agent: &TestAgent, count: usize, secs: u64) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "hold_idle_connections",
                "--ignored",
                "--nocapture",
            ])
            .env("HOLD_SOCKET", &agent.socket)
            .env("HOLD_COUNT", count.to_string())
            .env("HOLD_SECS", secs.to_string())
            .uid(uid)
            .gid(uid)
            .current_dir("/")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let connected = lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.starts_with("CONNECTED"))
            .expect("helper connected");
        assert_eq!(connected, format!("CONNECTED {count}"));
        Self { child, lines }
    }

    /// Waits for the helper's report: ms after all were open at which each connection closed.
    fn closed_at(mut self) -> Vec<u64> {
        let line = self
            .lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.starts_with("EOF "))
            .expect("helper report");
        let _ = self.child.wait();
        line.split_whitespace()
            .skip(2)
            .map(|v| v.parse().unwrap())
            .collect()
    }
}

#[tokio::test]
async fn idle_connections_never_lock_out_a_client_and_are_closed() {
    assert_eq!(uid(), 0, "opens connections as other uids: needs root");
    raise_nofile();
    let idle_ms = 2_000;
    let e =
        env("idle_timeout = \"2s\"\nmax_connections = 300\nmax_connections_per_uid = 200\n").await;
    let agent = &e.agent;

    // Phase 1: 2,000 idle connections from another uid.
    let flood = Holder::start(NOBODY, agent, 2000, 15);
    let secs = py_spiffe_fetch_secs(agent);
    assert!(
        secs < 1.0,
        "SVID took {secs:.2}s behind 2,000 idle connections"
    );
    let closed = flood.closed_at();
    assert_eq!(closed.len(), 2000, "every idle connection is closed");
    // Those the agent kept (up to the per-uid cap) were closed by the idle timeout.
    let by_timeout = closed.iter().filter(|&&ms| ms >= idle_ms - 700).count();
    assert!(by_timeout >= 100, "{by_timeout} closed at the idle timeout");
    assert!(closed.iter().all(|&ms| ms < idle_ms + 3_000), "{closed:?}");

    // Phase 2: the victim's own uid floods, after another uid took half the total cap.
    let others = Holder::start(NOBODY, agent, 150, 15);
    let own = Holder::start(uid(), agent, 2000, 15);
    let secs = py_spiffe_fetch_secs(agent);
    assert!(
        secs < 1.0,
        "SVID took {secs:.2}s behind 2,000 idle connections of its uid"
    );
    let (others, own) = (others.closed_at(), own.closed_at());
    assert_eq!(own.len(), 2000);
    assert_eq!(others.len(), 150);
    // The total cap (300) closed the oldest idle connections — the other uid's — early.
    let evicted = others.iter().filter(|&&ms| ms < idle_ms - 700).count();
    assert!(
        evicted >= 40,
        "{evicted} of the other uid's connections evicted: {others:?}"
    );
    // And the agent still serves.
    fetch_x509(agent).await.unwrap();
    assert!(agent.log().contains("RLIMIT_NOFILE"));
}

/// The server's count of JWT-SVIDs signed.
fn jwt_svids_signed(port: u16) -> u64 {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("continuity_server_jwt_svids_signed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no JWT-SVID counter in {s}"))
}

#[tokio::test]
async fn a_flood_of_distinct_audiences_is_bounded_in_memory_and_at_the_server() {
    // A small cache, so that even the few calls the rate limit lets through overflow it.
    let (rate, burst) = (5.0, 20.0);
    let e =
        env("jwt_cache_size = 10\nserver_calls_per_second = 5\nserver_calls_burst = 20\n").await;
    let rss_before = e.agent.rss_kib().unwrap();
    let signed_before = jwt_svids_signed(e.metrics_port);
    let (ok, exhausted) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let mut c = SpiffeWorkloadApiClient::new(channel(&e.agent).await);
        let (ok, exhausted, next) = (ok.clone(), exhausted.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= 10_000 {
                    break;
                }
                // 16 audiences of 250 bytes: the most a request may carry, all distinct.
                let audience = (0..16)
                    .map(|j| format!("{i:06}-{j:02}-{}", "a".repeat(240)))
                    .collect();
                let r = c
                    .fetch_jwtsvid(with_header(JwtsvidRequest {
                        audience,
                        spiffe_id: String::new(),
                    }))
                    .await;
                match r {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        assert!(s.message().contains("server_calls_per_second"), "{s}");
                        exhausted.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(s) => panic!("call {i}: {s}"),
                };
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (ok, exhausted) = (
        ok.load(Ordering::Relaxed),
        exhausted.load(Ordering::Relaxed),
    );
    let signed = jwt_svids_signed(e.metrics_port) - signed_before;
    let allowed = burst + rate * elapsed + 5.0;
    assert_eq!(ok + exhausted, 10_000);
    assert_eq!(
        ok as u64, signed,
        "every JWT-SVID served was signed for this flood"
    );
    assert!(
        (signed as f64) <= allowed,
        "the server signed {signed} JWT-SVIDs in {elapsed:.1}s; the limit allows {allowed:.0}"
    );
    assert!(
        exhausted as f64 >= 10_000.0 - allowed,
        "only {exhausted} calls refused"
    );
    let rss_after = e.agent.rss_kib().unwrap();
    let growth_mib = rss_after.saturating_sub(rss_before) / 1024;
    assert!(
        growth_mib < 50,
        "agent RSS grew by {growth_mib} MiB ({rss_before} → {rss_after} KiB)"
    );
    drop(e.server);
}

#[tokio::test]
async fn too_many_or_too_long_audiences_are_invalid_arguments() {
    let e = env("max_audiences = 4\nmax_audience_length = 32\n").await;
    let mut c = SpiffeWorkloadApiClient::new(channel(&e.agent).await);
    let fetch = |audience: Vec<String>| JwtsvidRequest {
        audience,
        spiffe_id: String::new(),
    };
    let five = (0..5).map(|i| format!("aud{i}")).collect();
    let err = c.fetch_jwtsvid(with_header(fetch(five))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("max_audiences"), "{err}");
    let long = vec!["x".repeat(33)];
    let err = c.fetch_jwtsvid(with_header(fetch(long))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("max_audience_length"), "{err}");
    let err = c
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: "y".repeat(33),
            svid: "a.b.c".into(),
        }))
        .await
        .unwrap_err();
    assert!(err.message().contains("max_audience_length"), "{err}");
    // At the limits: served.
    let four = (0..4).map(|i| format!("{i}{}", "z".repeat(31))).collect();
    c.fetch_jwtsvid(with_header(fetch(four))).await.unwrap();
}

#[tokio::test]
async fn engine_calls_reaching_the_server_are_rate_limited_local_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    s.cli_ok(&["engine", "create", "pay", "--tier", "1"]);
    s.cli_ok(&[
        "engine",
        "key",
        "create",
        "pay",
        "signing",
        "--purpose",
        "sign",
    ]);
    s.create_entry_with_engine(ALIAS, &format!("unix:uid:{}", uid()), "pay");
    let agent = TestAgent::start_with(
        &dir.path().join("agent"),
        &s,
        &s.token(Some(ALIAS)),
        "[workload_api]\nserver_calls_per_second = 1\nserver_calls_burst = 3\n",
    );
    let mut c = EngineApiClient::new(channel(&agent).await);
    let sign = || {
        with_header(continuity_proto::engine::SignRequest {
            key: "signing".into(),
            message: b"pay 10".to_vec(),
            ..Default::default()
        })
    };
    // Until the entry and the Engine's keys are synced (these calls use tokens too).
    let deadline = Instant::now() + Duration::from_secs(30);
    let signature = loop {
        match c.sign(sign()).await {
            Ok(r) => break r.into_inner().signature,
            Err(e) => assert!(Instant::now() < deadline, "cannot sign: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Verify is answered locally once the JWKS is cached: never limited.
    let verify = || {
        with_header(continuity_proto::engine::VerifyRequest {
            key: "signing".into(),
            message: b"pay 10".to_vec(),
            signature: signature.clone(),
            ..Default::default()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.verify(verify()).await.is_ok_and(|r| r.get_ref().valid) {
        assert!(Instant::now() < deadline, "Engine JWKS not cached");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let start = Instant::now();
    let mut refused = 0;
    for _ in 0..20 {
        match c.sign(sign()).await {
            Ok(_) => {}
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(e.message().contains("server_calls_burst"), "{e}");
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
        let v = c.verify(verify()).await.unwrap().into_inner();
        assert!(v.valid, "local Verify is not rate-limited");
    }
    let allowed = 3.0 + start.elapsed().as_secs_f64() + 1.0;
    assert!(
        f64::from(20 - refused) <= allowed,
        "{refused} of 20 Sign calls refused"
    );
    // GetPublicKey for the primary version goes to the server: limited too.
    let mut exhausted = false;
    for _ in 0..10 {
        let r = c
            .get_public_key(with_header(continuity_proto::engine::GetPublicKeyRequest {
                key: "signing".into(),
                ..Default::default()
            }))
            .await;
        exhausted |= r.is_err_and(|e| e.code() == Code::ResourceExhausted);
    }
    assert!(exhausted, "GetPublicKey never refused");
}

/// Appends one HTTP/2 frame.
fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Starts a gRPC call to `path` by hand on a raw connection: its headers, then a DATA frame
/// whose 5-byte message header declares `declared` bytes followed by only a few of them. The
/// body is never finished. Returns how long until the server ended stream 1 (trailers,
/// RST_STREAM, GOAWAY or EOF), or None if it was still open after `wait`.
async fn stalled_call(
    agent: &TestAgent,
    path: &str,
    declared: u32,
    wait: Duration,
) -> Option<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_frame(&mut out, 0x4, 0, 0, &[]);
    let mut block = Vec::new();
    for (k, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("workload.spiffe.io", "true"),
    ] {
        // Literal header field without indexing, new name, no Huffman (all lengths < 127).
        block.push(0);
        block.push(k.len() as u8);
        block.extend_from_slice(k.as_bytes());
        block.push(v.len() as u8);
        block.extend_from_slice(v.as_bytes());
    }
    h2_frame(&mut out, 0x1, 0x4, 1, &block);
    let mut data = vec![0u8];
    data.extend_from_slice(&declared.to_be_bytes());
    data.extend_from_slice(&[0x0a, 0x10]);
    h2_frame(&mut out, 0x0, 0, 1, &data);
    s.write_all(&out).await.unwrap();
    let start = Instant::now();
    let read = async {
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buf[3], buf[4]);
                let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                buf.drain(..9 + len);
                match (kind, stream) {
                    (0x4, 0) if flags & 0x1 == 0 => {
                        let mut ack = Vec::new();
                        h2_frame(&mut ack, 0x4, 0x1, 0, &[]);
                        s.write_all(&ack).await.unwrap();
                    }
                    (0x1, 1) if flags & 0x1 != 0 => return,
                    (0x0, 1) if flags & 0x1 != 0 => return,
                    (0x3, 1) | (0x7, _) => return,
                    _ => {}
                }
            }
        }
    };
    tokio::time::timeout(wait, read).await.ok()?;
    Some(start.elapsed())
}

#[tokio::test]
async fn a_request_body_never_finished_is_ended_by_request_timeout() {
    let e = env("request_timeout = \"1s\"\n").await;
    // A Workload API call and an EngineAPI call whose messages never arrive in full.
    for path in [
        "/SpiffeWorkloadAPI/FetchJWTSVID",
        "/continuity.engine.v1.EngineAPI/Sign",
    ] {
        let ended = stalled_call(&e.agent, path, 60_000, Duration::from_secs(10)).await;
        let ended =
            ended.unwrap_or_else(|| panic!("{path}: a stalled request was still open after 10 s"));
        assert!(
            ended >= Duration::from_millis(900),
            "{path}: ended after {ended:?}"
        );
    }
    // Bigger than the Workload API's message limit: refused at once, nothing reserved.
    let ended = stalled_call(
        &e.agent,
        "/SpiffeWorkloadAPI/FetchJWTSVID",
        4 << 20,
        Duration::from_secs(10),
    )
    .await;
    assert!(ended.is_some(), "a 4 MiB declared message was accepted");
}

#[tokio::test]
async fn watch_streams_outlive_the_request_timeout() {
    // And the idle timeout: a connection with a watch open is busy, never idle.
    let e = env("request_timeout = \"1s\"\nidle_timeout = \"1s\"\n").await;
    let mut c = SpiffeWorkloadApiClient::new(channel(&e.agent).await);
    let mut s = c
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    s.message().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Still open: no error, no end, just waiting for the next update.
    match tokio::time::timeout(Duration::from_millis(500), s.message()).await {
        Err(_) => {}
        Ok(r) => panic!("the watch stream ended past request_timeout: {r:?}"),
    }
    // And a unary call on the same connection is served.
    c.fetch_jwtsvid(with_header(JwtsvidRequest {
        audience: vec!["a".into()],
        spiffe_id: String::new(),
    }))
    .await
    .unwrap();
}

#[tokio::test]
async fn request_sizes_are_capped_per_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let e = env("").await;
    // Reflection: 16 KiB.
    let mut r = ServerReflectionClient::new(channel(&e.agent).await);
    let ask = |symbol: String| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol)),
    };
    let mut small = r
        .server_reflection_info(tokio_stream::iter(vec![ask("x".repeat(100))]))
        .await
        .unwrap()
        .into_inner();
    // Not found, but read.
    let err = small.message().await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let big = r
        .server_reflection_info(tokio_stream::iter(vec![ask("x".repeat(20 * 1024))]))
        .await;
    // Refused undecoded: the reflection service ends its stream without an answer.
    match big {
        Err(e) => assert_eq!(e.code(), Code::OutOfRange, "{e}"),
        Ok(s) => match s.into_inner().message().await {
            Ok(None) => {}
            Err(e) => assert_eq!(e.code(), Code::OutOfRange, "{e}"),
            Ok(Some(m)) => panic!("a 20 KiB reflection request was answered: {m:?}"),
        },
    }
    // Workload API: 64 KiB.
    let mut c = SpiffeWorkloadApiClient::new(channel(&e.agent).await);
    let err = c
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "x".repeat(70 * 1024),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    // EngineAPI: plaintexts up to 64 KiB (named in the error), messages up to 128 KiB.
    let mut eng = EngineApiClient::new(channel(&e.agent).await);
    let encrypt = |n: usize| {
        with_header(continuity_proto::engine::EncryptRequest {
            key: "k".into(),
            plaintext: vec![7; n],
            ..Default::default()
        })
    };
    let err = eng.encrypt(encrypt(64 * 1024 + 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("65536"), "{err}");
    let err = eng.encrypt(encrypt(200 * 1024)).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    // At the plaintext limit the call gets past the size checks (no Engine is bound here).
    let err = eng.encrypt(encrypt(64 * 1024)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
}
