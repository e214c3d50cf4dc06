//! Forced rotation of the trust domain's authorities (`continuity-server authority ...`,
//! SPIRE's `localauthority`) with real servers and agents: prepare → activate → taint makes
//! every agent replace what the tainted key signed within one sync; revoke takes the key out
//! of the bundle of every server; wrong steps are refused with the right gRPC status.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::time::Duration;

use base64::Engine;
use continuity_tests::cluster::{
    Cluster, ClusterOptions, agent_state, wait_for, within, within_async,
};
use continuity_tests::server::TestServer;
use continuity_tests::{Env, fetch_x509, uid};

const ALIAS: &str = "spiffe://example.org/node/authority";
/// The test agent syncs every 500 ms; one sync, generously.
const ONE_SYNC: Duration = Duration::from_secs(15);

/// `authority KIND ARGS... --output json`, parsed.
fn authority(server: &TestServer, kind: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["authority", kind];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--output", "json"]);
    serde_json::from_str(&server.cli_ok(&all)).unwrap()
}

/// Runs `authority KIND ARGS...` expecting a refusal; returns stderr.
fn refused(server: &TestServer, kind: &str, args: &[&str]) -> String {
    let mut all = vec!["authority", kind];
    all.extend_from_slice(args);
    let out = server.cli(&all);
    assert!(
        !out.status.success(),
        "`authority {kind} {args:?}` was accepted"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The authority key identifier (lowercase hex) of a DER certificate (the first of a chain).
fn aki_hex(der: &[u8]) -> String {
    use x509_parser::extensions::ParsedExtension;
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| hex::encode(k.0))
            }
            _ => None,
        })
        .expect("an authority key identifier")
}

/// The subject key identifiers (lowercase hex, sorted) of every CA in a PEM bundle.
fn bundle_skis(pem: &str) -> Vec<String> {
    use x509_parser::extensions::ParsedExtension;
    continuity_common::x509::pem_decode_all("CERTIFICATE", pem)
        .unwrap()
        .iter()
        .map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
            cert.extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(k) => Some(hex::encode(k.0)),
                    _ => None,
                })
                .unwrap()
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// `ids`, sorted (as [`bundle_skis`] lists them).
fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// The issuer (AKI) of the leaf of every X509-SVID the Workload API serves now.
async fn served_issuers(e: &Env) -> Vec<String> {
    match fetch_x509(&e.agent).await {
        Ok(r) => r.svids.iter().map(|s| aki_hex(&s.x509_svid)).collect(),
        Err(_) => vec![],
    }
}

/// The issuer (AKI) of the agent's own SVID, from its state file.
fn agent_svid_issuer(e: &Env) -> String {
    let leaf = agent_state(&e.agent)["agent_svid"]["chain"][0]
        .as_str()
        .unwrap()
        .to_string();
    aki_hex(
        &base64::engine::general_purpose::STANDARD
            .decode(leaf)
            .unwrap(),
    )
}

/// The `kid` of a JWT-SVID.
fn kid_of(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let h: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    h["kid"].as_str().unwrap().to_string()
}

/// `authority KIND revoke --authority-id ID`, retried while live agents still block it (each
/// reports what it serves at its next sync); the JSON answer.
fn revoke_once_unserved(server: &TestServer, kind: &str, id: &str) -> serde_json::Value {
    within(
        ONE_SYNC,
        "the revoke accepted once no agent serves the key",
        || {
            let out = server.cli(&[
                "authority",
                kind,
                "revoke",
                "--authority-id",
                id,
                "--output",
                "json",
            ]);
            if out.status.success() {
                return Some(serde_json::from_slice(&out.stdout).unwrap());
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("cannot be revoked yet"),
                "revoke refused: {err}"
            );
            None
        },
    )
}

/// The agent's SPIFFE ID, from its state file.
fn agent_id(e: &Env) -> String {
    agent_state(&e.agent)["agent_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Sends `signal` (STOP or CONT) to the agent process.
fn signal_agent(e: &Env, signal: &str) {
    let pid = e.agent.pid().expect("the agent runs").to_string();
    let ok = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid}");
}

fn id_of(v: &serde_json::Value, key: &str) -> String {
    v[key]["authority_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no {key}.authority_id in {v}"))
        .to_string()
}

