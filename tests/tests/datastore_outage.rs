#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]
//! A datastore the server cannot write (issue 13 part 5): the SQLite file's write lock held by
//! another process (`sqlite3` in an open `BEGIN IMMEDIATE`: what a stuck maintenance job or a
//! long-running writer does). Reads go on (WAL), every write waits out `busy_timeout` and
//! fails. Against the real server and agent:
//!
//! - `/ready` stays 200 (the datastore answers reads; what the server serves from memory
//!   keeps working), workloads keep their SVIDs, syncs succeed;
//! - signing that needs no write goes on: the workload X509-SVID rotates, a new JWT-SVID is
//!   signed;
//! - writes fail with `Unavailable` and the datastore's reason: an admin `entry create`, and
//!   the agent SVID renewal, which the agent retries with back-off, keeping its SVID;
//! - once the lock is gone the renewal goes through and the server records it.
//!
//! A datastore that answers nothing at all makes `/ready` 503 through its ping: shown with
//! PostgreSQL closed to connections (SQLite, a file the server holds open, has no such state
//! short of disk errors).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use continuity_tests::agent::TestAgent;
use continuity_tests::cluster::{agent_id, agent_svid_serial, server_link, wait_for};
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::{fetch_x509, free_port, http_get, uid};

const ALIAS: &str = "spiffe://example.org/node/outage";
const ID: &str = "spiffe://example.org/outage/workload";

/// An admin write made during an outage.
const LATE_ENTRY: [&str; 8] = [
    "entry",
    "create",
    "--spiffe-id",
    "spiffe://example.org/outage/late",
    "--parent-id",
    ALIAS,
    "--selector",
    "unix:uid:4242",
];

/// A `sqlite3` process holding the datastore's write lock until released or dropped.
struct WriteLock(Child);

