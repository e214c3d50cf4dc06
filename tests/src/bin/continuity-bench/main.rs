//! `continuity-bench [--quick] [--only GROUP]`: Continuity's benchmark suite. Starts the real binaries on
//! loopback and temporary sockets, measures each figure next to a floor measured in the same
//! run on the same machine, prints a table and writes target/bench/summary.json.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod engine;
mod engine_floor;
mod hsm;
mod record_macs;
mod report;
mod scale;
mod scale_cluster;
mod scale_server;
mod signing;
mod workload;
mod workload_rows;

use std::time::{Duration, Instant};

use continuity_tests::agent::TestAgent;
use continuity_tests::server::{ServerOptions, TestServer};
use report::Metric;

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub quick: bool,
    /// Only this group runs (`--only workload|signing|engine|recovery|scale|server|cluster|macs`).
    pub only: Option<&'static str>,
    pub latency_samples: usize,
    pub seconds: f64,
    pub memory_steps: [usize; 3],
    pub agents: usize,
    pub entries_per_alias: usize,
    pub full_sync_entries: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                only: None,
                latency_samples: 400,
                seconds: 1.5,
                memory_steps: [100, 1000, 2000],
                agents: 100,
                entries_per_alias: 100,
                full_sync_entries: 2000,
            }
        } else {
            Self {
                quick,
                only: None,
                latency_samples: 2000,
                seconds: 4.0,
                memory_steps: [100, 1000, 10_000],
                agents: 10_000,
                entries_per_alias: 100,
                full_sync_entries: 10_000,
            }
        }
    }
}

pub fn uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// RSS of a process in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// CPU seconds (user + system) a process used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

