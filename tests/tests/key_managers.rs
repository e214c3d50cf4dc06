//! Key custody of the trust domain's own keys: PKCS#11 on a throwaway SoftHSM2 token, and the
//! disk key manager, both across a server restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use continuity_proto::agent::{BatchNewX509svidRequest, NewX509svidParams};
use continuity_tests::agent_client::{attest, key_and_csr};
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::softhsm::{MODULE, SoftHsm};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

fn jwks_kids(s: &TestServer) -> Vec<String> {
    let doc: serde_json::Value =
        serde_json::from_str(&s.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

async fn sign_and_verify_with_openssl(s: &TestServer, dir: &std::path::Path) {
    let mut agent = attest(&s.addr, s.bundle_der(), &s.token(None))
        .await
        .unwrap();
    let entry = s.create_entry(
        &format!("spiffe://example.org/w{}", rand_suffix()),
        &agent.id,
        &["unix:uid:1000"],
    );
    let (_kp, csr) = key_and_csr();
    let resp = agent
        .client
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: entry,
                csr,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let leaf = resp.results[0].svid.as_ref().expect("signed").cert_chain[0].clone();
    std::fs::write(dir.join("bundle.pem"), s.cli_ok(&["bundle", "show"])).unwrap();
    std::fs::write(
        dir.join("leaf.pem"),
        continuity_common::x509::pem_encode("CERTIFICATE", &leaf),
    )
    .unwrap();
    let out = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.join("bundle.pem"))
        .arg(dir.join("leaf.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[tokio::test]
async fn pkcs11_keys_live_in_the_token_unextractable_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::new(&dir.path().join("hsm"), "continuity-test");
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
    let bundle_before = s.bundle_der();
    let kids_before = jwks_kids(&s);
    assert_eq!(bundle_before.len(), 1);
    assert_eq!(kids_before.len(), 1);
    sign_and_verify_with_openssl(&s, dir.path()).await;
    assert!(!s.log().contains(&hsm.pin), "PIN leaked into the log");

    // Inspect the token with the server stopped: the CA and JWT keys are token objects that
    // can never leave it. PKCS#11 reads SOFTHSM2_CONF at load time, so the inspection runs in a
    // child process (this test binary, running the ignored helper below) with it set.
    s.stop();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "token_inspector", "--ignored", "--nocapture"])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env("INSPECT_TOKEN_LABEL", &hsm.label)
        .env("INSPECT_TOKEN_PIN", &hsm.pin)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "inspector failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("KEY "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Besides the audit log's checkpoint key (checked like the others below).
    let ca_and_jwt = report
        .iter()
        .filter(|k| k["label"] != "continuity/audit-checkpoint")
        .count();
    assert_eq!(ca_and_jwt, 2, "one CA key and one JWT key: {stdout}");
    for k in &report {
        assert_eq!(k["token"], true, "CKA_TOKEN {k}");
        assert_eq!(k["private"], true, "CKA_PRIVATE {k}");
        assert_eq!(k["sensitive"], true, "CKA_SENSITIVE {k}");
        assert_eq!(k["extractable"], false, "CKA_EXTRACTABLE {k}");
        assert_eq!(k["never_extractable"], true, "CKA_NEVER_EXTRACTABLE {k}");
        assert!(
            k["label"].as_str().unwrap().starts_with("continuity/"),
            "{k}"
        );
    }

    // Restart: the same keys (same bundle, same kids) are found again by label.
    s.restart();
    assert_eq!(s.bundle_der(), bundle_before, "same CA after restart");
    assert_eq!(jwks_kids(&s), kids_before, "same JWT kid after restart");
    sign_and_verify_with_openssl(&s, dir.path()).await;
}

/// Helper run in a child process by the test above: prints the attributes of every private
/// key in the token named by INSPECT_TOKEN_LABEL.
#[test]
#[ignore = "helper: run by pkcs11_keys_live_in_the_token_unextractable_and_survive_restart"]
fn token_inspector() {
    let label = std::env::var("INSPECT_TOKEN_LABEL").unwrap();
    let pin = std::env::var("INSPECT_TOKEN_PIN").unwrap();
    let ctx = Pkcs11::new(MODULE).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == label)
        .unwrap();
    let session = ctx.open_ro_session(slot).unwrap();
    session
        .login(UserType::User, Some(&AuthPin::new(pin.into())))
        .unwrap();
    for k in session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap()
    {
        let mut report = serde_json::Map::new();
        let wanted = [
            AttributeType::Token,
            AttributeType::Private,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::NeverExtractable,
            AttributeType::Label,
        ];
        for a in session.get_attributes(k, &wanted).unwrap() {
            let (name, value) = match a {
                Attribute::Token(v) => ("token", v.into()),
                Attribute::Private(v) => ("private", v.into()),
                Attribute::Sensitive(v) => ("sensitive", v.into()),
                Attribute::Extractable(v) => ("extractable", v.into()),
                Attribute::NeverExtractable(v) => ("never_extractable", v.into()),
                Attribute::Label(l) => ("label", String::from_utf8(l).unwrap().into()),
                _ => continue,
            };
            report.insert(name.into(), value);
        }
        println!("KEY {}", serde_json::Value::Object(report));
    }
    drop(session);
    ctx.finalize().unwrap();
}

#[tokio::test]
async fn disk_keys_are_0600_and_survive_restart() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    let bundle_before = s.bundle_der();
    let kids_before = jwks_kids(&s);
    let keys_dir = dir.path().join("server/data/keys");
    let files: Vec<_> = std::fs::read_dir(&keys_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    // The CA and JWT keys, beside the HMAC keys (`*.mac`: record MACs, audit chain) and the
    // audit checkpoint signing key (0600 like every file here).
    let ca_and_jwt = files
        .iter()
        .filter(|f| f.extension().is_none_or(|x| x != "mac"))
        .filter(|f| {
            !f.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("audit-")
        })
        .count();
    assert_eq!(ca_and_jwt, 2, "{files:?}");
    assert!(
        files.iter().any(|f| f.ends_with("record-mac.mac")),
        "{files:?}"
    );
    for f in files {
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            f.display()
        );
    }
    assert_eq!(
        std::fs::metadata(&keys_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    s.restart();
    assert_eq!(s.bundle_der(), bundle_before);
    assert_eq!(jwks_kids(&s), kids_before);
    sign_and_verify_with_openssl(&s, dir.path()).await;
}
