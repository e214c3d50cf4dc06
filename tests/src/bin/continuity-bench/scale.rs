//! Agent memory per cached identity, the SVID storm, and server scale with simulated agents.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use continuity_proto::admin::token_admin_client::TokenAdminClient;
use continuity_proto::agent::SyncAuthorizedEntriesRequest;
use continuity_tests::agent::TestAgent;
use continuity_tests::agent_client::attest;
use continuity_tests::server::{ServerOptions, TestServer};

use crate::report::{Metric, percentile};
use crate::signing::create_entries;
use crate::{Plan, QUIET_SERVER, cpu_seconds, rss};

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

pub async fn agent_memory(plan: &Plan, dir: &Path) -> Vec<Metric> {
    let server = TestServer::start(
        &dir.join("server-mem"),
        ServerOptions {
            extra_toml: QUIET_SERVER.into(),
            ..Default::default()
        },
    );
    let alias = "spiffe://example.org/node/mem";
    let port = continuity_tests::free_port();
    let extra = format!(
        "log_level = \"warn\"\nsync_interval = \"1s\"\n[metrics]\nbind_address = \"127.0.0.1:{port}\""
    );
    let mut agent = TestAgent::start_with(
        &dir.join("agent-mem"),
        &server,
        &server.token(Some(alias)),
        &extra,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = rss(agent.pid().unwrap());
    let mut out = vec![
        Metric::new("agent: RSS with 0 entries", base as f64 / 1048576.0, "MiB")
            .target("<= 20 MiB base"),
    ];
    let mut have = 0;
    for n in plan.memory_steps {
        create_entries(
            &server,
            alias,
            n - have,
            &format!("mem{n}"),
            "unix:uid:9999",
        )
        .await;
        have = n;
        wait_cached(port, n, 600).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let r = rss(agent.pid().unwrap());
        out.push(Metric::new(
            format!("agent: RSS with {n} cached SVIDs"),
            r as f64 / 1048576.0,
            "MiB",
        ));
        out.push(
            Metric::new(
                format!("agent: bytes per cached identity ({n})"),
                (r.saturating_sub(base)) as f64 / n as f64,
                "B",
            )
            .target("<= 4096 B"),
        );
    }
    // SVID storm: the agent must re-obtain every SVID at once (its cached SVIDs cleared, as
    // after an authority change), keys and CSRs included.
    agent.stop();
    let state_path = agent.dir.join("data/agent-state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    state["state"]["svids"] = serde_json::json!({});
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    agent.spawn();
    let t = wait_cached(port, have, 600).await;
    out.push(
        Metric::new(
            format!("storm: one agent re-obtains {have} SVIDs"),
            t.as_secs_f64() * 1e3,
            "ms",
        )
        .target("10k in <= 5 s"),
    );
    out
}

pub async fn server_scale(plan: &Plan, dir: &Path) -> Vec<Metric> {
    let server = TestServer::start(
        &dir.join("server-scale"),
        ServerOptions {
            extra_toml: QUIET_SERVER.into(),
            ..Default::default()
        },
    );
    let aliases = plan.agents.div_ceil(10);
    for a in 0..aliases {
        create_entries(
            &server,
            &format!("spiffe://example.org/node/a{a}"),
            plan.entries_per_alias,
            &format!("a{a}"),
            "unix:uid:1000",
        )
        .await;
    }
    let ch = continuity_common::grpc::uds_channel(&server.socket)
        .await
        .unwrap();
    let bundle = server.bundle_der();
    let mut agents = Vec::new();
    let mut tasks = Vec::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    for i in 0..plan.agents {
        let (mut tc, addr, bundle, sem) = (
            TokenAdminClient::new(ch.clone()),
            server.addr.clone(),
            bundle.clone(),
            sem.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let alias = format!("spiffe://example.org/node/a{}", i % aliases);
            let token = tc
                .generate_token(continuity_proto::admin::GenerateTokenRequest {
                    spiffe_id: alias,
                    ttl: 0,
                })
                .await
                .unwrap()
                .into_inner()
                .token;
            attest(&addr, bundle, &token).await.unwrap()
        }));
    }
    for t in tasks {
        agents.push(t.await.unwrap());
    }
    // Initial full sync of every agent.
    let mut revisions = Vec::new();
    for a in agents.iter_mut() {
        let r = a
            .client
            .sync_authorized_entries(SyncAuthorizedEntriesRequest { since_revision: 0 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.entries.len(), plan.entries_per_alias);
        revisions.push(r.revision);
    }
    // Steady state: every agent syncs incrementally once a second (jittered start).
    let pid = server.pid().unwrap();
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let secs = plan.seconds * 2.0;
    let n_agents = plan.agents.max(1);
    let mut tasks = Vec::new();
    for (i, mut a) in agents.into_iter().enumerate() {
        let rev = revisions[i];
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis((i * 1000 / n_agents) as u64)).await;
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = a
                    .client
                    .sync_authorized_entries(SyncAuthorizedEntriesRequest {
                        since_revision: rev,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(r.entries.is_empty());
                tokio::time::sleep(Duration::from_secs(1).saturating_sub(t.elapsed())).await;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let cpu = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let server_rss = rss(pid) as f64 / 1048576.0;
    let n = plan.agents;
    let e = plan.entries_per_alias;
    let mut out = vec![
        Metric::new(
            format!("server: incremental sync p50, {n} agents x {e} entries"),
            percentile(&mut lat, 50.0),
            "ms",
        ),
        Metric::new(
            format!("server: incremental sync p99, {n} agents x {e} entries"),
            percentile(&mut lat, 99.0),
            "ms",
        )
        .target("<= 50 ms"),
        Metric::new(
            format!("server: CPU during steady sync ({n} syncs/s)"),
            cpu,
            "% core",
        ),
        Metric::new(
            format!("server: RSS with {n} agents, {} entries", aliases * e),
            server_rss,
            "MiB",
        )
        .target("<= 512 MiB"),
    ];
    // Full sync of a large entry set by one agent.
    let big = "spiffe://example.org/node/big";
    create_entries(&server, big, plan.full_sync_entries, "big", "unix:uid:1000").await;
    let mut a = attest(&server.addr, server.bundle_der(), &server.token(Some(big)))
        .await
        .unwrap();
    let mut full = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let r = a
            .client
            .sync_authorized_entries(SyncAuthorizedEntriesRequest { since_revision: 0 })
            .await
            .unwrap()
            .into_inner();
        full.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r.entries.len(), plan.full_sync_entries);
    }
    out.push(Metric::new(
        format!(
            "server: full sync of {} entries (p50 of 5)",
            plan.full_sync_entries
        ),
        percentile(&mut full, 50.0),
        "ms",
    ));
    out
}