pub fn wait_for<F: FnMut() -> bool>(secs: u64, what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {secs}s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent's counterpart of [`QUIET_SERVER`]: quiet logs, and the per-workload limit on
/// calls reaching the server (20/s by default) out of the way of the Engine rows. Ends inside
/// `[workload_api]`.
pub const QUIET_AGENT: &str = "log_level = \"warn\"\n[workload_api]\nserver_calls_per_second = 1000000\nserver_calls_burst = 1000000\n";

/// Quiet logs: benchmarks measure the work, not the logging; and the per-agent rate limits
/// (50 SVIDs/s, 500 Engine calls/s by default) out of the way of the throughput rows. Ends
/// inside `[agent_api]`, so more keys of that table may follow.
pub const QUIET_SERVER: &str = "log_level = \"warn\"\n[agent_api]\nsvids_per_second = 1000000\nsvid_burst = 1000000\nengine_calls_per_second = 1000000\nengine_call_burst = 1000000\n";

/// Child processes the suite starts from its own binary: `--<name> args…`.
fn child(args: &[String]) -> bool {
    let rest = args.get(2..).unwrap_or_default();
    match args.get(1).map(String::as_str) {
        Some("--floor-server") => workload::floor_server_child(rest),
        Some("--pkcs11-floor") => hsm::pkcs11_floor_child(rest),
        Some("--engine-tls-echo") => engine_floor::tls_echo_child(rest),
        Some("--engine-uds-echo") => engine_floor::uds_echo_child(rest),
        Some("--connect-loop") => workload::connect_loop_child(rest),
        _ => return false,
    }
    true
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if child(&args) {
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let mut plan = Plan::new(quick);
    plan.only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|g| &*String::leak(g.clone()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/summary.json");
    let metrics = rt.block_on(run(plan));
    report::write(&metrics, &out).unwrap();
}

/// A server and an agent, one entry for this uid bound to an Engine with transit keys.
fn main_pair(dir: &std::path::Path) -> (TestServer, TestAgent) {
    let server = TestServer::start(
        &dir.join("server"),
        ServerOptions {
            extra_toml: QUIET_SERVER.into(),
            ..Default::default()
        },
    );
    let alias = "spiffe://example.org/node/bench";
    server.cli_ok(&["engine", "create", "bench", "--tier", "1"]);
    server.cli_ok(&[
        "engine",
        "key",
        "create",
        "bench",
        "signing",
        "--purpose",
        "sign",
    ]);
    let selector = format!("unix:uid:{}", uid());
    server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/bench",
        "--parent-id",
        alias,
        "--selector",
        &selector,
        "--engine",
        "bench",
    ]);
    let agent = TestAgent::start_with(
        &dir.join("agent"),
        &server,
        &server.token(Some(alias)),
        &format!("sync_interval = \"1s\"\n{QUIET_AGENT}"),
    );
    wait_for(20, "agent serves", || {
        agent.cli(&["api", "fetch", "x509"]).status.success()
    });
    (server, agent)
}

async fn run(plan: Plan) -> Vec<Metric> {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    continuity_tests::agent::open_up(dir);
    eprintln!(
        "continuity-bench: {} run, {} cores, binaries from {}",
        if plan.quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        continuity_tests::bin_dir().display()
    );
    let runs = |group: &str| plan.only.is_none_or(|o| o == group);
    let mut m = Vec::new();
    if runs("macs") {
        eprintln!("[0/7] record MACs: Engine sign and entry writes, MACs on vs off");
        m.extend(record_macs::metrics(&plan, dir).await);
        if plan.only.is_some() {
            return m;
        }
    }
    let (server, mut agent) = main_pair(dir);
    if runs("workload") {
        eprintln!("[1/7] Workload API latency and throughput");
        m.extend(workload_rows::metrics(&plan, &agent, dir).await);
    }
    if runs("signing") {
        eprintln!("[2/7] SVID signing (disk, pkcs11) and Engine ops (hsm)");
        m.extend(signing::metrics(&plan, &server, dir).await);
    }
    if runs("engine") {
        eprintln!("[3/7] Engine ops (transit)");
        m.extend(engine::metrics(&plan, &agent.socket, "transit", dir, None).await);
        m.push(Metric::new(
            "disk: 256 B append + fdatasync p50 (one audit commit)",
            engine::fdatasync_p50(dir),
            "us",
        ));
    }
    if runs("recovery") {
        eprintln!("[4/7] recovery");
        m.push(recovery(&mut agent, &server).await);
    }
    drop(agent);
    drop(server);
    if runs("scale") {
        eprintln!("[5/7] agent memory, SVID storm, Workload API during rotation");
        m.extend(scale::agent_memory(&plan, dir).await);
    }
    if runs("server") {
        eprintln!("[6/7] server scale");
        m.extend(scale_server::server_scale(&plan, dir).await);
    }
    if runs("cluster") {
        eprintln!("[7/7] three servers on one PostgreSQL");
        m.extend(scale_cluster::cluster_scale(&plan, dir).await);
    }
    m
}

async fn recovery(agent: &mut TestAgent, server: &TestServer) -> Metric {
    // The server is unreachable (stopped); the agent restarts from data_dir: time from spawn
    // to the first SVID served.
    let sock = agent.socket.clone();
    let srv_pid = server.pid().unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &srv_pid.to_string()])
        .status();
    agent.stop();
    let t = Instant::now();
    let child = std::process::Command::new(continuity_tests::bin("continuity-agent"))
        .args(["run", "--config"])
        .arg(agent.dir.join("agent.toml"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ms = loop {
        if sock.exists() && first_svid(&sock).await {
            break t.elapsed().as_secs_f64() * 1e3;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "agent did not recover"
        );
    };
    let mut child = child;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &srv_pid.to_string()])
        .status();
    Metric::new(
        "recovery: agent restart, server down -> first SVID",
        ms,
        "ms",
    )
    .target("<= 200 ms")
}

/// Whether the agent on `sock` serves an X509-SVID right now.
async fn first_svid(sock: &std::path::Path) -> bool {
    let Ok(ch) = continuity_common::grpc::uds_channel(sock).await else {
        return false;
    };
    let mut c =
        continuity_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch);
    let Ok(s) = c
        .fetch_x509svid(workload::req(
            continuity_proto::workload::X509svidRequest {},
        ))
        .await
    else {
        return false;
    };
    s.into_inner().message().await.ok().flatten().is_some()
}
