//! Engine key import end to end (Cloud KMS import jobs), for hsm custody (a SoftHSM2 token)
//! and transit custody: a P-256 key and an AES-256 key made by the openssl CLI, wrapped for
//! the job by the openssl CLI (never the server's code), are imported through the admin CLI;
//! a workload's signature through the agent verifies with `openssl dgst` and the ORIGINAL
//! public key, the Engine's ciphertext opens with the original AES key and the original key's
//! ciphertext opens in the Engine (pyca/cryptography, OpenSSL's AES-GCM: the openssl CLI has no
//! AEAD); the imported version is marked, endorsed by v1 (`engine verify-chain` follows it),
//! and survives a server restart; hostile blobs and jobs get clear statuses and change nothing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use continuity_tests::agent::TestAgent;
use continuity_tests::engines::{json, ok, server_for, tier_of, wait_for};
use continuity_tests::import_wrap;
use continuity_tests::server::TestServer;
use continuity_tests::uid;
use serde_json::Value;

const ALIAS: &str = "spiffe://example.org/node/continuity";

/// A file other uids can read (workloads run as other uids).
fn public_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p
}

/// `engine key import` of `wrapped` into `vault/key` through `job`; the CLI's output.
fn import(
    s: &TestServer,
    dir: &Path,
    key: &str,
    job: &str,
    wrapped: &[u8],
    extra: &[&str],
) -> std::process::Output {
    let file = dir.join(format!("wrapped-{key}.bin"));
    std::fs::write(&file, wrapped).unwrap();
    let mut args = vec![
        "engine",
        "key",
        "import",
        "vault",
        key,
        "--job",
        job,
        "--wrapped",
        file.to_str().unwrap(),
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    s.cli(&args)
}

/// A refused import: its stderr names `code` and `reason`.
fn refused(out: &std::process::Output, code: &str, reason: &str, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: accepted");
    assert!(err.contains(code) && err.contains(reason), "{what}: {err}");
}

/// The versions of `vault/key` as `engine key list --output json` shows them.
fn versions(s: &TestServer, key: &str) -> Vec<Value> {
    let list: Value =
        serde_json::from_str(&s.cli_ok(&["engine", "key", "list", "vault", "--output", "json"]))
            .unwrap();
    list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == key)
        .unwrap()["versions"]
        .as_array()
        .unwrap()
        .clone()
}

/// Signs `msg` through the agent and checks the signature with `openssl dgst` and the
/// original public key `pub_pem`; returns the version that signed.
fn agent_signature_verifies_with_openssl(
    agent: &TestAgent,
    dir: &Path,
    msg: &Path,
    pub_pem: &Path,
) -> u64 {
    let sig = agent.dir.join("sig.der");
    let _ = std::fs::remove_file(&sig);
    let signed = json(&agent.cli(&[
        "engine",
        "sign",
        "--key",
        "signing",
        "--message-file",
        msg.to_str().unwrap(),
        "--out",
        sig.to_str().unwrap(),
        "--output",
        "json",
    ]));
    let local = dir.join("sig-copy.der");
    std::fs::copy(&sig, &local).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(pub_pem)
        .arg("-signature")
        .arg(&local)
        .arg(msg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl does not verify the imported key's signature: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    signed["version"].as_u64().unwrap()
}

/// AES-256-GCM with the original key through pyca/cryptography (OpenSSL): `open` a `cty1`
/// ciphertext of `vault/data` v`version`, or `seal` a plaintext into one. Hex in, hex out.
fn original_aes(op: &str, key: &[u8], version: u32, input: &[u8]) -> Vec<u8> {
    const SCRIPT: &str = r#"
import os, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
op, key, version, data = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3]), bytes.fromhex(sys.argv[4])
aad = b"continuity/engine/vault/data/v%d\x00" % version
head = b"cty1" + version.to_bytes(4, "big")
if op == "open":
    assert data[:8] == head, data[:8]
    print(AESGCM(key).decrypt(data[8:20], data[20:], aad).hex())
else:
    nonce = os.urandom(12)
    print((head + nonce + AESGCM(key).encrypt(nonce, data, aad)).hex())
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            SCRIPT,
            op,
            &hex::encode(key),
            &version.to_string(),
            &hex::encode(input),
        ])
        .output()
        .expect("python3 (scripts/setup installs PyPI cryptography)");
    hex::decode(ok(&out).trim()).unwrap()
}

