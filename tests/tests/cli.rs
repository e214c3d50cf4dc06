//! The `continuity-server` command line: config errors, admin commands, health endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::process::Command;

use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::{bin, free_port};

fn run_with_config(dir: &std::path::Path, toml: &str) -> (bool, String) {
    let cfg = dir.join("server.toml");
    std::fs::write(&cfg, toml).unwrap();
    let out = Command::new(bin("continuity-server"))
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn bad_config_fails_naming_the_key_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let base = format!(
        "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n",
        data.display()
    );
    let cases = [
        ("bogus_key = 1\n", "bogus_key"),
        ("ca_key_type = \"dsa\"\n", "ca_key_type"),
        ("ca_ttl = \"sometime\"\n", "ca_ttl"),
        ("bind_address = \"nowhere\"\n", "bind_address"),
        ("default_x509_svid_ttl = \"48h\"\n", "default_x509_svid_ttl"),
        ("[datastore]\nurl = \"mysql://x\"\n", "datastore.url"),
        ("[key_manager]\nkind = \"vault\"\n", "key_manager.kind"),
        (
            "[key_manager]\nkind = \"pkcs11\"\nmodule = \"/x.so\"\ntoken_label = \"t\"\npin = \"1234\"\n",
            "key_manager.pin",
        ),
        (
            "[key_manager]\nkind = \"pkcs11\"\ntoken_label = \"t\"\npin_env = \"P\"\n",
            "key_manager.module",
        ),
        ("log_level = \"loud\"\n", "log_level"),
    ];
    for (extra, key) in cases {
        let (ok, err) = run_with_config(dir.path(), &format!("{base}{extra}"));
        assert!(!ok, "{extra:?} should fail");
        assert!(
            err.contains(key),
            "error for {extra:?} should name {key}: {err}"
        );
    }
    let (ok, err) = run_with_config(dir.path(), "data_dir = \"/tmp/x\"\n");
    assert!(!ok && err.contains("trust_domain"), "{err}");
    assert!(!data.exists(), "a refused config must not create state");
}

#[test]
fn pkcs11_start_failure_is_clear() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = continuity_tests::softhsm::SoftHsm::new(&dir.path().join("hsm"), "real-token");
    let cfg = format!(
        "trust_domain = \"example.org\"\ndata_dir = \"{}\"\nadmin_socket = \"{}\"\nbind_address = \"127.0.0.1:{}\"\n[key_manager]\nkind = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"no-such-token\"\npin_env = \"PIN\"\n",
        dir.path().join("data").display(),
        dir.path().join("admin/admin.sock").display(),
        free_port(),
        continuity_tests::softhsm::MODULE
    );
    std::fs::write(dir.path().join("server.toml"), cfg).unwrap();
    let out = Command::new(bin("continuity-server"))
        .args(["run", "--config"])
        .arg(dir.path().join("server.toml"))
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env("PIN", &hsm.pin)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no token labelled \"no-such-token\""), "{err}");
}

