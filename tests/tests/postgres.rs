//! A real `continuity-server run` on PostgreSQL (`[datastore] url` on the test process's
//! throwaway cluster): an agent attests, a workload gets an X509-SVID through it, the server
//! restarts and serves the same bundle and entries from the database, `integrity verify` and
//! `audit verify` pass, and `backup create` from PostgreSQL restores into a fresh database.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use continuity_tests::agent::TestAgent;
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::{bin, fetch_x509, postgres, uid};

const ALIAS: &str = "spiffe://example.org/node/pg";

/// Polls `f` until it returns Some, for at most `secs`.
async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {secs}s: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn options(url: &str) -> ServerOptions {
    ServerOptions {
        extra_toml: format!("[datastore]\nurl = \"{url}\"\n"),
        ..Default::default()
    }
}

/// The SPIFFE IDs of the SVIDs the agent serves this process, once it serves `want`.
async fn svids_with(agent: &TestAgent, want: &str) -> Vec<String> {
    eventually(20, &format!("the agent serves {want}"), || async {
        let r = fetch_x509(agent).await.ok()?;
        let ids: Vec<String> = r.svids.iter().map(|s| s.spiffe_id.clone()).collect();
        ids.iter().any(|i| i == want).then_some(ids)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_postgresql_attests_serves_restarts_verifies_and_backs_up() {
    let url = postgres::database();
    let cluster = postgres::cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(&dir.path().join("server"), options(&url));
    // The state is in PostgreSQL, not in a SQLite file under data_dir.
    assert!(!s.dir.join("data/datastore.sqlite3").exists());
    let token = s.token(Some(ALIAS));
    let agent = TestAgent::start(&dir.path().join("agent"), &s, &token);
    let selector = format!("unix:uid:{}", uid());
    let entry_id = s.create_entry("spiffe://example.org/pg/workload", ALIAS, &[&selector]);
    let ids = svids_with(&agent, "spiffe://example.org/pg/workload").await;
    assert_eq!(ids, ["spiffe://example.org/pg/workload"]);
    let svid = fetch_x509(&agent).await.unwrap().svids.remove(0);
    let bundle = s.bundle_der();
    assert_eq!(
        svid.bundle,
        bundle.concat(),
        "the SVID carries the server's bundle"
    );
    let rows = cluster.psql(
        &url,
        &format!("SELECT spiffe_id FROM entries WHERE id = '{entry_id}'"),
    );
    assert_eq!(rows.trim(), "spiffe://example.org/pg/workload");
    let agents = cluster.psql(&url, "SELECT count(*) FROM agents WHERE banned = 0");
    assert_eq!(agents.trim(), "1");

    let entries = s.cli_ok(&["entry", "show", "--output", "json"]);
    let bundle_pem = s.cli_ok(&["bundle", "show"]);
    let agent_list = s.cli_ok(&["agent", "list", "--output", "json"]);
    s.restart();
    assert_eq!(
        s.cli_ok(&["bundle", "show"]),
        bundle_pem,
        "same bundle after a restart"
    );
    assert_eq!(s.cli_ok(&["entry", "show", "--output", "json"]), entries);
    assert_eq!(s.cli_ok(&["agent", "list", "--output", "json"]), agent_list);
    // The restarted server still serves the agent: a new entry reaches the workload.
    s.create_entry("spiffe://example.org/pg/after-restart", ALIAS, &[&selector]);
    let ids = svids_with(&agent, "spiffe://example.org/pg/after-restart").await;
    assert_eq!(ids.len(), 2, "{ids:?}");

    let integrity = s.cli(&["integrity", "verify"]);
    assert!(
        integrity.status.success(),
        "integrity verify: {}{}",
        String::from_utf8_lossy(&integrity.stdout),
        String::from_utf8_lossy(&integrity.stderr)
    );
    let audit = s.cli(&["audit", "verify"]);
    assert!(
        audit.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );
    assert!(
        cluster
            .psql(&url, "SELECT count(*) FROM audit_log")
            .trim()
            .parse::<u32>()
            .unwrap()
            >= 3,
        "admin actions are audited in PostgreSQL"
    );

    // backup create from PostgreSQL; restored into a fresh database, a second server serves
    // the same bundle and entries.
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let file = dir.path().join("backup.jsonl");
    s.cli_ok(&[
        "backup",
        "create",
        file.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("spiffe://example.org/pg/workload"),
        "the entries are in the backup"
    );
    s.stop();
    let target = postgres::database();
    let restored = TestServer::configure(&dir.path().join("restored"), options(&target));
    let out = Command::new(bin("continuity-server"))
        .args(["backup", "restore"])
        .arg(&file)
        .arg("--config")
        .arg(restored.dir.join("server.toml"))
        .arg("--passphrase-file")
        .arg(&pass)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "backup restore into PostgreSQL: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut restored = restored;
    restored.spawn();
    assert_eq!(restored.cli_ok(&["bundle", "show"]), bundle_pem);
    let restored_entries = restored.cli_ok(&["entry", "show", "--output", "json"]);
    assert!(restored_entries.contains("spiffe://example.org/pg/after-restart"));
    assert!(restored_entries.contains("spiffe://example.org/pg/workload"));
    assert!(restored.cli(&["integrity", "verify"]).status.success());
    assert!(restored.cli(&["audit", "verify"]).status.success());
}

/// A `[datastore] url` naming a database that does not exist stops the server at start-up
/// with a message naming it (the server does not create databases).
#[test]
fn a_missing_database_is_refused_at_start_naming_it() {
    let cluster = postgres::cluster();
    let url = cluster.url("no_such_database");
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::configure(&dir.path().join("server"), options(&url));
    let (ok, err) = s
        .run_until_exit(Duration::from_secs(30))
        .expect("the server kept running on a missing database");
    assert!(!ok);
    assert!(err.contains("no_such_database"), "{err}");
}

/// `sslmode=verify-full` with `sslrootcert`: the server's connections to PostgreSQL are TLS
/// (as PostgreSQL itself reports), and a cluster whose certificate the root does not sign is
/// refused at start-up.
#[test]
fn tls_to_postgresql_is_used_and_verified() {
    let cluster = postgres::cluster();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    cluster.enable_tls(&cert.cert.pem(), &cert.signing_key.serialize_pem());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, cert.cert.pem()).unwrap();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        postgres::database(),
        root.display()
    );
    let db = url
        .split('?')
        .next()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let s = TestServer::start(&dir.path().join("server"), options(&url));
    s.token(None);
    let tls = cluster.psql(
        &cluster.url("postgres"),
        &format!(
            "SELECT s.ssl, count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = '{db}' GROUP BY s.ssl"
        ),
    );
    let lines: Vec<&str> = tls.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("t|"),
        "every connection of the server is TLS (ssl|count): {tls}"
    );
    drop(s);

    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let wrong = dir.path().join("wrong.pem");
    std::fs::write(&wrong, other.cert.pem()).unwrap();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        postgres::database(),
        wrong.display()
    );
    let s = TestServer::configure(&dir.path().join("refused"), options(&url));
    let (ok, err) = s
        .run_until_exit(Duration::from_secs(30))
        .expect("the server kept running against an unverified PostgreSQL");
    assert!(!ok);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

/// Helper run as a child process by the test below: starts this process's cluster, says
/// where it is, and waits to be killed.
#[test]
#[ignore = "helper: run by a_killed_test_process_leaves_no_postgres_behind"]
fn helper_start_a_cluster_and_wait() {
    use std::io::Write as _;
    let c = postgres::cluster();
    println!("CLUSTER {}", c.dir().display());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

/// A test process killed with SIGKILL (no destructor, no exit handler runs) leaves no
/// postgres process and no cluster directory behind.
#[test]
fn a_killed_test_process_leaves_no_postgres_behind() {
    use std::io::BufRead as _;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_start_a_cluster_and_wait",
            "--ignored",
            "--nocapture",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let dir = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("CLUSTER ").map(std::path::PathBuf::from))
        .expect("the helper did not start a cluster");
    let pid_file = std::fs::read_to_string(dir.join("data/postmaster.pid")).unwrap();
    let postmaster = pid_file.lines().next().unwrap().trim().to_string();
    assert!(Path::new(&format!("/proc/{postmaster}")).exists());
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{postmaster}")).exists() || dir.exists() {
        assert!(
            Instant::now() < deadline,
            "postgres {postmaster} or {} outlived the killed test process",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