#[tokio::test]
async fn x509_taint_replaces_every_svid_within_one_sync_and_revoke_removes_the_key() {
    let e = continuity_tests::env(ALIAS);
    let me = format!("unix:uid:{}", uid());
    for w in ["a", "b", "c"] {
        e.server
            .create_entry(&format!("spiffe://example.org/w/{w}"), ALIAS, &[&me]);
    }
    let shown = authority(&e.server, "x509", &["show"]);
    let old = id_of(&shown, "active");
    assert_eq!(shown["active"]["state"], "active");
    assert!(
        shown.get("prepared").is_none() && shown.get("old").is_none(),
        "{shown}"
    );
    assert!(
        !old.is_empty() && old.chars().all(|c| c.is_ascii_hexdigit()),
        "{old}"
    );
    assert_eq!(old, old.to_lowercase());
    let issuers = within_async(ONE_SYNC, "three SVIDs", || async {
        let i = served_issuers(&e).await;
        (i.len() == 3).then_some(i)
    })
    .await;
    assert!(issuers.iter().all(|i| *i == old), "{issuers:?} vs {old}");
    assert_eq!(agent_svid_issuer(&e), old);

    // Prepare: published at once, not signing.
    let prepared = id_of(
        &authority(&e.server, "x509", &["prepare"]),
        "prepared_authority",
    );
    assert_ne!(prepared, old);
    assert_eq!(
        bundle_skis(&e.server.cli_ok(&["bundle", "show"])),
        sorted(vec![old.clone(), prepared.clone()])
    );
    let shown = authority(&e.server, "x509", &["show"]);
    assert_eq!(id_of(&shown, "prepared"), prepared);
    assert_eq!(shown["prepared"]["state"], "prepared");
    assert!(shown["prepared"]["expires_at"].as_i64().unwrap() > 0);

    // Wrong steps, each refused with its status.
    let err = refused(&e.server, "x509", &["activate", "--authority-id", &old]);
    assert!(err.contains("FailedPrecondition"), "{err}");
    let err = refused(&e.server, "x509", &["taint", "--authority-id", &old]);
    assert!(
        err.contains("FailedPrecondition") && err.contains("active"),
        "tainting the active key: {err}"
    );
    let err = refused(&e.server, "x509", &["taint", "--authority-id", "00ff"]);
    assert!(err.contains("NotFound"), "{err}");
    let err = refused(&e.server, "x509", &["activate", "--authority-id", ""]);
    assert!(err.contains("InvalidArgument"), "{err}");

    // Activate: the prepared key signs, the active one becomes old.
    let activated = authority(
        &e.server,
        "x509",
        &["activate", "--authority-id", &prepared],
    );
    assert_eq!(id_of(&activated, "activated_authority"), prepared);
    let shown = authority(&e.server, "x509", &["show"]);
    assert_eq!(id_of(&shown, "active"), prepared);
    assert_eq!(id_of(&shown, "old"), old);
    assert_eq!(shown["old"]["state"], "old");
    assert!(shown.get("prepared").is_none(), "{shown}");
    // The new active key cannot be tainted; the old one, untainted, cannot be revoked.
    let err = refused(&e.server, "x509", &["taint", "--authority-id", &prepared]);
    assert!(
        err.contains("FailedPrecondition"),
        "tainting the active key: {err}"
    );
    let err = refused(&e.server, "x509", &["revoke", "--authority-id", &old]);
    assert!(
        err.contains("FailedPrecondition") && err.contains("taint"),
        "revoking an untainted key: {err}"
    );
    // A malformed request is refused and audited too, under a shortened target.
    let huge = "ab".repeat(200);
    let err = refused(&e.server, "x509", &["taint", "--authority-id", &huge]);
    assert!(
        err.contains("InvalidArgument") && err.contains("256"),
        "{err}"
    );
    let audit = e.server.cli_ok(&["audit", "show", "--output", "json"]);
    let audit: serde_json::Value = serde_json::from_str(&audit).unwrap();
    let records = audit["records"].as_array().unwrap();
    let last = records
        .iter()
        .rev()
        .find(|r| r["action"] == "authority.x509.taint")
        .unwrap();
    assert_eq!(last["target"], "ab".repeat(32), "{last}");
    assert!(
        last["result"]
            .as_str()
            .unwrap()
            .contains("longer than 256 bytes"),
        "{last}"
    );

    // Taint the old key: every SVID it signed is replaced within one sync, the agent's own too.
    let tainted = authority(&e.server, "x509", &["taint", "--authority-id", &old]);
    assert_eq!(id_of(&tainted, "tainted_authority"), old);
    assert_eq!(tainted["tainted_authority"]["state"], "tainted");
    within_async(
        ONE_SYNC,
        "every workload SVID re-signed by the new authority",
        || async {
            let i = served_issuers(&e).await;
            (i.len() == 3 && i.iter().all(|i| *i == prepared)).then_some(())
        },
    )
    .await;
    wait_for(
        &e.agent,
        ONE_SYNC,
        "the agent SVID re-signed by the new authority",
        || (agent_svid_issuer(&e) == prepared).then_some(()),
    );
    let err = refused(&e.server, "x509", &["taint", "--authority-id", &old]);
    assert!(
        err.contains("FailedPrecondition") && err.contains("already"),
        "{err}"
    );

    // Revoke: gone from the bundle of the server and of the agent.
    let revoked = revoke_once_unserved(&e.server, "x509", &old);
    assert_eq!(id_of(&revoked, "revoked_authority"), old);
    assert_eq!(
        bundle_skis(&e.server.cli_ok(&["bundle", "show"])),
        vec![prepared.clone()]
    );
    let shown = authority(&e.server, "x509", &["show"]);
    assert!(shown.get("old").is_none(), "{shown}");
    within_async(
        ONE_SYNC,
        "the agent's bundle without the revoked key",
        || async {
            let r = fetch_x509(&e.agent).await.ok()?;
            let bundle = &r.svids.first()?.bundle;
            let (_, _, rest) = continuity_common::der::read_tlv(bundle).ok()?;
            (rest.is_empty() && aki_hex(&r.svids[0].x509_svid) == prepared).then_some(())
        },
    )
    .await;
    let err = refused(&e.server, "x509", &["revoke", "--authority-id", &old]);
    assert!(err.contains("NotFound"), "{err}");

    // Every step is in the audit log, and so are the refusals.
    let audit = e.server.cli_ok(&["audit", "show"]);
    for action in [
        "authority.x509.prepare",
        "authority.x509.activate",
        "authority.x509.taint",
        "authority.x509.revoke",
    ] {
        assert!(audit.contains(action), "{action} not audited:\n{audit}");
    }
    assert!(audit.contains("refused"), "refusals not audited:\n{audit}");
}

