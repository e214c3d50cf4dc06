//! `backup create` from a running server and `backup restore` into an empty data_dir, with
//! the disk key manager: the restored server serves the same bundle, entries, Engine keys and
//! secrets; damaged files, a wrong passphrase and a non-empty data_dir are refused; the file
//! holds no plaintext private key.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use continuity_tests::agent::TestAgent;
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::{bin, uid};

const ALIAS: &str = "spiffe://example.org/node/backup";

fn wait_for<F: FnMut() -> bool>(secs: u64, what: &str, mut f: F) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).unwrap()
}

/// `continuity-server backup restore` (offline); returns the output.
fn restore(file: &Path, config: &Path, passphrase: &Path) -> Output {
    Command::new(bin("continuity-server"))
        .args(["backup", "restore"])
        .arg(file)
        .arg("--config")
        .arg(config)
        .arg("--passphrase-file")
        .arg(passphrase)
        .output()
        .unwrap()
}

fn refused(out: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{what} was accepted");
    err
}

fn openssl_verify(dir: &Path, pem: &str, message: &Path, signature_b64: &str) -> bool {
    let pub_path = dir.join("pub.pem");
    std::fs::write(&pub_path, pem).unwrap();
    let sig_path = dir.join("sig.der");
    std::fs::write(&sig_path, STANDARD.decode(signature_b64).unwrap()).unwrap();
    Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&pub_path)
        .arg("-signature")
        .arg(&sig_path)
        .arg(message)
        .output()
        .unwrap()
        .status
        .success()
}

/// Every secret a disk key file holds, in the forms it could leak in: the decoded bytes
/// (PKCS#8 or raw key), their base64, and a PEM header.
fn key_secrets(keys: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(keys).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        let b64 = text.lines().last().unwrap().trim().to_string();
        let raw = STANDARD.decode(&b64).unwrap();
        assert!(raw.len() >= 32);
        out.push(raw);
        out.push(b64.into_bytes());
    }
    out.push(b"PRIVATE KEY".to_vec());
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// An agent on `s` as `ALIAS`, with both Engines' JWKS cached.
fn agent_on(dir: &Path, s: &TestServer) -> TestAgent {
    let a = TestAgent::start(dir, s, &s.token(Some(ALIAS)));
    wait_for(20, "Engine JWKS cached", || {
        String::from_utf8_lossy(&a.cli(&["engine", "--engine", "orders", "jwks"]).stdout)
            .contains("signing-v1")
    });
    a
}

fn sign(a: &TestAgent, msg: &Path) -> serde_json::Value {
    json(&a.cli(&[
        "engine",
        "--engine",
        "orders",
        "sign",
        "--key",
        "signing",
        "--message-file",
        msg.to_str().unwrap(),
        "--output",
        "json",
    ]))
}

