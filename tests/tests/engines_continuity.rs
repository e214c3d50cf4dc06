//! Continuity proofs end to end: a real server and agent, hsm custody on a SoftHSM2 token and
//! transit custody; a relying party holding only version 1's public key follows five
//! rotations offline, forged endorsements are refused naming the link, a destroyed version's
//! endorsement keeps the chain whole, and PyJWT (an independent JOSE implementation) verifies
//! an endorsement.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use continuity_tests::agent::TestAgent;
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::softhsm::{MODULE, SoftHsm};
use continuity_tests::uid;
use serde_json::Value;

const ALIAS: &str = "spiffe://example.org/node/continuity";

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&ok(out)).unwrap()
}

fn wait_for<F: FnMut() -> bool>(secs: u64, what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {secs}s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A file other uids can read.
fn public_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p
}

/// The Engine JWKS as the agent serves it to the workload (the published document).
fn published(agent: &TestAgent) -> Value {
    serde_json::from_str(&ok(&agent.cli(&["engine", "jwks"]))).unwrap()
}

fn endorsement_index(doc: &Value, version: u64) -> usize {
    doc["endorsements"]
        .as_array()
        .unwrap()
        .iter()
        .position(|e| e["key"] == "signing" && e["version"] == version)
        .unwrap_or_else(|| panic!("no endorsement of v{version} in {doc}"))
}