impl WriteLock {
    fn hold(db: &Path) -> Self {
        let mut child = Command::new("sqlite3")
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sqlite3 (Debian package sqlite3)");
        let stdin = child.stdin.as_mut().unwrap();
        // Wait for the server's own writes in flight, then take the lock and say so.
        writeln!(stdin, ".timeout 10000\nBEGIN IMMEDIATE;\nSELECT 'held';").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "held", "sqlite3 did not take the write lock");
        Self(child)
    }

    fn release(mut self) {
        let stdin = self.0.stdin.as_mut().unwrap();
        writeln!(stdin, "ROLLBACK;\n.quit").unwrap();
        drop(self.0.stdin.take());
        assert!(self.0.wait().unwrap().success());
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn served_serial(agent: &TestAgent) -> String {
    let r = fetch_x509(agent)
        .await
        .expect("the agent serves its X509-SVID");
    assert_eq!(r.svids[0].spiffe_id, ID);
    continuity_common::x509::serial_hex(&r.svids[0].x509_svid).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datastore_that_cannot_be_written_keeps_agents_served_and_fails_writes_with_unavailable()
{
    let dir = tempfile::tempdir().unwrap();
    let health = free_port();
    // SVIDs renew at 12-15 s, while the lock is held.
    let server = TestServer::start(
        &dir.path().join("server"),
        ServerOptions {
            x509_ttl: "30s".into(),
            extra_toml: format!("[health]\nbind_address = \"127.0.0.1:{health}\"\n"),
            ..Default::default()
        },
    );
    server.create_entry(ID, ALIAS, &[&format!("unix:uid:{}", uid())]);
    let token = server.token(Some(ALIAS));
    let metrics = free_port();
    let agent = TestAgent::start_with(
        &dir.path().join("agent"),
        &server,
        &token,
        &format!("[metrics]\nbind_address = \"127.0.0.1:{metrics}\"\n"),
    );
    let mut ready = false;
    for _ in 0..300 {
        if fetch_x509(&agent).await.is_ok_and(|r| !r.svids.is_empty())
            && server_link(metrics).connected
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "no first X509-SVID; agent log:\n{}", agent.log());
    let workload_before = served_serial(&agent).await;
    let agent_before = agent_svid_serial(&agent);
    let id = agent_id(&agent);
    let spiffe = spiffe::WorkloadApiClient::connect_to(&agent.endpoint())
        .await
        .unwrap();

    let lock = WriteLock::hold(&server.dir.join("data").join("datastore.sqlite3"));

    // Reads answer: ready.
    let (status, body) = http_get(health, "/ready");
    assert_eq!((status, body.trim()), (200, "ready"));

    // An admin write waits out busy_timeout, then fails with Unavailable and the reason.
    let out = tokio::task::block_in_place(|| server.cli(&LATE_ENTRY));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("Unavailable") && err.contains("locked"),
        "entry create during the outage: {err}"
    );

    // Signing needs no write: a JWT-SVID for a new audience is signed now.
    let jwt = spiffe.fetch_jwt_svid(["outage"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), ID);

    // The workload SVID rotates on schedule; the agent SVID renewal fails and is retried, the
    // agent keeps its SVID and keeps syncing; workloads are served throughout.
    let mut rotated = false;
    for _ in 0..400 {
        assert_eq!(
            agent_svid_serial(&agent),
            agent_before,
            "renewed while the datastore is locked"
        );
        let now = served_serial(&agent).await;
        if now != workload_before && agent.log().contains("agent SVID renewal failed") {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        rotated,
        "no workload SVID rotation and failed agent renewal during the outage; agent log:\n{}",
        agent.log()
    );
    assert!(server_link(metrics).connected, "syncs go on");
    let log = agent.log();
    let failed = log
        .lines()
        .find(|l| l.contains("agent SVID renewal failed"))
        .unwrap();
    assert!(
        failed.contains("Unavailable") && failed.contains("locked"),
        "the renewal failure names the reason: {failed}"
    );

    // The lock goes away: the next renewal goes through and the server records it.
    lock.release();
    let renewed = tokio::task::block_in_place(|| {
        wait_for(
            &agent,
            Duration::from_secs(90),
            "an agent SVID renewal after the outage",
            || {
                let s = agent_svid_serial(&agent);
                (s != agent_before).then_some(s)
            },
        )
    });
    let shown: serde_json::Value = serde_json::from_str(&server.cli_ok(&[
        "agent",
        "show",
        "--spiffe-id",
        &id,
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(shown["serial_number"].as_str(), Some(renewed.as_str()));
    tokio::task::block_in_place(|| {
        wait_for(
            &agent,
            Duration::from_secs(10),
            "a sync with the renewed SVID",
            || server_link(metrics).connected.then_some(()),
        )
    });
    served_serial(&agent).await;
}

/// Polls `/ready` on `port` until its status is `want`; returns the body.
fn ready_becomes(port: u16, want: u16, what: &str) -> String {
    for _ in 0..200 {
        let (status, body) = http_get(port, "/ready");
        if status == want {
            return body;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("/ready never answered {want} {what}");
}

/// A PostgreSQL datastore that answers nothing (its database closed to connections and the
/// server's sessions terminated: what a stopped or failed-over primary looks like): `/ready`
/// is 503 naming the datastore, workloads keep their SVIDs, a JWT-SVID is still signed (no
/// write), an admin write fails with Unavailable; once connections are allowed again `/ready`
/// is 200 and writes succeed, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgresql_makes_ready_503_while_agents_stay_served() {
    let pg = continuity_tests::postgres::cluster();
    let url = continuity_tests::postgres::database();
    let name = url.rsplit('/').next().unwrap().to_string();
    let admin = pg.url("postgres");
    let dir = tempfile::tempdir().unwrap();
    let health = free_port();
    let server = TestServer::start(
        &dir.path().join("server"),
        ServerOptions {
            extra_toml: format!(
                "[health]\nbind_address = \"127.0.0.1:{health}\"\n[datastore]\nurl = \"{url}\"\n"
            ),
            ..Default::default()
        },
    );
    server.create_entry(ID, ALIAS, &[&format!("unix:uid:{}", uid())]);
    let token = server.token(Some(ALIAS));
    let agent = TestAgent::start(&dir.path().join("agent"), &server, &token);
    let mut served = false;
    for _ in 0..300 {
        if fetch_x509(&agent).await.is_ok_and(|r| !r.svids.is_empty()) {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "no first X509-SVID; agent log:\n{}", agent.log());
    let before = served_serial(&agent).await;
    assert_eq!(http_get(health, "/ready").0, 200);

    pg.psql(
        &admin,
        &format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"),
    );
    pg.psql(
        &admin,
        &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"),
    );
    let body = tokio::task::block_in_place(|| ready_becomes(health, 503, "with PostgreSQL closed"));
    assert!(body.contains("datastore unavailable"), "{body}");

    // Served from what agent and server hold.
    assert_eq!(served_serial(&agent).await, before);
    let spiffe = spiffe::WorkloadApiClient::connect_to(&agent.endpoint())
        .await
        .unwrap();
    let jwt = spiffe.fetch_jwt_svid(["pg-outage"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), ID);
    let out = tokio::task::block_in_place(|| server.cli(&LATE_ENTRY));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Unavailable"),
        "entry create with PostgreSQL closed: {err}"
    );

    pg.psql(
        &admin,
        &format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"),
    );
    tokio::task::block_in_place(|| ready_becomes(health, 200, "after PostgreSQL came back"));
    tokio::task::block_in_place(|| server.cli_ok(&LATE_ENTRY));
    assert_eq!(served_serial(&agent).await, before);
}