fn fetch(a: &TestAgent, name: &str) -> String {
    json(&a.cli(&[
        "engine", "--engine", "vault", "secret", name, "--output", "json",
    ]))["value"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn round_trip_with_the_disk_key_manager() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A 1-minute CA: the next authority is prepared (published) 30 s in.
    let opts = ServerOptions {
        ca_ttl: "1m".into(),
        x509_ttl: "20s".into(),
        extra_toml: "default_jwt_svid_ttl = \"20s\"\n".into(),
        ..Default::default()
    };
    let mut s = TestServer::start(&d.join("one"), opts.clone());
    s.cli_ok(&[
        "engine",
        "create",
        "orders",
        "--tier",
        "2",
        "--custody",
        "transit",
    ]);
    s.cli_ok(&[
        "engine",
        "key",
        "create",
        "orders",
        "signing",
        "--purpose",
        "sign",
    ]);
    s.cli_ok(&[
        "engine",
        "create",
        "vault",
        "--tier",
        "2",
        "--custody",
        "kv",
    ]);
    s.cli_ok(&[
        "engine",
        "key",
        "create",
        "vault",
        "wrap",
        "--purpose",
        "encrypt",
    ]);
    let value = d.join("value");
    std::fs::write(&value, "s3cret-db-password").unwrap();
    s.cli_ok(&[
        "engine",
        "secret",
        "put",
        "vault",
        "db",
        "--value-file",
        value.to_str().unwrap(),
    ]);
    let sel = format!("unix:uid:{}", uid());
    s.create_entry_with_engine(ALIAS, &sel, "orders");
    s.create_entry_with_engine(ALIAS, &sel, "vault");
    s.create_entry("spiffe://example.org/plain", ALIAS, &["unix:uid:4242"]);
    let mut a = agent_on(&d.join("agent-one"), &s);
    let msg = d.join("msg.txt");
    std::fs::write(&msg, "ship order 42").unwrap();
    let before = sign(&a, &msg);
    let old_pem = ok(&a.cli(&[
        "engine",
        "--engine",
        "orders",
        "public-key",
        "--key",
        "signing",
    ]));
    let secret = fetch(&a, "db");
    assert_eq!(STANDARD.decode(&secret).unwrap(), b"s3cret-db-password");
    let kv_key = fetch(&a, "wrap");
    wait_for(45, "the next CA prepared (rotation)", || {
        s.bundle_der().len() >= 2
    });

    let pass = d.join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    // The disk key manager's keys never go out unsealed: no passphrase, no backup.
    let file = d.join("backup.jsonl");
    let out = s.cli(&["backup", "create", file.to_str().unwrap()]);
    assert!(refused(&out, "a backup without a passphrase").contains("passphrase"));
    assert!(!file.exists());
    let bundle_pem = s.cli_ok(&["bundle", "show"]);
    let bundle_spiffe = s.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    let entries = s.cli_ok(&["entry", "show", "--output", "json"]);
    s.cli_ok(&[
        "backup",
        "create",
        file.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
    ]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let bytes = std::fs::read(&file).unwrap();
    for secret in key_secrets(&d.join("one/data/keys")) {
        assert!(
            !contains(&bytes, &secret),
            "the backup holds key material in the clear: {}",
            String::from_utf8_lossy(&secret)
        );
    }

    // Refusals; none of them writes anything.
    let one = d.join("one/server.toml");
    let err = refused(
        &restore(&file, &one, &pass),
        "a restore into a used data_dir",
    );
    assert!(err.contains("not empty"), "{err}");
    let mut t = TestServer::configure(&d.join("two"), opts);
    let two = d.join("two/server.toml");
    let wrong = d.join("wrong");
    std::fs::write(&wrong, "Tr0ub4dor&3").unwrap();
    let err = refused(&restore(&file, &two, &wrong), "a wrong passphrase");
    assert!(err.contains("passphrase is wrong"), "{err}");
    let cut = d.join("cut.jsonl");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = refused(&restore(&cut, &two, &pass), "a truncated file");
    assert!(err.contains("truncated"), "{err}");
    let mut edited = bytes.clone();
    let at = edited.len() / 2;
    edited[at] = if edited[at] == b'1' { b'2' } else { b'1' };
    let edit = d.join("edit.jsonl");
    std::fs::write(&edit, &edited).unwrap();
    let err = refused(&restore(&edit, &two, &pass), "a one-byte edit");
    assert!(err.contains("modified"), "{err}");
    assert!(
        !d.join("two/data").exists()
            || std::fs::read_dir(d.join("two/data"))
                .unwrap()
                .next()
                .is_none()
    );

    // The real thing, with the original server gone.
    a.stop();
    s.stop();
    ok(&restore(&file, &two, &pass));
    t.spawn();
    assert_eq!(t.cli_ok(&["bundle", "show"]), bundle_pem, "same bundle");
    assert_eq!(
        t.cli_ok(&["bundle", "show", "--format", "spiffe"]),
        bundle_spiffe,
        "same bundle document"
    );
    assert_eq!(
        t.cli_ok(&["entry", "show", "--output", "json"]),
        entries,
        "same entries"
    );
    let b = agent_on(&d.join("agent-two"), &t);
    // A signature made before verifies under the restored key, and a new one under the old.
    let new_pem = ok(&b.cli(&[
        "engine",
        "--engine",
        "orders",
        "public-key",
        "--key",
        "signing",
    ]));
    assert_eq!(new_pem, old_pem);
    let after = sign(&b, &msg);
    assert!(openssl_verify(
        d,
        &new_pem,
        &msg,
        before["signature"].as_str().unwrap()
    ));
    assert!(openssl_verify(
        d,
        &old_pem,
        &msg,
        after["signature"].as_str().unwrap()
    ));
    assert_eq!(
        fetch(&b, "db"),
        secret,
        "FetchSecret returns the same secret"
    );
    assert_eq!(
        fetch(&b, "wrap"),
        kv_key,
        "the kv key's material is the same"
    );
    // The restored audit log verifies and holds the history.
    let audit = json(&t.cli(&["audit", "verify", "--output", "json"]));
    assert_eq!(audit["ok"], true, "{audit}");
    assert!(audit["records"].as_i64().unwrap() > 5, "{audit}");
}
