//! Server scale: simulated agents (real attestation, real TLS connections, one each) syncing
//! incrementally, the server's CPU and RSS meanwhile, and one full sync of a large entry set.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use continuity_proto::admin::token_admin_client::TokenAdminClient;
use continuity_proto::agent::SyncAuthorizedEntriesRequest;
use continuity_tests::agent_client::{Agent, attest};
use continuity_tests::server::{ServerOptions, TestServer};

use crate::report::{Metric, percentile};
use crate::signing::create_entries;
use crate::{Plan, QUIET_SERVER, cpu_seconds, rss};

/// Node aliases the simulated agents share (each alias holds `entries_per_alias` entries).
pub fn aliases(plan: &Plan) -> usize {
    plan.agents.div_ceil(10).min(100)
}

/// How often each simulated agent syncs: 1 s up to 1,000 agents, else the agent's default
/// `sync_interval` (5 s).
pub fn sync_period(plan: &Plan) -> Duration {
    Duration::from_secs(if plan.agents > 1000 { 5 } else { 1 })
}

fn scale_server(dir: &Path, plan: &Plan) -> TestServer {
    // One connection per simulated agent, all from 127.0.0.1.
    let conns = (plan.agents + 1024).max(8192);
    TestServer::start(
        &dir.join("server-scale"),
        ServerOptions {
            extra_toml: format!(
                "{QUIET_SERVER}max_connections = {conns}\nmax_connections_per_ip = {conns}\n"
            ),
            ..Default::default()
        },
    )
}

/// Attests `plan.agents` agents (16 at a time), spread over the aliases and round-robin over
/// `servers` (each agent's join token from the server it attests to).
pub async fn attest_all(servers: &[&TestServer], plan: &Plan) -> Vec<Agent> {
    let mut channels = Vec::with_capacity(servers.len());
    for s in servers {
        channels.push(
            continuity_common::grpc::uds_channel(&s.socket)
                .await
                .unwrap(),
        );
    }
    let bundles: Vec<_> = servers.iter().map(|s| s.bundle_der()).collect();
    let n_aliases = aliases(plan);
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for i in 0..plan.agents {
        let server = servers[i % servers.len()];
        let mut tc = TokenAdminClient::new(channels[i % servers.len()].clone());
        let bundle = bundles[i % servers.len()].clone();
        let (addr, sem) = (server.addr.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let request = continuity_proto::admin::GenerateTokenRequest {
                spiffe_id: format!("spiffe://example.org/node/a{}", i % n_aliases),
                ttl: 0,
            };
            let token = tc.generate_token(request).await.unwrap().into_inner().token;
            attest(&addr, bundle, &token).await.unwrap()
        }));
    }
    let mut agents = Vec::with_capacity(plan.agents);
    for t in tasks {
        agents.push(t.await.unwrap());
    }
    agents
}

/// The serving report of a steady agent: one X.509 and one JWT authority.
fn serving_report() -> continuity_proto::agent::ServingReport {
    continuity_proto::agent::ServingReport {
        bundle_sequence: 1,
        x509_authority_ids: vec!["0a1b2c3d4e5f60718293a4b5c6d7e8f901234567".into()],
        jwt_authority_ids: vec!["bench-kid".into()],
    }
}

/// One full sync per agent; returns each agent's revision.
pub async fn initial_sync(agents: &mut [Agent], entries: usize) -> Vec<i64> {
    let mut revisions = Vec::with_capacity(agents.len());
    for a in agents.iter_mut() {
        let r = a
            .client
            .sync_authorized_entries(SyncAuthorizedEntriesRequest {
                since_revision: 0,
                serving: Some(serving_report()),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.entries.len(), entries);
        revisions.push(r.revision);
    }
    revisions
}

/// Steady state: every agent syncs incrementally once per `period` (starts spread over one
/// period) for `secs`; every sync's latency in ms.
pub async fn steady(
    agents: Vec<Agent>,
    revisions: Vec<i64>,
    period: Duration,
    secs: f64,
) -> Vec<f64> {
    let n = agents.len().max(1) as u32;
    let mut tasks = Vec::new();
    for (i, (mut a, rev)) in agents.into_iter().zip(revisions).enumerate() {
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(period * i as u32 / n).await;
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                // The report a real agent sends with every sync (unchanged: no write).
                let request = SyncAuthorizedEntriesRequest {
                    since_revision: rev,
                    serving: Some(serving_report()),
                };
                let r = a.client.sync_authorized_entries(request).await.unwrap();
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(r.into_inner().entries.is_empty());
                tokio::time::sleep(period.saturating_sub(t.elapsed())).await;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    lat
}

/// Full sync of `plan.full_sync_entries` entries by one agent (p50 of 5), in ms.
async fn full_sync(server: &TestServer, plan: &Plan) -> Metric {
    let big = "spiffe://example.org/node/big";
    create_entries(server, big, plan.full_sync_entries, "big", "unix:uid:1000").await;
    let mut a = attest(&server.addr, server.bundle_der(), &server.token(Some(big)))
        .await
        .unwrap();
    let mut full = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let request = SyncAuthorizedEntriesRequest {
            since_revision: 0,
            serving: Some(serving_report()),
        };
        let r = a.client.sync_authorized_entries(request).await.unwrap();
        full.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r.into_inner().entries.len(), plan.full_sync_entries);
    }
    let n = plan.full_sync_entries;
    Metric::new(
        format!("server: full sync of {n} entries (p50 of 5)"),
        percentile(&mut full, 50.0),
        "ms",
    )
}

/// The server-scale rows.
pub async fn server_scale(plan: &Plan, dir: &Path) -> Vec<Metric> {
    let server = scale_server(dir, plan);
    let e = plan.entries_per_alias;
    for a in 0..aliases(plan) {
        let alias = format!("spiffe://example.org/node/a{a}");
        create_entries(&server, &alias, e, &format!("a{a}"), "unix:uid:1000").await;
    }
    let t = Instant::now();
    let mut agents = attest_all(&[&server], plan).await;
    let attest_s = t.elapsed().as_secs_f64();
    let revisions = initial_sync(&mut agents, e).await;
    let (pid, period) = (server.pid().unwrap(), sync_period(plan));
    let secs = (plan.seconds * 2.0).max(2.0 * period.as_secs_f64());
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    let mut lat = steady(agents, revisions, period, secs).await;
    let cpu = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let server_rss = rss(pid) as f64 / 1048576.0;
    let (n, total) = (plan.agents, aliases(plan) * e);
    let rate = n as f64 / period.as_secs_f64();
    let every = format!(
        "{n} agents, {total} entries, sync every {}s",
        period.as_secs()
    );
    vec![
        Metric::new(
            format!("server: attest {n} agents (16 at a time)"),
            attest_s,
            "s",
        ),
        Metric::new(
            format!("server: incremental sync p50, {every}"),
            percentile(&mut lat, 50.0),
            "ms",
        ),
        Metric::new(
            format!("server: incremental sync p99, {every}"),
            percentile(&mut lat, 99.0),
            "ms",
        )
        .target("<= 50 ms"),
        Metric::new(
            format!("server: CPU during steady sync ({rate:.0} syncs/s)"),
            cpu,
            "% core",
        ),
        Metric::new(
            format!("server: RSS with {n} agents connected, {total} entries"),
            server_rss,
            "MiB",
        )
        .target("<= 512 MiB"),
        full_sync(&server, plan).await,
    ]
}
