#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]
//! The upstream authority on the real binaries: an upstream CA made by `openssl` here signs the
//! server's CA (disk key, and a key inside a SoftHSM2 token); the bundle holds the upstream
//! root only, and every X509-SVID chain the agent serves verifies against it with `openssl
//! verify` and with py-spiffe + `cryptography`'s path builder. Bad upstream configs stop the
//! server naming the key.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use continuity_tests::agent::TestAgent;
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::softhsm::{MODULE, SoftHsm};
use continuity_tests::uid;
use x509_parser::prelude::*;

const ALIAS: &str = "spiffe://example.org/node/upstream";

/// An upstream CA on disk: certificate and PKCS#8 key (PEM) and the certificate's DER.
struct Ca {
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn certs(pem: &str) -> Vec<Vec<u8>> {
    continuity_common::x509::pem_decode_all("CERTIFICATE", pem).unwrap()
}

fn pem(ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| continuity_common::x509::pem_encode("CERTIFICATE", d))
        .collect()
}

fn ext_file(dir: &Path, ca: bool) -> PathBuf {
    let f = dir.join(format!("ext-{ca}.cnf"));
    let body = if ca {
        "basicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n"
    } else {
        "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n"
    };
    std::fs::write(
        &f,
        format!(
            "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = v3\n[dn]\nO = Upstream Test\n[v3]\n{body}subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\n"
        ),
    )
    .unwrap();
    f
}

fn finish(dir: &Path, name: &str) -> Ca {
    let key = dir.join(format!("{name}.key"));
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cert = dir.join(format!("{name}.pem"));
    let der = certs(&std::fs::read_to_string(&cert).unwrap()).remove(0);
    Ca { cert, key, der }
}

/// A self-signed P-256 root valid for `days` (`ca: false` makes a non-CA certificate).
fn openssl_root(dir: &Path, name: &str, days: u32, ca: bool) -> Ca {
    std::fs::create_dir_all(dir).unwrap();
    let cnf = ext_file(dir, ca);
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-config")
        .arg(&cnf)
        .args([
            "-subj",
            &format!("/O=Upstream Test/CN={name}"),
            "-days",
            &days.to_string(),
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.pem"))));
    finish(dir, name)
}

/// A P-256 intermediate CA signed by `root`.
fn openssl_intermediate(dir: &Path, name: &str, root: &Ca) -> Ca {
    let cnf = ext_file(dir, true);
    let csr = dir.join(format!("{name}.csr"));
    run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-config")
        .arg(&cnf)
        .args(["-subj", &format!("/O=Upstream Test/CN={name}")])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(&csr));
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "20", "-set_serial", "0x5eed01"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(&root.cert)
        .arg("-CAkey")
        .arg(&root.key)
        .arg("-extfile")
        .arg(&cnf)
        .args(["-extensions", "v3"])
        .arg("-out")
        .arg(dir.join(format!("{name}.pem"))));
    finish(dir, name)
}

fn disk_toml(cert: &Path, key: &Path, bundle: Option<&Path>) -> String {
    let bundle = bundle
        .map(|b| format!("bundle_file = \"{}\"\n", b.display()))
        .unwrap_or_default();
    format!(
        "[upstream_authority]\nkind = \"disk\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n{bundle}",
        cert.display(),
        key.display()
    )
}

