//! SPIFFE federation across two trust domains with the real binaries: foreign bundles stored
//! through the admin CLI (parsed as hostile input, record-MACed, audited), entries that
//! federate only with a known bundle, and a bundle in use that cannot be deleted.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::process::Output;

use continuity_tests::federation::server_in;
use continuity_tests::server::{ServerOptions, TestServer};

const OTHER: &str = "spiffe://other.org";

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must fail; returns its stderr.
fn refused(s: &TestServer, args: &[&str]) -> String {
    let o = s.cli(args);
    assert!(
        !o.status.success(),
        "{args:?} was accepted: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    stderr(&o)
}

fn list_json(s: &TestServer) -> serde_json::Value {
    serde_json::from_str(&s.cli_ok(&["bundle", "list", "--output", "json"])).unwrap()
}

fn federating_entry(s: &TestServer, td: &str) -> Output {
    s.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/fed",
        "--parent-id",
        "spiffe://example.org/node/fed",
        "--selector",
        "unix:uid:4242",
        "--federates-with",
        td,
        "--output",
        "json",
    ])
}

#[test]
fn foreign_bundles_are_parsed_stored_audited_and_guard_entries() {
    let dir = tempfile::tempdir().unwrap();
    let ours = TestServer::start(&dir.path().join("a"), ServerOptions::default());
    let theirs = server_in(&dir.path().join("b"), "other.org", ServerOptions::default());
    let pem = theirs.cli_ok(&["bundle", "show"]);
    let doc = theirs.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let (pem_file, doc_file, bad_file) = (
        files.join("other.pem"),
        files.join("other.json"),
        files.join("bad.pem"),
    );
    std::fs::write(&pem_file, &pem).unwrap();
    std::fs::write(&doc_file, &doc).unwrap();
    std::fs::write(
        &bad_file,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();

    // Federating with an unknown trust domain is refused, with the reason.
    let o = federating_entry(&ours, OTHER);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("InvalidArgument") && stderr(&o).contains("no bundle of trust domain"),
        "{}",
        stderr(&o)
    );

    // A bad file is refused naming it, and nothing is written.
    let e = refused(
        &ours,
        &["bundle", "set", "--id", OTHER, "--path", &path(&bad_file)],
    );
    assert!(
        e.contains(&path(&bad_file))
            && e.contains("InvalidArgument")
            && e.contains("certificate 0"),
        "{e}"
    );
    let e = refused(
        &ours,
        &[
            "bundle",
            "set",
            "--id",
            OTHER,
            "--path",
            &path(&pem_file),
            "--format",
            "spiffe",
        ],
    );
    assert!(e.contains("SPIFFE bundle"), "PEM read as JSON: {e}");
    let e = refused(
        &ours,
        &[
            "bundle",
            "set",
            "--id",
            OTHER,
            "--path",
            &path(&files.join("missing")),
        ],
    );
    assert!(e.contains("missing"), "{e}");
    assert_eq!(list_json(&ours)["bundles"], serde_json::json!([]));
    // Our own trust domain's bundle is the CA's, never a foreign one.
    let e = refused(
        &ours,
        &[
            "bundle",
            "set",
            "--id",
            "spiffe://example.org",
            "--path",
            &path(&pem_file),
        ],
    );
    assert!(e.contains("own trust domain"), "{e}");

    // PEM, then the SPIFFE document (adds the JWT key, sequence and refresh hint).
    ours.cli_ok(&["bundle", "set", "--id", OTHER, "--path", &path(&pem_file)]);
    assert_eq!(ours.cli_ok(&["bundle", "show", "--id", OTHER]), pem);
    let l = list_json(&ours);
    assert_eq!(l["bundles"][0]["trust_domain"], OTHER);
    assert_eq!(l["bundles"][0]["x509_authorities"], 1);
    assert_eq!(l["bundles"][0]["jwt_authorities"], 0);
    ours.cli_ok(&[
        "bundle",
        "set",
        "--id",
        "other.org",
        "--path",
        &path(&doc_file),
        "--format",
        "spiffe",
    ]);
    let l = list_json(&ours);
    assert_eq!(l["bundles"].as_array().unwrap().len(), 1, "{l}");
    assert_eq!(l["bundles"][0]["jwt_authorities"], 1);
    let theirs_doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let shown: serde_json::Value = serde_json::from_str(
        &ours.cli_ok(&["bundle", "show", "--id", OTHER, "--format", "spiffe"]),
    )
    .unwrap();
    assert_eq!(
        shown, theirs_doc,
        "the stored bundle is the document as given"
    );

    // Now an entry may federate with it, and the bundle cannot be deleted under it.
    let o = federating_entry(&ours, OTHER);
    assert!(o.status.success(), "{}", stderr(&o));
    let entry: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = entry["id"].as_str().unwrap();
    assert_eq!(entry["federates_with"], serde_json::json!([OTHER]));
    let e = refused(&ours, &["bundle", "delete", "--id", OTHER]);
    assert!(e.contains("FailedPrecondition") && e.contains(id), "{e}");

    // It survives a restart (read back through its record MAC), and integrity verify checks it.
    let mut ours = ours;
    ours.restart();
    assert_eq!(ours.cli_ok(&["bundle", "show", "--id", OTHER]), pem);
    let v: serde_json::Value =
        serde_json::from_str(&ours.cli_ok(&["integrity", "verify", "--output", "json"])).unwrap();
    assert_eq!(v["bad_rows"], serde_json::json!([]), "{v}");

    ours.cli_ok(&["entry", "delete", "--id", id]);
    ours.cli_ok(&["bundle", "delete", "--id", OTHER]);
    assert_eq!(list_json(&ours)["bundles"], serde_json::json!([]));
    let e = refused(&ours, &["bundle", "show", "--id", OTHER]);
    assert!(e.contains("NotFound"), "{e}");
    let audit = ours.cli_ok(&["audit", "show"]);
    assert_eq!(audit.matches("bundle.set").count(), 2, "{audit}");
    assert_eq!(audit.matches("bundle.delete").count(), 1, "{audit}");

    // A row edited in the datastore is held back and listed, never served.
    ours.cli_ok(&["bundle", "set", "--id", OTHER, "--path", &path(&pem_file)]);
    ours.stop();
    let db = ours.dir.join("data").join("datastore.sqlite3");
    let o = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("UPDATE foreign_bundles SET updated_at = updated_at + 1")
        .output()
        .unwrap();
    assert!(o.status.success(), "sqlite3: {}", stderr(&o));
    ours.spawn();
    let e = refused(&ours, &["bundle", "show", "--id", OTHER]);
    assert!(e.contains("NotFound"), "{e}");
    let o = ours.cli(&["integrity", "verify", "--output", "json"]);
    assert!(
        !o.status.success(),
        "a tampered bundle row passed integrity verify"
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["bad_rows"][0]["table"], "foreign_bundles", "{v}");
    assert_eq!(v["bad_rows"][0]["key"], "other.org", "{v}");
}
