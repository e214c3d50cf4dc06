#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]
//! Agents with several servers (issue 13 parts 4 and 5): real server processes on one shared
//! datastore and key directory, a real agent with `server_address` listing them, workloads
//! using the Rust `spiffe` crate.
//!
//! Everything the servers need (entries, the agent's record and the first use of its SVID)
//! is written before the second and third servers start, so no test depends on servers
//! following each other's writes.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use continuity_tests::agent::TestAgent;
use continuity_tests::cluster::{
    Cluster, ClusterOptions, agent_id, agent_svid_serial, server_link, wait_for,
};
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::{bin, fetch_x509, free_port, uid};

const ALIAS: &str = "spiffe://example.org/node/failover";
const WORKLOAD_ID: &str = "spiffe://example.org/failover/workload";
const WORKLOADS: usize = 50;
/// How soon after the kill the agent must be working with another server.
const SWITCH_WITHIN: Duration = Duration::from_secs(10);

/// The serial of the leaf of the X509-SVID the agent serves now.
async fn served_serial(agent: &TestAgent) -> Option<String> {
    let r = fetch_x509(agent).await.ok()?;
    let svid = r.svids.first()?;
    continuity_common::x509::serial_hex(&svid.x509_svid).ok()
}

/// What one workload saw: fetches that succeeded before and after the kill, and every failure.
#[derive(Debug, Default)]
struct Seen {
    ok_before: u64,
    ok_after: u64,
    failures: Vec<String>,
}