/// `engine verify-chain` offline over `doc` (written to a file), pinned to `pinned`.
fn verify_chain(agent: &TestAgent, doc: &Value, pinned: &Path, extra: &[&str]) -> Output {
    let file = public_file(&agent.dir, "doc.json", doc.to_string().as_bytes());
    let mut args = vec![
        "engine",
        "verify-chain",
        "--key",
        "signing",
        "--pinned",
        pinned.to_str().unwrap(),
        "--jwks",
        file.to_str().unwrap(),
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    agent.cli(&args)
}

/// A forged document must be refused, naming `at` in the error.
fn refused(agent: &TestAgent, doc: &Value, pinned: &Path, at: &str, why: &str) {
    let out = verify_chain(agent, doc, pinned, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{why}: accepted");
    assert!(err.contains(at), "{why}: error does not name {at:?}: {err}");
}

/// PyJWT verifies the endorsement of v2 with v1's PEM, and re-signs v3's claims with an
/// unrelated key of the same type (same header): (v2's verified claims, the forged JWS).
fn pyjwt(doc: &Path, pinned: &Path) -> (Value, String) {
    const SCRIPT: &str = r#"
import json, sys, jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
doc = json.load(open(sys.argv[1]))
pem = serialization.load_pem_public_key(open(sys.argv[2], 'rb').read())
by = {e['version']: e['jws'] for e in doc['endorsements'] if e['key'] == 'signing'}
h2 = jwt.get_unverified_header(by[2])
assert h2['typ'] == 'continuity-endorsement+jwt', h2
claims = jwt.decode(by[2], pem, algorithms=[h2['alg']])
h3 = jwt.get_unverified_header(by[3])
c3 = jwt.decode(by[3], options={'verify_signature': False})
k = ec.generate_private_key(ec.SECP256R1()) if h3['alg'] == 'ES256' else rsa.generate_private_key(65537, 2048)
forged = jwt.encode(c3, k, algorithm=h3['alg'], headers={'typ': h3['typ'], 'kid': h3['kid']})
print(json.dumps({'claims': claims, 'forged': forged}))
"#;
    let out = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(doc)
        .arg(pinned)
        .output()
        .expect("python3 (pip install pyjwt cryptography)");
    let v: Value = serde_json::from_str(&ok(&out)).unwrap();
    (
        v["claims"].clone(),
        v["forged"].as_str().unwrap().to_string(),
    )
}

/// The claims of a compact JWS, and the JWS with its claims replaced (signature kept).
fn with_claims(jws: &str, edit: impl FnOnce(&mut Value)) -> String {
    let parts: Vec<&str> = jws.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    edit(&mut claims);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{}.{body}.{}", parts[0], parts[2])
}

/// The whole scenario on Engine `engine` (created with `create`), key algorithm `algorithm`.
fn five_rotations_then_offline_proof(s: &TestServer, dir: &Path, create: &[&str], algorithm: &str) {
    let engine = create[2];
    s.cli_ok(create);
    s.cli_ok(&[
        "engine",
        "key",
        "create",
        engine,
        "signing",
        "--purpose",
        "sign",
        "--algorithm",
        algorithm,
        "--destroy-grace",
        "1s",
    ]);
    s.create_entry_with_engine(ALIAS, &format!("unix:uid:{}", uid()), engine);
    let agent = TestAgent::start(&dir.join("agent"), s, &s.token(Some(ALIAS)));
    wait_for(30, "the agent serves the Engine JWKS", || {
        agent
            .cli(&["engine", "public-key", "--key", "signing"])
            .status
            .success()
    });
    // The relying party pins version 1's public key, and nothing else.
    let pem = ok(&agent.cli(&["engine", "public-key", "--key", "signing", "--version", "1"]));
    let pinned = public_file(&agent.dir, "v1.pem", pem.as_bytes());
    for _ in 0..5 {
        s.cli_ok(&["engine", "key", "rotate", engine, "signing"]);
    }
    wait_for(60, "the agent's JWKS has signing-v6", || {
        published(&agent)["keys"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k["kid"] == "signing-v6"))
    });
    let msg = public_file(&agent.dir, "msg.txt", b"transfer 100 to account 7");
    let sig_path = agent.dir.join("sig.der");
    let signed = json(&agent.cli(&[
        "engine",
        "sign",
        "--key",
        "signing",
        "--message-file",
        msg.to_str().unwrap(),
        "--out",
        sig_path.to_str().unwrap(),
        "--output",
        "json",
    ]));
    assert_eq!(signed["version"], 6);
    let doc = published(&agent);
    assert_eq!(doc["endorsements"].as_array().unwrap().len(), 5, "{doc}");

    // Offline: the pinned key and the published document only.
    let sig_args = [
        "--signature-file",
        sig_path.to_str().unwrap(),
        "--message-file",
        msg.to_str().unwrap(),
    ];
    let v: Value =
        serde_json::from_str(&ok(&verify_chain(&agent, &doc, &pinned, &sig_args))).unwrap();
    let path: Vec<u64> = v["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["version"].as_u64().unwrap())
        .collect();
    assert_eq!(path, [1, 2, 3, 4, 5, 6]);
    assert_eq!(v["path"][5]["kid"], "signing-v6");
    assert_eq!(v["signature_valid"], true);
    assert_eq!(v["engine"], engine);
    assert_eq!(v["trust_domain"], "example.org");
    // The relying party names the Engine and trust domain it pinned: a chain of another
    // (the same material imported into two Engines) is not this one's.
    let scoped = ["--engine", engine, "--trust-domain", "example.org"];
    ok(&verify_chain(&agent, &doc, &pinned, &scoped));
    for (flag, other, what) in [
        ("--engine", "elsewhere", "names engine"),
        ("--trust-domain", "other.org", "names trust domain"),
    ] {
        let out = verify_chain(&agent, &doc, &pinned, &[flag, other]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(what),
            "{flag} {other}: {err}"
        );
    }
    // The same signature over another message is refused, naming the reached version.
    let other = public_file(&agent.dir, "other.txt", b"transfer 900 to account 7");
    let out = verify_chain(
        &agent,
        &doc,
        &pinned,
        &[
            "--signature-file",
            sig_path.to_str().unwrap(),
            "--message-file",
            other.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reached version v6"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // From the agent (no --jwks), the same path.
    let v = json(&agent.cli(&[
        "engine",
        "verify-chain",
        "--key",
        "signing",
        "--pinned",
        pinned.to_str().unwrap(),
        "--output",
        "json",
    ]));
    assert_eq!(v["path"].as_array().unwrap().len(), 6);

    // An independent JOSE implementation verifies an endorsement with v1's PEM.
    let doc_file = public_file(&agent.dir, "published.json", doc.to_string().as_bytes());
    let (claims, forged_v3) = pyjwt(&doc_file, &pinned);
    assert_eq!(claims["version"], 2);
    assert_eq!(claims["previous_version"], 1);
    assert_eq!(claims["engine"], engine);
    assert_eq!(claims["trust_domain"], "example.org");
    assert_eq!(claims["kid"], "signing-v2");

    // Forgeries, each refused naming the link.
    let mut d = doc.clone();
    d["endorsements"][endorsement_index(&doc, 3)]["jws"] = forged_v3.into();
    refused(
        &agent,
        &d,
        &pinned,
        "link v2 -> v3",
        "v3 re-signed by an unrelated key",
    );
    let mut d = doc.clone();
    let (i4, i5) = (endorsement_index(&doc, 4), endorsement_index(&doc, 5));
    let v5_jwk = {
        let jws = doc["endorsements"][i5]["jws"].as_str().unwrap();
        let c = URL_SAFE_NO_PAD
            .decode(jws.split('.').nth(1).unwrap())
            .unwrap();
        serde_json::from_slice::<Value>(&c).unwrap()["jwk"].clone()
    };
    let modified = with_claims(doc["endorsements"][i4]["jws"].as_str().unwrap(), |c| {
        c["jwk"] = v5_jwk.clone();
    });
    d["endorsements"][i4]["jws"] = modified.into();
    refused(
        &agent,
        &d,
        &pinned,
        "link v3 -> v4",
        "v4's public key replaced",
    );
    let mut d = doc.clone();
    d["endorsements"].as_array_mut().unwrap().remove(i4);
    refused(&agent, &d, &pinned, "link v4 -> v5", "v4 skipped");
    let mut d = doc.clone();
    let i3 = endorsement_index(&doc, 3);
    d["endorsements"][i3]["jws"] = doc["endorsements"][i5]["jws"].clone();
    d["endorsements"][i5]["jws"] = doc["endorsements"][i3]["jws"].clone();
    refused(
        &agent,
        &d,
        &pinned,
        "endorsement of v3",
        "v3 and v5 swapped",
    );

    // Version 2 destroyed after its grace: its endorsement stays, marked, and the chain holds.
    s.cli_ok(&[
        "engine",
        "key",
        "disable",
        engine,
        "signing",
        "--version",
        "2",
    ]);
    s.cli_ok(&[
        "engine",
        "key",
        "destroy",
        engine,
        "signing",
        "--version",
        "2",
    ]);
    wait_for(60, "v2 is DESTROYED in the published document", || {
        let doc = published(&agent);
        doc["endorsements"].as_array().is_some_and(|l| {
            l.iter()
                .any(|e| e["version"] == 2 && e["state"] == "DESTROYED")
        })
    });
    let doc = published(&agent);
    assert!(
        doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["kid"] != "signing-v2")
    );
    let v: Value =
        serde_json::from_str(&ok(&verify_chain(&agent, &doc, &pinned, &sig_args))).unwrap();
    assert_eq!(v["path"][1]["state"], "DESTROYED");
    assert_eq!(v["path"].as_array().unwrap().len(), 6);
    assert_eq!(v["signature_valid"], true);
}

#[test]
fn hsm_custody_chain_survives_five_rotations_and_a_destroyed_version() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::new(&dir.path().join("hsm"), "continuity");
    let opts = ServerOptions {
        extra_toml: format!(
            "[key_manager]\nkind = \"pkcs11\"\nmodule = \"{MODULE}\"\ntoken_label = \"{}\"\npin_env = \"PIN\"\n",
            hsm.label
        ),
        env: vec![
            ("SOFTHSM2_CONF".into(), hsm.conf.display().to_string()),
            ("PIN".into(), hsm.pin.clone()),
        ],
        ..Default::default()
    };
    let s = TestServer::start(&dir.path().join("server"), opts);
    let create = ["engine", "create", "vault", "--tier", "0"];
    five_rotations_then_offline_proof(&s, dir.path(), &create, "ec-p256");
}

#[test]
fn transit_custody_chain_survives_five_rotations_and_a_destroyed_version() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    let create = [
        "engine",
        "create",
        "orders",
        "--tier",
        "2",
        "--custody",
        "transit",
    ];
    five_rotations_then_offline_proof(&s, dir.path(), &create, "rsa-2048");
}