#[test]
fn entry_lifecycle_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    let parent = "spiffe://example.org/continuity/agent/join_token/abc";
    let id = s.create_entry(
        "spiffe://example.org/web",
        parent,
        &["unix:uid:1000", "unix:gid:1000"],
    );

    let shown: serde_json::Value =
        serde_json::from_str(&s.cli_ok(&["entry", "show", "--id", &id, "--output", "json"]))
            .unwrap();
    let e = &shown["entries"][0];
    assert_eq!(e["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(e["selectors"].as_array().unwrap().len(), 2);

    // Same SPIFFE ID, parent and selectors again: refused.
    let dup = s.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        parent,
        "--selector",
        "unix:gid:1000",
        "--selector",
        "unix:uid:1000",
    ]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("AlreadyExists"));

    let updated: serde_json::Value = serde_json::from_str(&s.cli_ok(&[
        "entry",
        "update",
        "--id",
        &id,
        "--spiffe-id",
        "spiffe://example.org/web2",
        "--parent-id",
        parent,
        "--selector",
        "unix:uid:1001",
        "--x509-svid-ttl",
        "10m",
        "--dns-name",
        "web.example.org",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(updated["spiffe_id"], "spiffe://example.org/web2");
    assert_eq!(updated["x509_svid_ttl"], 600);
    let text = s.cli_ok(&["entry", "show", "--spiffe-id", "spiffe://example.org/web2"]);
    assert!(
        text.contains("Found 1 entry")
            && text.contains("unix:uid:1001")
            && text.contains("web.example.org"),
        "{text}"
    );
    let filtered = s.cli_ok(&["entry", "show", "--selector", "unix:uid:9999"]);
    assert!(filtered.contains("Found 0 entries"), "{filtered}");

    for (args, needle) in [
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:abc",
            ],
            "unix:uid takes a number",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                parent,
                "--selector",
                "unx:uid:1",
            ],
            "unknown type",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://other.org/x",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
            ],
            "not in trust domain",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/a//b",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
            ],
            "path segments",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/continuity/x",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
            ],
            "reserved",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                parent,
                "--selector",
                "nocolon",
            ],
            "TYPE:VALUE",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
                "--dns-name",
                "bad name",
            ],
            "not a valid DNS name",
        ),
    ] {
        let mut full = vec!["entry", "create"];
        full.extend(args);
        let out = s.cli(&full);
        assert!(!out.status.success(), "{full:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{full:?}: {err}");
    }

    s.cli_ok(&["entry", "delete", "--id", &id]);
    let gone = s.cli(&["entry", "show", "--id", &id]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
    let again = s.cli(&["entry", "delete", "--id", &id]);
    assert!(!again.status.success());
}

#[test]
fn healthcheck_and_http_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (health, metrics) = (free_port(), free_port());
    let opts = ServerOptions {
        extra_toml: format!(
            "[health]\nbind_address = \"127.0.0.1:{health}\"\n[metrics]\nbind_address = \"127.0.0.1:{metrics}\"\n"
        ),
        ..Default::default()
    };
    let s = TestServer::start(&dir.path().join("server"), opts);
    assert!(s.cli_ok(&["healthcheck"]).contains("healthy"));
    let get = |port: u16, path: &str| {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s
    };
    assert!(get(health, "/live").starts_with("HTTP/1.1 200"));
    assert!(get(health, "/ready").starts_with("HTTP/1.1 200"));
    assert!(get(health, "/nope").starts_with("HTTP/1.1 404"));
    s.token(None);
    let m = get(metrics, "/metrics");
    assert!(m.contains("continuity_server_admin_calls_total"), "{m}");

    let missing = Command::new(bin("continuity-server"))
        .args(["--socket", "/nonexistent/admin.sock", "healthcheck"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot reach the server"));
}

#[test]
fn malformed_domain_values_are_refused_before_connecting_naming_the_valid_ones() {
    let server = |args: &[&str]| {
        Command::new(bin("continuity-server"))
            .args(["--socket", "/nonexistent/admin.sock"])
            .args(args)
            .output()
            .unwrap()
    };
    for (args, valid) in [
        (
            &["engine", "create", "e", "--tier", "1", "--custody", "vault"][..],
            "hsm, transit, kv",
        ),
        (
            &["engine", "key", "create", "e", "k", "--purpose", "mac"],
            "sign, encrypt",
        ),
        (
            &[
                "engine",
                "key",
                "create",
                "e",
                "k",
                "--purpose",
                "sign",
                "--algorithm",
                "ed25519",
            ],
            "ec-p256, rsa-2048, rsa-3072, aes-256-gcm",
        ),
        (&["entry", "show", "--selector", "nocolon"], "TYPE:VALUE"),
        (&["entry", "show", "--output", "yaml"], "text, json"),
        (&["bundle", "show", "--format", "der"], "pem, spiffe"),
    ] {
        let out = server(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: clap refuses: {err}");
        assert!(err.contains(valid), "{args:?} names {valid}: {err}");
        assert!(
            !err.contains("cannot reach"),
            "{args:?}: no request made: {err}"
        );
    }
}
