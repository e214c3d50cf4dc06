//! Agent memory per cached identity, the SVID storm, and server scale with simulated agents.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use continuity_tests::agent::TestAgent;
use continuity_tests::server::{ServerOptions, TestServer};

use crate::report::{Metric, percentile};
use crate::signing::create_entries;
use crate::{Plan, QUIET_AGENT, QUIET_SERVER, rss, uid};

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut s = String::new();
    let _ = c.read_to_string(&mut s);
    s
}

fn cached_svids(port: u16) -> usize {
    http_get(port, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix("continuity_agent_cached_svids "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn wait_cached(port: u16, n: usize, secs: u64) -> Duration {
    let t = Instant::now();
    while cached_svids(port) < n {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "agent did not cache {n} SVIDs within {secs}s (has {})",
            cached_svids(port)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed()
}

/// A server and an agent with a metrics port, one entry for this uid (so the Workload API
/// serves it) under the agent's alias; returns that entry's id too.
async fn mem_pair(dir: &Path, port: u16, alias: &str) -> (TestServer, TestAgent, String) {
    let server = TestServer::start(
        &dir.join("server-mem"),
        ServerOptions {
            extra_toml: QUIET_SERVER.into(),
            ..Default::default()
        },
    );
    let extra = format!(
        "sync_interval = \"1s\"\n{QUIET_AGENT}[metrics]\nbind_address = \"127.0.0.1:{port}\""
    );
    let agent = TestAgent::start_with(
        &dir.join("agent-mem"),
        &server,
        &server.token(Some(alias)),
        &extra,
    );
    let mine = create_entries(&server, alias, 1, "mem-me", &format!("unix:uid:{}", uid())).await;
    wait_cached(port, 1, 60).await;
    (server, agent, mine[0].clone())
}

/// Agent RSS and bytes per cached identity at each step of `plan.memory_steps`.
pub async fn agent_memory(plan: &Plan, dir: &Path) -> Vec<Metric> {
    let alias = "spiffe://example.org/node/mem";
    let port = continuity_tests::free_port();
    let (server, mut agent, mine) = mem_pair(dir, port, alias).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = rss(agent.pid().unwrap());
    let mut out = vec![
        Metric::new("agent: RSS with 0 entries", base as f64 / 1048576.0, "MiB")
            .target("<= 20 MiB base"),
    ];
    let mut have = 0;
    for n in plan.memory_steps {
        let prefix = format!("mem{n}");
        create_entries(&server, alias, n - have, &prefix, "unix:uid:9999").await;
        have = n;
        wait_cached(port, n + 1, 600).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let r = rss(agent.pid().unwrap());
        let per = (r.saturating_sub(base)) as f64 / n as f64;
        out.push(Metric::new(
            format!("agent: RSS with {n} cached SVIDs"),
            r as f64 / 1048576.0,
            "MiB",
        ));
        out.push(
            Metric::new(format!("agent: bytes per cached identity ({n})"), per, "B")
                .target("<= 4096 B"),
        );
    }
    out.extend(storm(&mut agent, port, have, &mine).await);
    out
}

/// FetchX509SVID latencies (µs) from `clients` kept connections until `stop`; a client
/// records only after its first answer (before it the agent may hold no SVID for it).
fn fetchers(
    sock: &Path,
    clients: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<f64>>> {
    use std::sync::atomic::Ordering;
    (0..clients)
        .map(|_| {
            let (sock, stop) = (sock.to_path_buf(), stop.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let (mut answered, mut conn) = (false, None);
                while !stop.load(Ordering::Relaxed) {
                    match crate::workload::try_fetch(&mut conn, &sock).await {
                        Some(us) if answered => lat.push(us),
                        Some(_) => answered = true,
                        None => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                lat
            })
        })
        .collect()
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<f64>>>) -> Vec<f64> {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// The SVID storm: the agent must re-obtain `have` SVIDs at once (its cached SVIDs cleared,
/// as after an authority change, but for the one of entry `mine`), keys and CSRs included;
/// meanwhile clients fetch `mine` through the Workload API, held against the same fetches on
/// the idle agent afterwards.
async fn storm(agent: &mut TestAgent, port: u16, have: usize, mine: &str) -> Vec<Metric> {
    use std::sync::atomic::{AtomicBool, Ordering};
    agent.stop();
    let state_path = agent.dir.join("data/agent-state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    let kept = state["state"]["svids"][mine].take();
    state["state"]["svids"] = serde_json::json!({ mine: kept });
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    agent.spawn();
    let stop = Arc::new(AtomicBool::new(false));
    let busy = fetchers(&agent.socket, 4, stop.clone());
    let t = wait_cached(port, have + 1, 600).await;
    stop.store(true, Ordering::Relaxed);
    let mut during = collect(busy).await;
    let stop = Arc::new(AtomicBool::new(false));
    let idle = fetchers(&agent.socket, 4, stop.clone());
    tokio::time::sleep(t.max(Duration::from_secs(1))).await;
    stop.store(true, Ordering::Relaxed);
    let mut idle = collect(idle).await;
    vec![
        Metric::new(
            format!("storm: one agent re-obtains {have} SVIDs"),
            t.as_secs_f64() * 1e3,
            "ms",
        )
        .target("10k in <= 5 s"),
        Metric::new(
            format!(
                "storm: Workload API X509 p99 while {have} SVIDs rotate ({} fetches)",
                during.len()
            ),
            percentile(&mut during, 99.0),
            "us",
        )
        .floor("same agent idle, p99", percentile(&mut idle, 99.0)),
    ]
}