/// A workload: fetches its X509-SVID with the `spiffe` crate every 100 ms until `stop`.
async fn workload(endpoint: String, killed: Arc<AtomicBool>, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let client = match spiffe::WorkloadApiClient::connect_to(&endpoint).await {
        Ok(c) => c,
        Err(e) => {
            seen.failures.push(format!("connect: {e}"));
            return seen;
        }
    };
    while !stop.load(Ordering::SeqCst) {
        let after = killed.load(Ordering::SeqCst);
        match client.fetch_x509_svid().await {
            Ok(svid) if svid.spiffe_id().to_string() == WORKLOAD_ID => {
                if after {
                    seen.ok_after += 1;
                } else {
                    seen.ok_before += 1;
                }
            }
            Ok(svid) => seen
                .failures
                .push(format!("wrong SVID {}", svid.spiffe_id())),
            Err(e) => seen.failures.push(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_server_in_use_moves_the_agent_while_50_workloads_fetch_without_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    // Agent and workload SVIDs renew at 36-45 s: well after the kill, so the renewal happens
    // on the server the agent moved to.
    // Three servers on one PostgreSQL database (the deployment several servers need).
    let opts = ClusterOptions {
        x509_ttl: "90s".into(),
        ..ClusterOptions::on(&continuity_tests::postgres::database())
    };
    let mut cluster = Cluster::configure(dir.path(), 3, &opts);
    cluster.start(0);
    let first = cluster.servers[0].addr.clone();
    cluster.servers[0].create_entry(WORKLOAD_ID, ALIAS, &[&format!("unix:uid:{}", uid())]);
    let token = cluster.servers[0].token(Some(ALIAS));
    let metrics = free_port();
    // Only the first server runs: wherever in the list the agent starts, it reaches it.
    let mut agent = TestAgent::configure_servers(
        &dir.path().join("agent"),
        &cluster.servers[0],
        &cluster.server_address_toml(),
        &token,
        &format!("[metrics]\nbind_address = \"127.0.0.1:{metrics}\"\n"),
    );
    agent.spawn();
    // The first sync round with the first server: the agent's record and the first use of its
    // SVID are in the datastore before the other servers load it.
    let mut workload_serial = None;
    for _ in 0..300 {
        workload_serial = served_serial(&agent).await;
        if workload_serial.is_some() && server_link(metrics).connected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let workload_serial = workload_serial.expect("a first X509-SVID from the agent");
    let link = server_link(metrics);
    assert_eq!(link.server.as_deref(), Some(first.as_str()), "{link:?}");
    assert!(link.connected, "{link:?}");
    let agent_id = agent_id(&agent);
    let serial_before = agent_svid_serial(&agent);

    // The other two servers, on the same datastore and keys (so the same CA).
    cluster.start(1);
    cluster.start(2);
    assert_eq!(
        cluster.servers[1].bundle_der(),
        cluster.servers[0].bundle_der()
    );

    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..WORKLOADS)
        .map(|_| tokio::spawn(workload(agent.endpoint(), killed.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // kill -9 the server the agent is using.
    let in_use = server_link(metrics).server.expect("a server in use");
    let victim = cluster
        .index_of(&in_use)
        .expect("the server in use is one of ours");
    assert_eq!(
        agent_svid_serial(&agent),
        serial_before,
        "test timing: the agent SVID renewed before the kill; the renewal must happen after it"
    );
    cluster.kill(victim);
    killed.store(true, Ordering::SeqCst);
    let killed_at = Instant::now();

    // Within 10 s the agent completes a sync round with another server.
    let moved_to = tokio::task::block_in_place(|| {
        wait_for(&agent, SWITCH_WITHIN, "a sync with another server", || {
            let l = server_link(metrics);
            (l.connected && l.server.as_deref() != Some(in_use.as_str())).then(|| l.server.unwrap())
        })
    });
    let moved = cluster.index_of(&moved_to).expect("moved to one of ours");
    assert_ne!(moved, victim);
    assert!(killed_at.elapsed() < SWITCH_WITHIN);
    eprintln!(
        "moved from {in_use} to {moved_to} {:?} after the kill",
        killed_at.elapsed()
    );

    // Its next renewal succeeds there: the agent holds a new agent SVID and the new server
    // has recorded that very serial.
    let renewed = tokio::task::block_in_place(|| {
        wait_for(
            &agent,
            Duration::from_secs(90),
            "an agent SVID renewal",
            || {
                let s = agent_svid_serial(&agent);
                (s != serial_before).then_some(s)
            },
        )
    });
    let shown: serde_json::Value = serde_json::from_str(&cluster.servers[moved].cli_ok(&[
        "agent",
        "show",
        "--spiffe-id",
        &agent_id,
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(
        shown["serial_number"].as_str(),
        Some(renewed.as_str()),
        "{shown}"
    );
    // The workload SVID is re-signed there too, and syncs go on with the renewed SVID.
    let mut rotated = false;
    for _ in 0..600 {
        if served_serial(&agent)
            .await
            .is_some_and(|s| s != workload_serial)
        {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        rotated,
        "the workload SVID did not rotate; agent log:\n{}",
        agent.log()
    );
    tokio::task::block_in_place(|| {
        wait_for(
            &agent,
            Duration::from_secs(10),
            "a sync after the renewal",
            || {
                let l = server_link(metrics);
                (l.connected && l.server.as_deref() == Some(moved_to.as_str())).then_some(())
            },
        )
    });

    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for t in tasks {
        let seen = t.await.unwrap();
        assert!(seen.ok_before > 0 && seen.ok_after > 0, "{seen:?}");
        failures.extend(seen.failures);
    }
    assert!(
        failures.is_empty(),
        "{} failed Workload API fetches, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_server_of_another_ca_fails_tls_is_moved_past_and_never_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let mut ours = TestServer::start(&dir.path().join("ours"), ServerOptions::default());
    // Same trust domain, same server SPIFFE ID, its own CA: not in the agent's bundle.
    let impostor = TestServer::start(&dir.path().join("impostor"), ServerOptions::default());
    assert_ne!(ours.bundle_der(), impostor.bundle_der());
    ours.create_entry(WORKLOAD_ID, ALIAS, &[&format!("unix:uid:{}", uid())]);
    let token = ours.token(Some(ALIAS));
    let metrics = free_port();
    let mut agent = TestAgent::configure_servers(
        &dir.path().join("agent"),
        &ours,
        &format!("[\"{}\", \"{}\"]", impostor.addr, ours.addr),
        &token,
        &format!("[metrics]\nbind_address = \"127.0.0.1:{metrics}\"\n"),
    );
    agent.spawn();
    let mut first = None;
    for _ in 0..300 {
        first = served_serial(&agent).await;
        if first.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = first.expect("an X509-SVID through our server");
    let served = fetch_x509(&agent).await.unwrap();
    let ours_ca = ours.bundle_der();
    assert_eq!(
        served.svids[0].bundle,
        ours_ca.concat(),
        "our CA, not the impostor's"
    );
    assert_eq!(
        server_link(metrics).server.as_deref(),
        Some(ours.addr.as_str())
    );

    // Our server goes away: the agent tries the impostor, whose TLS fails, and comes back
    // round; it never syncs with the impostor, keeps serving from its cache, and backs off
    // between attempts.
    ours.stop();
    let window = Instant::now();
    let switches_before = server_link(metrics).switches;
    tokio::task::block_in_place(|| {
        wait_for(
            &agent,
            Duration::from_secs(20),
            "a move past the impostor",
            || (server_link(metrics).switches >= switches_before + 2).then_some(()),
        )
    });
    for _ in 0..20 {
        let l = server_link(metrics);
        assert!(!l.connected, "synced while only the impostor runs: {l:?}");
        assert_eq!(served_serial(&agent).await.as_deref(), Some(first.as_str()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let attempts = server_link(metrics).switches - switches_before;
    let elapsed = window.elapsed().as_secs_f64();
    // Back-off from 0.5 s doubling: a handful of attempts, never a tight loop.
    assert!(
        (attempts as f64) <= 2.0 + elapsed,
        "{attempts} attempts in {elapsed:.1} s"
    );
    assert!(
        agent.log().contains(&format!(
            "cannot connect to the server at {}",
            impostor.addr
        )),
        "the impostor's refusal is logged with its address; log:\n{}",
        agent.log()
    );

    // Back: the agent reaches our server again.
    ours.spawn();
    tokio::task::block_in_place(|| {
        wait_for(
            &agent,
            Duration::from_secs(45),
            "a sync with our server again",
            || {
                let l = server_link(metrics);
                (l.connected && l.server.as_deref() == Some(ours.addr.as_str())).then_some(())
            },
        )
    });
}

/// Writes an agent.toml with `server_address = VALUE` (no server needed: insecure
/// bootstrap, JSON logs) in `dir`.
fn bare_agent_config(dir: &std::path::Path, value: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    continuity_tests::agent::open_up(dir);
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "trust_domain = \"example.org\"\nserver_address = {value}\ndata_dir = \"{}\"\nsocket_path = \"{}\"\ninsecure_bootstrap = true\njoin_token = \"unused\"\nlog_format = \"json\"\n",
            dir.join("data").display(),
            dir.join("public").join("api.sock").display(),
        ),
    )
    .unwrap();
    cfg
}

/// The `fields` of every JSON log line whose message is `message`.
fn log_fields(log: &str, message: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .map(|v| v["fields"].clone())
        .collect()
}

#[test]
fn server_address_arrays_and_names_parse_spread_and_bad_ones_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (value, says)) in [
        ("[]", "empty"),
        ("[\"127.0.0.1:1\", 7]", "entry 1"),
        ("[\"127.0.0.1:1\", \"nope\"]", "entry 1"),
        ("[\"127.0.0.1:1\", \"127.0.0.1:1\"]", "listed twice"),
        ("\"::1:8081\"", "brackets"),
        ("\"host:0\"", "port"),
        ("8081", "integer"),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = bare_agent_config(&dir.path().join(format!("bad-{i}")), value);
        let out = Command::new(bin("continuity-agent"))
            .args(["run", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value} accepted");
        assert!(
            err.contains("server_address") && err.contains(says),
            "{value}: {err}"
        );
    }

    // A name and two IP literals, nothing listening: every agent resolves the same three
    // servers, starts at its own random position, and moves through all of them.
    let ports = [free_port(), free_port(), free_port()];
    let value = format!(
        "[\"localhost:{}\", \"127.0.0.1:{}\", \"127.0.0.1:{}\"]",
        ports[0], ports[1], ports[2]
    );
    let want: HashSet<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let agents: Vec<_> = (0..12)
        .map(|i| {
            let d = dir.path().join(format!("spread-{i}"));
            let cfg = bare_agent_config(&d, &value);
            let log = std::fs::File::create(d.join("agent.log")).unwrap();
            let child = Command::new(bin("continuity-agent"))
                .args(["run", "--config"])
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            (d, child)
        })
        .collect();
    let start = Instant::now();
    let mut firsts = Vec::new();
    for (d, _) in &agents {
        loop {
            let log = std::fs::read_to_string(d.join("agent.log")).unwrap_or_default();
            let tried: Vec<String> =
                log_fields(&log, "cannot reach the server to attest; retrying")
                    .iter()
                    .map(|f| f["server"].as_str().unwrap_or_default().to_string())
                    .collect();
            if tried.iter().cloned().collect::<HashSet<_>>() == want {
                let listed = log_fields(&log, "server addresses");
                let servers = listed[0]["servers"].as_str().unwrap().to_string();
                for w in &want {
                    assert!(servers.contains(w.as_str()), "{servers} lacks {w}");
                }
                firsts.push(tried[0].clone());
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "an agent did not try every server; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for (_, mut child) in agents {
        let _ = child.kill();
        let _ = child.wait();
    }
    // 12 random starts over 3 servers all on one: probability 3 / 3^12 (about 6 in a million).
    let distinct: HashSet<_> = firsts.iter().collect();
    assert!(
        distinct.len() >= 2,
        "every agent started on one server: {firsts:?}"
    );
}
