//! Integrity at rest: rows of the datastore edited, forged or copied with `sqlite3` while the
//! real server is stopped are refused when it starts again, never served, listed by
//! `integrity verify`, reported (log, audit, metric) and make `/ready` degraded; a datastore
//! written before record MACs is sealed once, audited, on upgrade.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use continuity_proto::agent::SyncAuthorizedEntriesRequest;
use continuity_tests::agent::TestAgent;
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::softhsm::{MODULE, SoftHsm};
use continuity_tests::{agent_client, free_port, http_get, uid};
use tonic::Code;

const ALIAS: &str = "spiffe://example.org/node/integrity";

fn db(s: &TestServer) -> PathBuf {
    s.dir.join("data").join("datastore.sqlite3")
}

/// Runs SQL on the server's SQLite file with the `sqlite3` CLI.
fn sql(db: &Path, q: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(q).output().unwrap();
    assert!(
        out.status.success(),
        "sqlite3 {q}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn wait_for<F: FnMut() -> bool>(secs: u64, what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {secs}s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `integrity verify --output json`: (exit ok, parsed report).
fn verify_json(s: &TestServer) -> (bool, serde_json::Value) {
    let out = s.cli(&["integrity", "verify", "--output", "json"]);
    let v = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("integrity verify JSON: {e}: {}", stdout(&out)));
    (out.status.success(), v)
}

/// The (table, key) of every bad row `integrity verify` lists.
fn bad_rows(v: &serde_json::Value) -> Vec<(String, String)> {
    v["bad_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["table"].as_str().unwrap().to_string(),
                b["key"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn has_bad(v: &serde_json::Value, table: &str, key: &str) -> bool {
    bad_rows(v).iter().any(|(t, k)| t == table && k == key)
}

/// A self-signed CA certificate nobody in this trust domain made.
fn foreign_ca() -> (Vec<u8>, Vec<u8>) {
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&kp).unwrap();
    (
        cert.der().to_vec(),
        rcgen::PublicKeyData::subject_public_key_info(&kp),
    )
}

#[test]
fn forged_ca_row_and_copied_entry_are_refused_listed_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (health, metrics) = (free_port(), free_port());
    let opts = ServerOptions {
        extra_toml: format!(
            "[health]\nbind_address = \"127.0.0.1:{health}\"\n[metrics]\nbind_address = \"127.0.0.1:{metrics}\"\n"
        ),
        ..Default::default()
    };
    let mut s = TestServer::start(&dir.path().join("server"), opts);
    let id = s.create_entry(
        "spiffe://example.org/web",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    // A clean datastore: exit 0 and every row intact.
    let out = s.cli(&["integrity", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(
        text.starts_with("Integrity: all ") && text.contains(" rows intact"),
        "{text}"
    );
    let (ok, v) = verify_json(&s);
    assert!(
        ok && v["intact"] == true && v["rows"].as_u64().unwrap() >= 4,
        "{v}"
    );
    assert_eq!(http_get(health, "/ready").0, 200);
    let bundle_before = s.bundle_der();

    s.stop();
    let (cert, spki) = foreign_ca();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // A retired CA row is published in the bundle; the attacker cannot compute its MAC.
    sql(
        &db(&s),
        &format!(
            "INSERT INTO ca_keys (key_id, purpose, state, key_type, cert_der, public_key, kid, not_before, not_after, mac)
             VALUES ('forged', 'x509', 'retired', 'ec-p256', X'{}', X'{}', '', {}, {}, zeroblob(32))",
            hex::encode(&cert),
            hex::encode(&spki),
            now - 60,
            now + 86_400
        ),
    );
    // An intact entry row copied, MAC and all, under another id.
    sql(
        &db(&s),
        &format!(
            "INSERT INTO entries (id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, hint, admin, engine, federates_with, revision, created_at, mac)
             SELECT 'copied', spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, hint, admin, engine, federates_with, revision + 100, created_at, mac
             FROM entries WHERE id = '{id}'"
        ),
    );
    s.spawn();

    let bundle = s.bundle_der();
    assert!(
        !bundle.contains(&cert),
        "the forged CA is not in the bundle"
    );
    assert_eq!(bundle, bundle_before);
    let listed = s.cli_ok(&["entry", "show", "--output", "json"]);
    assert!(
        listed.contains(&id) && !listed.contains("copied"),
        "{listed}"
    );

    // Listed by verify (exit non-zero), in text and in JSON.
    let out = s.cli(&["integrity", "verify"]);
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("ca_keys forged: record MAC does not match the row")
            && text.contains("entries copied: record MAC does not match the row"),
        "{text}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("2 of "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, v) = verify_json(&s);
    assert!(!ok && v["intact"] == false, "{v}");
    assert!(
        has_bad(&v, "ca_keys", "forged") && has_bad(&v, "entries", "copied"),
        "{v}"
    );
    assert_eq!(bad_rows(&v).len(), 2, "{v}");

    // Reported: /ready degraded, the gauge, the log (table and key, no content), the audit log.
    let (status, body) = http_get(health, "/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("degraded: 2 datastore row"), "{body}");
    let (_, m) = http_get(metrics, "/metrics");
    assert!(m.contains("continuity_integrity_bad_rows 2"), "{m}");
    let log = s.log();
    assert!(
        log.contains("failed its integrity check") && log.contains("forged"),
        "{log}"
    );
    assert!(
        !log.contains(&hex::encode(&cert)),
        "no row content in the log"
    );
    wait_for(10, "bad rows audited", || {
        let a = s.cli_ok(&["audit", "show"]);
        a.contains("integrity.bad_row")
            && a.contains("ca_keys/forged")
            && a.contains("entries/copied")
    });

    // The operator removes the forged rows: the next verify finds all intact, /ready recovers.
    sql(&db(&s), "DELETE FROM ca_keys WHERE key_id = 'forged'");
    sql(&db(&s), "DELETE FROM entries WHERE id = 'copied'");
    let (ok, v) = verify_json(&s);
    assert!(ok && v["intact"] == true, "{v}");
    assert_eq!(http_get(health, "/ready").0, 200);
}

#[tokio::test]
async fn reparented_entry_is_not_served_and_a_lifted_ban_still_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    let good = s.create_entry("spiffe://example.org/good", ALIAS, &["unix:uid:1"]);
    let other = s.create_entry(
        "spiffe://example.org/payroll",
        "spiffe://example.org/node/elsewhere",
        &["unix:uid:1"],
    );
    let mut a = agent_client::attest(&s.addr, s.bundle_der(), &s.token(Some(ALIAS)))
        .await
        .unwrap();
    let mut b = agent_client::attest(&s.addr, s.bundle_der(), &s.token(None))
        .await
        .unwrap();
    s.cli_ok(&["agent", "ban", "--spiffe-id", &b.id]);

    s.stop();
    // Grant the payroll identity to node A, and lift B's ban.
    sql(
        &db(&s),
        &format!(
            "UPDATE entries SET parent_id = '{ALIAS}', revision = revision + 1000 WHERE id = '{other}'"
        ),
    );
    sql(
        &db(&s),
        &format!("UPDATE agents SET banned = 0 WHERE spiffe_id = '{}'", b.id),
    );
    s.spawn();

    a.client = agent_client::authenticated(&s.addr, s.bundle_der(), &a.chain, &a.key).await;
    let sync = a
        .client
        .sync_authorized_entries(SyncAuthorizedEntriesRequest {
            since_revision: 0,
            serving: None,
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = sync.entries.iter().map(|e| e.id.as_str()).collect();
    assert!(ids.contains(&good.as_str()), "{ids:?}");
    assert!(
        !ids.contains(&other.as_str()),
        "the re-parented entry is not served: {ids:?}"
    );

    b.client = agent_client::authenticated(&s.addr, s.bundle_der(), &b.chain, &b.key).await;
    let e = b
        .client
        .sync_authorized_entries(SyncAuthorizedEntriesRequest {
            since_revision: 0,
            serving: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    // The admin API does not show it unbanned either: it names the failed check (DataLoss),
    // rather than saying the agent does not exist.
    let out = s.cli(&["agent", "show", "--spiffe-id", &b.id, "--output", "json"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("integrity check"), "{err}");
    assert!(!err.contains("not found"), "{err}");
    let out = s.cli(&["entry", "show", "--id", &other]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("integrity check"),
        "{err}"
    );

    let (ok, v) = verify_json(&s);
    assert!(!ok, "{v}");
    assert!(
        has_bad(&v, "entries", &other) && has_bad(&v, "agents", &b.id),
        "{v}"
    );
}

/// A server with Engine `ledger` (tier 1, transit) and its sign key `signing` at versions 1
/// (disabled) and 2, and an agent whose workload (this test) is bound to it.
fn engine_setup(dir: &Path) -> (TestServer, TestAgent) {
    let s = TestServer::start(&dir.join("server"), ServerOptions::default());
    s.cli_ok(&["engine", "create", "ledger", "--tier", "1"]);
    s.cli_ok(&[
        "engine",
        "key",
        "create",
        "ledger",
        "signing",
        "--purpose",
        "sign",
    ]);
    s.cli_ok(&["engine", "key", "rotate", "ledger", "signing"]);
    s.cli_ok(&[
        "engine",
        "key",
        "disable",
        "ledger",
        "signing",
        "--version",
        "1",
    ]);
    s.create_entry_with_engine(ALIAS, &format!("unix:uid:{}", uid()), "ledger");
    let agent = TestAgent::start(&dir.join("agent"), &s, &s.token(Some(ALIAS)));
    wait_for(20, "Engine bound", || {
        agent.cli(&["engine", "jwks"]).status.success()
    });
    (s, agent)
}

const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

#[test]
fn custody_switched_from_transit_to_kv_does_not_export_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, agent) = engine_setup(dir.path());
    // Transit custody: the key never leaves the server.
    let out = agent.cli(&["engine", "secret", "signing"]);
    assert!(!out.status.success());
    s.stop();
    sql(
        &db(&s),
        "UPDATE engines SET custody = 'kv' WHERE name = 'ledger'",
    );
    sql(
        &db(&s),
        "UPDATE engine_keys SET custody = 'kv' WHERE engine = 'ledger' AND name = 'signing'",
    );
    s.spawn();
    let out = agent.cli(&["engine", "secret", "signing"]);
    assert!(
        !out.status.success(),
        "key material exported: {}",
        stdout(&out)
    );
    assert!(stdout(&out).is_empty());
    let (ok, v) = verify_json(&s);
    assert!(!ok, "{v}");
    assert!(
        has_bad(&v, "engines", "ledger") && has_bad(&v, "engine_keys", "ledger/signing"),
        "{v}"
    );
    assert!(s.log().contains("failed its integrity check"));
}

#[test]
fn a_disabled_key_version_re_enabled_in_the_datastore_stays_unusable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, agent) = engine_setup(dir.path());
    let sign_v1 = [
        "engine",
        "sign",
        "--key",
        "signing",
        "--digest",
        DIGEST,
        "--version",
        "1",
    ];
    assert!(!agent.cli(&sign_v1).status.success(), "v1 is disabled");
    let sign_v2 = [
        "engine",
        "sign",
        "--key",
        "signing",
        "--digest",
        DIGEST,
        "--version",
        "2",
    ];
    assert!(agent.cli(&sign_v2).status.success());
    s.stop();
    sql(
        &db(&s),
        "UPDATE engine_key_versions SET state = 'ENABLED' WHERE engine = 'ledger' AND key_name = 'signing' AND version = 1",
    );
    s.spawn();
    let out = agent.cli(&sign_v1);
    assert!(!out.status.success(), "signed with v1: {}", stdout(&out));
    // The intact version still works.
    let out = agent.cli(&sign_v2);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, v) = verify_json(&s);
    assert!(
        !ok && has_bad(&v, "engine_key_versions", "ledger/signing/1"),
        "{v}"
    );
    assert_eq!(bad_rows(&v).len(), 1, "{v}");
}

/// Turns the server's datastore back into one made before migration 5 (record MACs).
fn downgrade_to_before_record_macs(db: &Path) {
    for t in [
        "entries",
        "entry_tombstones",
        "join_tokens",
        "agents",
        "ca_keys",
        "meta",
        "engines",
        "engine_keys",
        "engine_key_versions",
        "engine_secrets",
        "incarnations",
    ] {
        sql(db, &format!("ALTER TABLE {t} DROP COLUMN mac"));
    }
    sql(db, "DELETE FROM meta WHERE name = 'record_macs_sealed'");
    sql(db, "DELETE FROM schema_migrations WHERE version = 5");
}

#[test]
fn an_old_datastore_is_sealed_once_on_upgrade_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    let id = s.create_entry("spiffe://example.org/old", ALIAS, &["unix:uid:7"]);
    s.cli_ok(&["engine", "create", "books", "--tier", "2"]);
    s.cli_ok(&["engine", "key", "create", "books", "k", "--purpose", "sign"]);
    s.token(None);
    s.stop();
    downgrade_to_before_record_macs(&db(&s));
    let rows: u64 = sql(
        &db(&s),
        "SELECT (SELECT count(*) FROM entries) + (SELECT count(*) FROM join_tokens) + (SELECT count(*) FROM ca_keys) + 1 + (SELECT count(*) FROM engines) + (SELECT count(*) FROM engine_keys) + (SELECT count(*) FROM engine_key_versions)",
    )
    .trim()
    .parse()
    .unwrap();

    s.spawn();
    let audit = s.cli_ok(&["audit", "show"]);
    assert!(
        audit.contains("integrity.upgrade")
            && audit.contains(&format!("ok: sealed {rows} existing rows with record MACs")),
        "{audit}"
    );
    let (ok, v) = verify_json(&s);
    assert!(ok, "{v}");
    assert_eq!(v["rows"].as_u64().unwrap(), rows, "{v}");
    assert!(
        s.cli_ok(&["entry", "show"]).contains(&id),
        "the upgraded entries are served"
    );
    assert!(s.log().contains("datastore upgraded to record MACs"));

    // Once only: a later start seals nothing, and a MAC set to NULL is now a bad row.
    s.stop();
    sql(
        &db(&s),
        &format!("UPDATE entries SET mac = NULL WHERE id = '{id}'"),
    );
    s.spawn();
    let audit = s.cli_ok(&["audit", "show"]);
    assert_eq!(audit.matches("integrity.upgrade").count(), 1, "{audit}");
    let out = s.cli(&["integrity", "verify"]);
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains(&format!("entries {id}: no record MAC")),
        "{}",
        stdout(&out)
    );
    assert!(
        !s.cli_ok(&["entry", "show"]).contains(&id),
        "an unsealed row is not served"
    );
}

#[test]
fn record_macs_with_a_pkcs11_key_survive_restart_and_catch_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::new(&dir.path().join("hsm"), "integrity");
    let opts = ServerOptions {
        extra_toml: format!(
            "[key_manager]\nkind = \"pkcs11\"\nmodule = \"{MODULE}\"\ntoken_label = \"{}\"\npin_env = \"CONTINUITY_TEST_PIN\"\n",
            hsm.label
        ),
        env: vec![
            ("SOFTHSM2_CONF".into(), hsm.conf.display().to_string()),
            ("CONTINUITY_TEST_PIN".into(), hsm.pin.clone()),
        ],
        ..Default::default()
    };
    let mut s = TestServer::start(&dir.path().join("server"), opts);
    let id = s.create_entry("spiffe://example.org/hsm", ALIAS, &["unix:uid:9"]);
    // The MAC key lives in the token: after a restart every row still verifies.
    s.restart();
    let (ok, v) = verify_json(&s);
    assert!(ok, "{v}");
    assert!(s.cli_ok(&["entry", "show"]).contains(&id));
    s.stop();
    sql(
        &db(&s),
        &format!("UPDATE entries SET admin = 1 WHERE id = '{id}'"),
    );
    s.spawn();
    let (ok, v) = verify_json(&s);
    assert!(!ok && has_bad(&v, "entries", &id), "{v}");
}
