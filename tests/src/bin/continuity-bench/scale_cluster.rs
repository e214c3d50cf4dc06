//! Three servers on one PostgreSQL database beside one server on the same kind of database:
//! incremental sync p99 with the simulated agents spread over the servers, and the total
//! BatchNewX509SVID throughput of all servers signing at once. Every figure's floor is the
//! same measurement on one server, taken in this run.

use std::path::Path;
use std::time::Duration;

use continuity_tests::cluster::{Cluster, ClusterOptions};
use continuity_tests::server::TestServer;

use crate::report::{Metric, percentile};
use crate::scale_server::{aliases, attest_all, initial_sync, steady, sync_period};
use crate::signing::{create_entries, server_rate};
use crate::{Plan, QUIET_SERVER};

/// Simulated agents of the cluster rows (the 10,000-agent rows stay on one server).
fn cluster_agents(plan: &Plan) -> usize {
    if plan.quick { 100 } else { 1000 }
}

/// `n` servers on a fresh PostgreSQL database, sized for `agents` connections.
fn launch(dir: &Path, n: usize, agents: usize) -> Cluster {
    let conns = (agents + 1024).max(8192);
    let opts = ClusterOptions {
        extra_toml: format!(
            "{QUIET_SERVER}max_connections = {conns}\nmax_connections_per_ip = {conns}\n"
        ),
        ..ClusterOptions::on(&continuity_tests::postgres::database())
    };
    Cluster::launch(dir, n, &opts)
}

/// Incremental sync latencies (ms) of `plan.agents` agents spread over `n` servers.
async fn sync_latencies(dir: &Path, n: usize, plan: &Plan) -> Vec<f64> {
    let c = launch(dir, n, plan.agents);
    let e = plan.entries_per_alias;
    for a in 0..aliases(plan) {
        let alias = format!("spiffe://example.org/node/a{a}");
        create_entries(c.server(0), &alias, e, &format!("a{a}"), "unix:uid:1000").await;
    }
    // The other servers follow server 0's writes through the change feed (500 ms poll).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let servers: Vec<&TestServer> = c.servers.iter().collect();
    let mut agents = attest_all(&servers, plan).await;
    let revisions = initial_sync(&mut agents, e).await;
    let period = sync_period(plan);
    let secs = (plan.seconds * 2.0).max(2.0 * period.as_secs_f64());
    steady(agents, revisions, period, secs).await
}

/// SVIDs per second signed by all `n` servers at once (each with its own agent and callers).
async fn signing_rate(dir: &Path, n: usize, plan: &Plan) -> f64 {
    let c = launch(dir, n, 0);
    let tags: Vec<String> = (0..n).map(|i| format!("c{n}-{i}")).collect();
    let rates = futures_util::future::join_all(
        c.servers
            .iter()
            .zip(&tags)
            .map(|(s, tag)| server_rate(s, plan, tag)),
    )
    .await;
    rates.iter().sum()
}

/// The three-server rows, each beside its one-server floor.
pub async fn cluster_scale(plan: &Plan, dir: &Path) -> Vec<Metric> {
    let sub = Plan {
        agents: cluster_agents(plan),
        ..*plan
    };
    let mut one = sync_latencies(&dir.join("sync-1"), 1, &sub).await;
    let mut three = sync_latencies(&dir.join("sync-3"), 3, &sub).await;
    let sign_one = signing_rate(&dir.join("sign-1"), 1, plan).await;
    let sign_three = signing_rate(&dir.join("sign-3"), 3, plan).await;
    let n = sub.agents;
    vec![
        Metric::new(
            format!("cluster: incremental sync p99, {n} agents over 3 servers, one PostgreSQL"),
            percentile(&mut three, 99.0),
            "ms",
        )
        .floor("same agents on 1 server", percentile(&mut one, 99.0)),
        Metric::new(
            "cluster: BatchNewX509SVID SVIDs/s, 3 servers at once (total)",
            sign_three,
            "svid/s",
        )
        .floor("1 server", sign_one),
    ]
}
