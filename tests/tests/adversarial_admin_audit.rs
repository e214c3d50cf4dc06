//! Adversarial suite, admin writes: an admin write and its audit record commit together. With
//! the audit log refusing appends (a trigger on audit_log in the real server's SQLite file),
//! no entry, token, ban, eviction or Engine change may be applied, in memory or on disk, and
//! the admin call fails naming the audit log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::process::Command;

use continuity_tests::agent_client::attest;
use continuity_tests::server::{ServerOptions, TestServer};

fn sql(db: &std::path::Path, q: &str) {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()",
        ])
        .arg(db)
        .arg(q)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn refused(s: &TestServer, args: &[&str]) {
    let out = s.cli(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} must fail");
    assert!(
        err.contains("Unavailable") && err.contains("audit log"),
        "{args:?}: {err}"
    );
}

fn json(s: &TestServer, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    serde_json::from_str(&s.cli_ok(&a)).unwrap()
}

#[tokio::test]
async fn admin_writes_are_not_applied_when_their_audit_record_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    let agent = attest(&s.addr, s.bundle_der(), &s.token(None))
        .await
        .unwrap();
    let other = attest(&s.addr, s.bundle_der(), &s.token(None))
        .await
        .unwrap();
    s.cli_ok(&["engine", "create", "books", "--tier", "1"]);
    s.cli_ok(&["engine", "key", "create", "books", "k", "--purpose", "sign"]);
    let entry = s.create_entry(
        "spiffe://example.org/keep",
        "spiffe://example.org/node",
        &["unix:uid:1000"],
    );
    let audited = s.cli_ok(&["audit", "show"]).lines().count();

    let db = dir.path().join("server/data/datastore.sqlite3");
    sql(
        &db,
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'audit log is refusing appends (test)'); END",
    );

    refused(
        &s,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/new",
            "--parent-id",
            "spiffe://example.org/node",
            "--selector",
            "unix:uid:1001",
        ],
    );
    refused(
        &s,
        &[
            "entry",
            "update",
            "--id",
            &entry,
            "--spiffe-id",
            "spiffe://example.org/changed",
            "--parent-id",
            "spiffe://example.org/node",
            "--selector",
            "unix:uid:1000",
        ],
    );
    refused(&s, &["entry", "delete", "--id", &entry]);
    refused(&s, &["token", "generate"]);
    refused(&s, &["agent", "ban", "--spiffe-id", &agent.id]);
    refused(&s, &["agent", "evict", "--spiffe-id", &other.id]);
    refused(&s, &["engine", "create", "ledger", "--tier", "1"]);
    refused(
        &s,
        &[
            "engine",
            "key",
            "create",
            "books",
            "k2",
            "--purpose",
            "sign",
        ],
    );
    refused(&s, &["engine", "key", "rotate", "books", "k"]);

    let check = |s: &TestServer, when: &str| {
        let entries = json(s, &["entry", "show"]);
        let entries = entries["entries"].as_array().unwrap();
        assert_eq!(entries.len(), 1, "{when}: {entries:?}");
        assert_eq!(
            entries[0]["spiffe_id"], "spiffe://example.org/keep",
            "{when}"
        );
        let a = json(s, &["agent", "show", "--spiffe-id", &agent.id]);
        assert_eq!(a["banned"], false, "{when}: {a}");
        json(s, &["agent", "show", "--spiffe-id", &other.id]);
        let engines = s.cli_ok(&["engine", "list"]);
        assert!(!engines.contains("ledger"), "{when}: {engines}");
        let keys = s.cli_ok(&["engine", "key", "list", "books"]);
        assert!(!keys.contains("k2"), "{when}: {keys}");
    };
    check(&s, "index");
    // The agent that was not banned still works.
    let mut c = agent.client.clone();
    c.fetch_bundle(continuity_proto::agent::FetchBundleRequest {})
        .await
        .expect("ban was not applied");

    sql(&db, "DROP TRIGGER refuse_audit");
    s.restart();
    check(&s, "database");
    assert!(s.cli_ok(&["audit", "verify"]).contains("intact"));
    assert_eq!(
        s.cli_ok(&["audit", "show"]).lines().count(),
        audited,
        "no audit record of a refused write"
    );
    // And the chain continues where it was.
    s.cli_ok(&["agent", "ban", "--spiffe-id", &agent.id]);
    assert!(s.cli_ok(&["audit", "verify"]).contains("intact"));
    assert!(s.cli_ok(&["audit", "show"]).contains("agent.ban"));
}