#[tokio::test]
async fn jwt_taint_refetches_cached_jwt_svids_and_revoke_removes_the_kid() {
    let e = continuity_tests::env(ALIAS);
    e.server.create_entry(
        "spiffe://example.org/w/jwt",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    let fetch = || {
        let out = e.agent.cli(&[
            "api",
            "fetch",
            "jwt",
            "--audience",
            "payments",
            "--output",
            "json",
        ]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["svids"][0]["svid"].as_str().map(str::to_string)
    };
    let first = wait_for(&e.agent, ONE_SYNC, "a JWT-SVID", fetch);
    let old = id_of(&authority(&e.server, "jwt", &["show"]), "active");
    assert_eq!(kid_of(&first), old);

    let prepared = id_of(
        &authority(&e.server, "jwt", &["prepare"]),
        "prepared_authority",
    );
    let jwks = e.server.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    assert!(jwks.contains(&prepared) && jwks.contains(&old), "{jwks}");
    authority(&e.server, "jwt", &["activate", "--authority-id", &prepared]);
    let err = refused(&e.server, "jwt", &["taint", "--authority-id", &prepared]);
    assert!(
        err.contains("FailedPrecondition"),
        "tainting the active JWT key: {err}"
    );
    let err = refused(&e.server, "jwt", &["revoke", "--authority-id", &old]);
    assert!(
        err.contains("FailedPrecondition"),
        "revoking an untainted JWT key: {err}"
    );
    // Activation alone: the agent keeps serving its cached token (valid, not tainted).
    assert_eq!(
        fetch().unwrap(),
        first,
        "the cached JWT-SVID is served until half-life"
    );

    authority(&e.server, "jwt", &["taint", "--authority-id", &old]);
    let fresh = wait_for(
        &e.agent,
        ONE_SYNC,
        "a JWT-SVID signed by the new key",
        || fetch().filter(|t| kid_of(t) == prepared),
    );
    assert_ne!(fresh, first);

    revoke_once_unserved(&e.server, "jwt", &old);
    let jwks = e.server.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    assert!(!jwks.contains(&old) && jwks.contains(&prepared), "{jwks}");
    let audit = e.server.cli_ok(&["audit", "show"]);
    for action in [
        "authority.jwt.prepare",
        "authority.jwt.activate",
        "authority.jwt.taint",
        "authority.jwt.revoke",
    ] {
        assert!(audit.contains(action), "{action} not audited:\n{audit}");
    }
}

#[tokio::test]
async fn revoke_waits_until_no_live_agent_serves_what_the_key_signed_unless_forced() {
    let e = continuity_tests::env(ALIAS);
    let me = format!("unix:uid:{}", uid());
    e.server
        .create_entry("spiffe://example.org/w/held", ALIAS, &[&me]);
    let old = id_of(&authority(&e.server, "x509", &["show"]), "active");
    within_async(
        ONE_SYNC,
        "an SVID signed by the first authority",
        || async { (served_issuers(&e).await == vec![old.clone()]).then_some(()) },
    )
    .await;
    let prepared = id_of(
        &authority(&e.server, "x509", &["prepare"]),
        "prepared_authority",
    );
    authority(
        &e.server,
        "x509",
        &["activate", "--authority-id", &prepared],
    );

    // A live agent that cannot sync (stopped, its SVID still valid) holds SVIDs the old key
    // signed: the revoke waits for it, naming it.
    signal_agent(&e, "STOP");
    authority(&e.server, "x509", &["taint", "--authority-id", &old]);
    let err = refused(&e.server, "x509", &["revoke", "--authority-id", &old]);
    assert!(
        err.contains("FailedPrecondition")
            && err.contains("cannot be revoked yet")
            && err.contains(&agent_id(&e))
            && err.contains("--force"),
        "revoke while an agent has not synced since the taint: {err}"
    );
    assert_eq!(
        bundle_skis(&e.server.cli_ok(&["bundle", "show"])),
        sorted(vec![old.clone(), prepared.clone()]),
        "a refused revoke leaves the bundle as it was"
    );

    // Once it syncs it replaces what the tainted key signed, reports so, and the revoke passes.
    signal_agent(&e, "CONT");
    within_async(
        ONE_SYNC,
        "the SVID re-signed by the new authority",
        || async { (served_issuers(&e).await == vec![prepared.clone()]).then_some(()) },
    )
    .await;
    revoke_once_unserved(&e.server, "x509", &old);
    assert_eq!(
        bundle_skis(&e.server.cli_ok(&["bundle", "show"])),
        vec![prepared.clone()]
    );

    // The same for a JWT key, this time forced past the stopped agent, and audited as forced.
    let jwt_old = id_of(&authority(&e.server, "jwt", &["show"]), "active");
    let jwt_new = id_of(
        &authority(&e.server, "jwt", &["prepare"]),
        "prepared_authority",
    );
    authority(&e.server, "jwt", &["activate", "--authority-id", &jwt_new]);
    signal_agent(&e, "STOP");
    authority(&e.server, "jwt", &["taint", "--authority-id", &jwt_old]);
    let err = refused(&e.server, "jwt", &["revoke", "--authority-id", &jwt_old]);
    assert!(err.contains("cannot be revoked yet"), "{err}");
    let forced = authority(
        &e.server,
        "jwt",
        &["revoke", "--authority-id", &jwt_old, "--force"],
    );
    signal_agent(&e, "CONT");
    assert_eq!(id_of(&forced, "revoked_authority"), jwt_old);
    let jwks = e.server.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    assert!(
        !jwks.contains(&jwt_old) && jwks.contains(&jwt_new),
        "{jwks}"
    );
    let audit = e.server.cli_ok(&["audit", "show"]);
    assert!(
        audit.contains("authority.jwt.revoke.forced"),
        "forced revoke not audited:\n{audit}"
    );
    assert!(
        audit.contains("authority.x509.revoke") && audit.contains("cannot be revoked yet"),
        "the waiting revoke and its refusal not audited:\n{audit}"
    );
}

#[tokio::test]
async fn revoke_removes_the_key_from_the_bundle_of_every_server_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::launch(
        dir.path(),
        2,
        &ClusterOptions::on(&continuity_tests::postgres::database()),
    );
    let (a, b) = (c.server(0), c.server(1));
    let old = id_of(&authority(a, "x509", &["show"]), "active");
    assert_eq!(id_of(&authority(b, "x509", &["show"]), "active"), old);
    // The steps on server B, the result on both.
    let prepared = id_of(&authority(b, "x509", &["prepare"]), "prepared_authority");
    authority(b, "x509", &["activate", "--authority-id", &prepared]);
    authority(b, "x509", &["taint", "--authority-id", &old]);
    within(
        Duration::from_secs(20),
        "server A's bundle carries the new key",
        || {
            (bundle_skis(&a.cli_ok(&["bundle", "show"]))
                == sorted(vec![old.clone(), prepared.clone()]))
            .then_some(())
        },
    );
    let shown = authority(a, "x509", &["show"]);
    assert_eq!(id_of(&shown, "active"), prepared);
    assert_eq!(shown["old"]["state"], "tainted");
    authority(b, "x509", &["revoke", "--authority-id", &old]);
    within(
        Duration::from_secs(20),
        "the revoked key gone from every server's bundle",
        || {
            c.bundles()
                .iter()
                .all(|pem| bundle_skis(pem) == vec![prepared.clone()])
                .then_some(())
        },
    );
    let bundles = c.bundles();
    assert_eq!(bundles[0], bundles[1]);
}

#[tokio::test]
async fn py_spiffe_watching_x509_contexts_sees_the_rotation_without_a_failed_fetch() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let e = continuity_tests::env(ALIAS);
    e.server.create_entry(
        "spiffe://example.org/w/py",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    within_async(ONE_SYNC, "an SVID", || async {
        fetch_x509(&e.agent).await.ok()
    })
    .await;
    let old = id_of(&authority(&e.server, "x509", &["show"]), "active");
    let mut py = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/watch_rotation.py"))
        .arg(e.agent.endpoint())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 (py-spiffe: PyPI `spiffe`, scripts/setup installs it)");
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stdout = py.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let Ok(v) = serde_json::from_str(&line) else {
                break;
            };
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let mut seen = vec![];
    let mut next = |what: &str| {
        let v = rx
            .recv_timeout(ONE_SYNC)
            .unwrap_or_else(|_| panic!("py-spiffe: no update ({what}); so far {seen:?}"));
        assert!(
            v.get("error").is_none(),
            "py-spiffe saw a failed fetch: {v}; so far {seen:?}"
        );
        seen.push(v.clone());
        v
    };
    let first = next("the first context");
    assert_eq!(first["issuers"], serde_json::json!([old]));
    let prepared = id_of(
        &authority(&e.server, "x509", &["prepare"]),
        "prepared_authority",
    );
    authority(
        &e.server,
        "x509",
        &["activate", "--authority-id", &prepared],
    );
    authority(&e.server, "x509", &["taint", "--authority-id", &old]);
    // Updates until the SVID is signed by the new authority (the prepared key's arrival in
    // the bundle may come first, as its own update).
    loop {
        let v = next("the SVID signed by the new authority");
        if v["issuers"] == serde_json::json!([prepared]) {
            assert_eq!(
                v["authorities"], 2,
                "both authorities until the revoke: {v}"
            );
            break;
        }
        assert_eq!(v["issuers"], serde_json::json!([old]), "{v}");
    }
    revoke_once_unserved(&e.server, "x509", &old);
    loop {
        let v = next("the bundle without the revoked key");
        assert_eq!(v["issuers"], serde_json::json!([prepared]), "{v}");
        if v["authorities"] == 1 {
            break;
        }
    }
    drop(py.stdin.take());
    let status = py.wait().unwrap();
    assert!(
        status.success(),
        "py-spiffe watcher exited with {status}; updates {seen:?}"
    );
    // Nothing failed after the last update either.
    while let Ok(v) = rx.try_recv() {
        assert!(
            v.get("error").is_none(),
            "py-spiffe saw a failed fetch: {v}"
        );
    }
}