fn import_into(custody: &str) {
    assert_eq!(
        uid(),
        0,
        "runs workloads as other uids: needs root (CI runs as root)"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut s, _hsm) = server_for(d, custody);
    for engine in ["vault", "other"] {
        s.cli_ok(&["engine", "create", engine, "--tier", tier_of(custody)]);
    }
    s.cli_ok(&[
        "engine",
        "key",
        "create",
        "vault",
        "signing",
        "--purpose",
        "sign",
    ]);
    s.cli_ok(&[
        "engine",
        "key",
        "create",
        "vault",
        "data",
        "--purpose",
        "encrypt",
    ]);
    let job = json(&s.cli(&[
        "engine",
        "key",
        "import-job",
        "create",
        "vault",
        "--output",
        "json",
    ]));
    let method = if custody == "hsm" {
        "RSA_OAEP_3072_SHA1_AES_256"
    } else {
        "RSA_OAEP_3072_SHA256_AES_256"
    };
    assert_eq!(job["method"], method, "{job}");
    assert_eq!(job["custody"], custody);
    assert_eq!(job["state"], "ACTIVE");
    assert_eq!(
        job["expires_at"].as_i64().unwrap() - job["created_at"].as_i64().unwrap(),
        3 * 24 * 3600
    );
    let (id, pem) = (
        job["id"].as_str().unwrap(),
        job["public_key_pem"].as_str().unwrap(),
    );
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    let listed = json(&s.cli(&[
        "engine",
        "key",
        "import-job",
        "list",
        "vault",
        "--output",
        "json",
    ]));
    assert_eq!(listed["jobs"][0]["id"], id);

    // Material made by openssl, wrapped by openssl for the job.
    let ec = import_wrap::p256_pkcs8(d).unwrap();
    let ec_pub = d.join("ec.pub.pem");
    let aes = import_wrap::aes256().unwrap();
    let wrapped_ec = import_wrap::wrap(d, pem, &ec, method).unwrap();
    let wrapped_aes = import_wrap::wrap(d, pem, &aes, method).unwrap();

    // Hostile input first: each refused with its status and reason, and nothing changes.
    let mut garbled = wrapped_ec.clone();
    *garbled.last_mut().unwrap() ^= 1;
    let other_job = json(&s.cli(&[
        "engine",
        "key",
        "import-job",
        "create",
        "other",
        "--output",
        "json",
    ]));
    let for_other = import_wrap::wrap(
        d,
        other_job["public_key_pem"].as_str().unwrap(),
        &ec,
        method,
    )
    .unwrap();
    let other_id = other_job["id"].as_str().unwrap();
    // (what, key, job, blob, gRPC code, reason)
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [u8], &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "garbled blob",
            "signing",
            id,
            &garbled,
            "InvalidArgument",
            "does not unwrap",
        ),
        (
            "truncated blob",
            "signing",
            id,
            &wrapped_ec[..200],
            "InvalidArgument",
            "too short",
        ),
        (
            "AES material into a sign key",
            "signing",
            id,
            &wrapped_aes,
            "InvalidArgument",
            "not",
        ),
        (
            "EC material into an encrypt key",
            "data",
            id,
            &wrapped_ec,
            "InvalidArgument",
            "AES-256",
        ),
        (
            "another Engine's job",
            "signing",
            other_id,
            &for_other,
            "InvalidArgument",
            "belongs to engine other",
        ),
        (
            "unknown job",
            "signing",
            "ij-0000000000000000",
            &wrapped_ec,
            "NotFound",
            "not found",
        ),
    ];
    let pub_flag = ["--public-key", ec_pub.to_str().unwrap()];
    for (what, key, job, blob, code, reason) in cases {
        let out = import(&s, d, key, job, blob, &pub_flag);
        refused(&out, code, reason, what);
        assert_eq!(versions(&s, key).len(), 1, "{what} changed the key");
    }
    if custody == "hsm" {
        // SoftHSM2 keeps no public point on an imported EC private key: it must be given.
        let out = import(&s, d, "signing", id, &wrapped_ec, &[]);
        refused(
            &out,
            "InvalidArgument",
            "--public-key",
            "hsm import without the public key",
        );
        // A SHA-256 job is refused when made: the token does OAEP with SHA-1 only.
        let out = s.cli(&[
            "engine",
            "key",
            "import-job",
            "create",
            "vault",
            "--method",
            "RSA_OAEP_3072_SHA256_AES_256",
        ]);
        refused(
            &out,
            "FailedPrecondition",
            "RSA_OAEP_3072_SHA1_AES_256",
            "SHA-256 job on SoftHSM2",
        );
    }

    // The imports. transit derives the public key from the material; hsm is given it.
    let extra: &[&str] = if custody == "hsm" { &pub_flag } else { &[] };
    let key = json(&import(&s, d, "signing", id, &wrapped_ec, extra));
    assert_eq!(key["primary_version"], 2, "{key}");
    json(&import(&s, d, "data", id, &wrapped_aes, &[]));
    for k in ["signing", "data"] {
        let v = versions(&s, k);
        assert_eq!(v[1]["imported"], true, "{k}: {v:?}");
        assert!(
            v[0].get("imported").is_none(),
            "{k}: v1 is not imported: {v:?}"
        );
    }
    let text = s.cli_ok(&["engine", "key", "list", "vault"]);
    assert!(text.contains("kid signing-v2 imported"), "{text}");
    let audit = s.cli_ok(&["audit", "show"]);
    for action in ["key.import_job.create", "key.import", "key.endorse"] {
        assert!(
            audit.contains(action),
            "no {action} in the audit log:\n{audit}"
        );
    }
    assert!(audit.contains("refused"), "refusals are audited:\n{audit}");

    // A workload uses them through the agent.
    s.create_entry_with_engine(ALIAS, &format!("unix:uid:{}", uid()), "vault");
    let mut agent = TestAgent::start(&d.join("agent"), &s, &s.token(Some(ALIAS)));
    wait_for(30, "the agent serves signing-v2", || {
        agent
            .cli(&["engine", "public-key", "--key", "signing", "--version", "2"])
            .status
            .success()
    });
    let served = ok(&agent.cli(&["engine", "public-key", "--key", "signing", "--version", "2"]));
    assert_eq!(
        served.trim(),
        std::fs::read_to_string(&ec_pub).unwrap().trim(),
        "the served public key is the original"
    );
    let msg = public_file(&agent.dir, "msg.txt", b"transfer 100 to account 7");
    assert_eq!(
        agent_signature_verifies_with_openssl(&agent, d, &msg, &ec_pub),
        2
    );
    // Endorsed by v1: a relying party pinned to v1 follows the chain to the imported key.
    let v1 = ok(&agent.cli(&["engine", "public-key", "--key", "signing", "--version", "1"]));
    let pinned = public_file(&agent.dir, "v1.pem", v1.as_bytes());
    let chain = json(&agent.cli(&[
        "engine",
        "verify-chain",
        "--key",
        "signing",
        "--pinned",
        pinned.to_str().unwrap(),
        "--output",
        "json",
    ]));
    let path: Vec<u64> = chain["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["version"].as_u64().unwrap())
        .collect();
    assert_eq!(path, [1, 2], "{chain}");

    // AES: the Engine's ciphertext opens with the original key, and the other way.
    let enc = agent.dir.join("secret.bin");
    ok(&agent.cli(&[
        "engine",
        "encrypt",
        "--key",
        "data",
        "--in",
        msg.to_str().unwrap(),
        "--out",
        enc.to_str().unwrap(),
    ]));
    let sealed = std::fs::read(&enc).unwrap();
    assert_eq!(
        original_aes("open", &aes, 2, &sealed),
        b"transfer 100 to account 7"
    );
    let theirs = original_aes("seal", &aes, 2, b"sealed by the original key");
    let theirs_file = public_file(&agent.dir, "theirs.bin", &theirs);
    let dec = agent.dir.join("theirs.txt");
    ok(&agent.cli(&[
        "engine",
        "decrypt",
        "--key",
        "data",
        "--in",
        theirs_file.to_str().unwrap(),
        "--out",
        dec.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(&dec).unwrap(), b"sealed by the original key");

    // After a server restart the imported versions are found again (token object or sealed
    // blob) and still work as the original.
    s.restart();
    agent.restart();
    wait_for(60, "the agent signs again after the restart", || {
        agent
            .cli(&["engine", "public-key", "--key", "signing", "--version", "2"])
            .status
            .success()
    });
    let mut signed_again = 0;
    wait_for(60, "a signature after the restart", || {
        let out = agent.cli(&[
            "engine",
            "sign",
            "--key",
            "signing",
            "--message-file",
            msg.to_str().unwrap(),
            "--output",
            "json",
        ]);
        out.status.success() && {
            signed_again = serde_json::from_slice::<Value>(&out.stdout).unwrap()["version"]
                .as_u64()
                .unwrap();
            true
        }
    });
    assert_eq!(signed_again, 2);
    assert_eq!(
        agent_signature_verifies_with_openssl(&agent, d, &msg, &ec_pub),
        2
    );
    ok(&agent.cli(&[
        "engine",
        "decrypt",
        "--key",
        "data",
        "--in",
        theirs_file.to_str().unwrap(),
        "--out",
        dec.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(&dec).unwrap(), b"sealed by the original key");
    assert_eq!(versions(&s, "signing")[1]["imported"], true);
}

#[test]
fn openssl_made_keys_imported_into_hsm_custody_interoperate_with_openssl() {
    import_into("hsm");
}

#[test]
fn openssl_made_keys_imported_into_transit_custody_interoperate_with_openssl() {
    import_into("transit");
}