/// Waits for the agent to serve the workload an SVID; `api fetch x509 --write` into `out`.
fn fetch_written(agent: &TestAgent, out: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = agent.cli(&["api", "fetch", "x509", "--write", out.to_str().unwrap()]);
        if o.status.success() && out.join("svid.0.pem").exists() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no X509-SVID within 30s: {}\nagent log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn openssl_verify(root: &Path, untrusted: Option<&Path>, leaf: &Path) -> (bool, String) {
    let mut cmd = Command::new("openssl");
    cmd.arg("verify").arg("-CAfile").arg(root);
    if let Some(u) = untrusted {
        cmd.arg("-untrusted").arg(u);
    }
    let o = cmd.arg(leaf).output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Starts an agent and a workload entry on `server` (whose upstream root is `root`, with
/// `upstream_chain` certificates between it and the server CA) and checks what is served;
/// returns the server CA certificate of the SVID chain.
fn served_chains_verify_to_the_root(
    dir: &Path,
    server: &TestServer,
    root: &Ca,
    upstream_chain: &[Vec<u8>],
) -> Vec<u8> {
    assert_eq!(
        server.bundle_der(),
        vec![root.der.clone()],
        "bundle show must hold the upstream root only"
    );
    let token = server.token(Some(ALIAS));
    let agent = TestAgent::start(&dir.join("agent"), server, &token);
    let id = "spiffe://example.org/upstream-workload";
    server.create_entry(id, ALIAS, &[&format!("unix:uid:{}", uid())]);
    let out = dir.join("svid");
    fetch_written(&agent, &out);
    let chain = certs(&std::fs::read_to_string(out.join("svid.0.pem")).unwrap());
    assert_eq!(
        chain.len(),
        2 + upstream_chain.len(),
        "svid.0.pem = leaf + server CA + upstream intermediates"
    );
    assert_eq!(&chain[2..], upstream_chain);
    assert_eq!(
        certs(&std::fs::read_to_string(out.join("bundle.0.pem")).unwrap()),
        vec![root.der.clone()],
        "the Workload API bundle is the upstream root"
    );
    let leaf = dir.join("leaf.pem");
    std::fs::write(&leaf, pem(&chain[..1])).unwrap();
    let inter = dir.join("chain-intermediates.pem");
    std::fs::write(&inter, pem(&chain[1..])).unwrap();
    let (ok, text) = openssl_verify(&root.cert, Some(&inter), &leaf);
    assert!(
        ok && text.contains(": OK"),
        "openssl verify against the upstream root failed: {text}"
    );
    // The whole file as the workload got it verifies the same way (leaf first, rest untrusted).
    let (ok, text) = openssl_verify(&root.cert, Some(&out.join("svid.0.pem")), &leaf);
    assert!(ok, "{text}");
    // Without the intermediates the root alone cannot reach the leaf: the chain is needed.
    let (ok, text) = openssl_verify(&root.cert, None, &leaf);
    assert!(!ok, "the leaf verified without its intermediates: {text}");

    let py = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/verify_chain.py"))
        .arg(agent.endpoint())
        .output()
        .expect("python3");
    assert!(
        py.status.success(),
        "py-spiffe chain validation failed (PyPI `spiffe` installed? scripts/setup does it):\n{}\n{}",
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    assert_eq!(v["spiffe_id"], id);
    assert_eq!(v["chain_len"], 2 + upstream_chain.len());
    assert_eq!(v["authorities"], 1);
    assert_eq!(v["verified_chain_len"], 3 + upstream_chain.len());
    assert_eq!(v["anchor_is_bundle_root"], true);

    // The server CA is an intermediate of the trust domain under the upstream.
    let (_, ca) = parse_x509_certificate(&chain[1]).unwrap();
    assert!(ca.is_ca());
    let (_, top) = parse_x509_certificate(upstream_chain.first().unwrap_or(&root.der)).unwrap();
    assert_eq!(ca.issuer().as_raw(), top.subject().as_raw());
    ca.verify_signature(Some(top.public_key())).unwrap();
    let uris: Vec<String> = continuity_common::x509::uri_sans(&chain[1]).unwrap();
    assert_eq!(uris, vec!["spiffe://example.org".to_string()]);
    assert!(ca.validity().not_after.timestamp() <= top.validity().not_after.timestamp());
    // The agent's own SVID has the same chain: it authenticated to the server over mTLS
    // (verified against the root) to get the workload's SVID above; its renewal works too.
    assert!(agent.log().contains("agent"), "agent log is empty");
    chain[1].clone()
}

#[test]
fn disk_upstream_root_signs_the_server_ca_and_chains_verify_against_it_only() {
    let dir = tempfile::tempdir().unwrap();
    // A root that expires in two days, with ca_ttl = 96h: the CA is clamped to the root.
    let root = openssl_root(&dir.path().join("upstream"), "Upstream Root", 2, true);
    let opts = ServerOptions {
        extra_toml: disk_toml(&root.cert, &root.key, None),
        ca_ttl: "96h".into(),
        ..Default::default()
    };
    let server = TestServer::start(&dir.path().join("server"), opts);
    let ca = served_chains_verify_to_the_root(dir.path(), &server, &root, &[]);
    let (_, ca) = parse_x509_certificate(&ca).unwrap();
    let (_, r) = parse_x509_certificate(&root.der).unwrap();
    assert_eq!(
        ca.validity().not_after.timestamp(),
        r.validity().not_after.timestamp(),
        "ca_ttl not clamped to the upstream"
    );
    assert!(
        server.log().contains("clamped"),
        "the clamp was not logged:\n{}",
        server.log()
    );
}

#[test]
fn pkcs11_upstream_intermediate_in_a_token_signs_the_server_ca() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("upstream");
    let root = openssl_root(&up, "Upstream Root", 30, true);
    let mid = openssl_intermediate(&up, "Upstream Intermediate", &root);
    let hsm = SoftHsm::new(&dir.path().join("hsm"), "upstream-test");
    run(Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &hsm.conf)
        .arg("--import")
        .arg(&mid.key)
        .args([
            "--token",
            &hsm.label,
            "--label",
            "upstream-ca",
            "--id",
            "0a0b",
            "--pin",
            &hsm.pin,
        ]));
    // The key now lives only in the token.
    std::fs::remove_file(&mid.key).unwrap();
    let opts = ServerOptions {
        extra_toml: format!(
            "[key_manager]\nkind = \"memory\"\n[upstream_authority]\nkind = \"pkcs11\"\ncert_file = \"{}\"\nbundle_file = \"{}\"\nmodule = \"{MODULE}\"\ntoken_label = \"{}\"\nkey_label = \"upstream-ca\"\npin_env = \"UPSTREAM_PIN\"\n",
            mid.cert.display(),
            root.cert.display(),
            hsm.label
        ),
        env: vec![
            ("SOFTHSM2_CONF".into(), hsm.conf.display().to_string()),
            ("UPSTREAM_PIN".into(), hsm.pin.clone()),
        ],
        ..Default::default()
    };
    let server = TestServer::start(&dir.path().join("server"), opts);
    served_chains_verify_to_the_root(dir.path(), &server, &root, std::slice::from_ref(&mid.der));
    assert!(!server.log().contains(&hsm.pin), "PIN leaked into the log");
}

#[test]
fn bad_upstream_configs_stop_the_server_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("upstream");
    let root = openssl_root(&up, "Upstream Root", 30, true);
    let other = openssl_root(&up.join("other"), "Other Root", 30, true);
    let mid = openssl_intermediate(&up, "Upstream Intermediate", &root);
    let leaf = openssl_root(&up.join("leaf"), "Not A CA", 30, false);
    let hsm = SoftHsm::new(&dir.path().join("hsm"), "upstream-bad");
    let pkcs11 = format!(
        "[upstream_authority]\nkind = \"pkcs11\"\ncert_file = \"{}\"\nmodule = \"{MODULE}\"\ntoken_label = \"{}\"\nkey_label = \"no-such-key\"\npin_env = \"UPSTREAM_PIN\"\n",
        root.cert.display(),
        hsm.label
    );
    let missing = up.join("missing.pem");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "key not matching the cert",
            disk_toml(&root.cert, &other.key, None),
            "upstream_authority.key_file",
        ),
        (
            "unreadable cert_file",
            disk_toml(&missing, &root.key, None),
            "upstream_authority.cert_file",
        ),
        (
            "unreadable key_file",
            disk_toml(&root.cert, &missing, None),
            "upstream_authority.key_file",
        ),
        (
            "cert not a CA",
            disk_toml(&leaf.cert, &leaf.key, None),
            "upstream_authority.cert_file: the certificate is not a CA",
        ),
        (
            "intermediate without bundle_file",
            disk_toml(&mid.cert, &mid.key, None),
            "upstream_authority.cert_file",
        ),
        (
            "bundle_file of another root",
            disk_toml(&mid.cert, &mid.key, Some(&other.cert)),
            "upstream_authority.bundle_file",
        ),
        (
            "pkcs11 key_label not in the token",
            pkcs11,
            "upstream_authority.key_label",
        ),
        (
            "missing kind",
            format!(
                "[upstream_authority]\ncert_file = \"{}\"\n",
                root.cert.display()
            ),
            "upstream_authority.kind",
        ),
    ];
    for (i, (what, toml, key)) in cases.into_iter().enumerate() {
        let s = TestServer::configure(
            &dir.path().join(format!("server-{i}")),
            ServerOptions {
                extra_toml: toml,
                env: vec![
                    ("SOFTHSM2_CONF".into(), hsm.conf.display().to_string()),
                    ("UPSTREAM_PIN".into(), hsm.pin.clone()),
                ],
                ..Default::default()
            },
        );
        let (ok, stderr) = s
            .run_until_exit(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{what}: the server kept running"));
        assert!(!ok, "{what}: the server exited successfully");
        assert!(
            stderr.contains(key),
            "{what}: stderr does not name {key}:\n{stderr}"
        );
    }
}
