//! Envelope encryption end to end: GenerateDataKey and Rewrap through a real agent and
//! server, for transit custody and hsm custody (SoftHSM2), and the CRC32C integrity fields
//! of every payload-carrying call (a wrong checksum is refused before anything happens).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use continuity_common::checksum::crc32c;
use continuity_proto::engine::engine_api_client::EngineApiClient;
use continuity_proto::engine::{
    DecryptRequest, EncryptRequest, GenerateDataKeyRequest, RewrapRequest, SignRequest,
};
use continuity_tests::agent::TestAgent;
use continuity_tests::engines::{audit_count, json, ok, server_for, tier_of, wait_for};
use continuity_tests::{uid, with_header};

const ALIAS: &str = "spiffe://example.org/node/datakeys";

/// The key version a Continuity ciphertext names (after its 4-byte magic).
fn named_version(ct: &[u8]) -> u32 {
    u32::from_be_bytes(ct[4..8].try_into().unwrap())
}

fn data_key_round_trip(custody: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (s, _hsm) = server_for(dir.path(), custody);
    let e = json(&s.cli(&[
        "engine",
        "create",
        "env",
        "--tier",
        tier_of(custody),
        "--output",
        "json",
    ]));
    assert_eq!(e["custody"], custody);
    s.cli_ok(&[
        "engine",
        "key",
        "create",
        "env",
        "data",
        "--purpose",
        "encrypt",
    ]);
    s.create_entry_with_engine(ALIAS, &format!("unix:uid:{}", uid()), "env");
    let agent = TestAgent::start(&dir.path().join("agent"), &s, &s.token(Some(ALIAS)));
    let a = agent.dir.display().to_string();
    let (pt, wrapped) = (format!("{a}/dk.bin"), format!("{a}/dk.wrapped"));
    wait_for(30, "the Engine is bound", || {
        agent
            .cli(&["engine", "data-key", "--key", "data", "--wrapped-only"])
            .status
            .success()
    });

    // Plaintext and wrapped: Decrypt(wrapped) is the plaintext.
    let dk = json(&agent.cli(&[
        "engine",
        "data-key",
        "--key",
        "data",
        "--out-plaintext",
        &pt,
        "--out-wrapped",
        &wrapped,
        "--output",
        "json",
    ]));
    assert_eq!(dk["version"], 1, "{dk}");
    assert_eq!(dk["key_spec"], "AES_256", "{dk}");
    assert!(dk.get("plaintext").is_none(), "written to the file: {dk}");
    let key = std::fs::read(&pt).unwrap();
    assert_eq!(key.len(), 32, "an AES-256 key");
    let dec = format!("{a}/dk.dec");
    ok(&agent.cli(&[
        "engine", "decrypt", "--key", "data", "--in", &wrapped, "--out", &dec,
    ]));
    assert_eq!(std::fs::read(&dec).unwrap(), key);

    // Wrapped only: no plaintext comes back, and the wrapped key still decrypts.
    let only = json(&agent.cli(&[
        "engine",
        "data-key",
        "--key",
        "data",
        "--wrapped-only",
        "--output",
        "json",
    ]));
    assert!(only.get("plaintext").is_none(), "{only}");
    let only_ct = base64_decode(only["wrapped"].as_str().unwrap());
    assert_eq!(named_version(&only_ct), 1);

    // Rotate, rewrap: the new ciphertext names v2 and decrypts to the same key.
    s.cli_ok(&["engine", "key", "rotate", "env", "data"]);
    let rewrapped = format!("{a}/dk.v2");
    let rw = json(&agent.cli(&[
        "engine", "rewrap", "--key", "data", "--in", &wrapped, "--out", &rewrapped, "--output",
        "json",
    ]));
    assert_eq!(
        (rw["from_version"].clone(), rw["version"].clone()),
        (1.into(), 2.into()),
        "{rw}"
    );
    let v2 = std::fs::read(&rewrapped).unwrap();
    assert_eq!(named_version(&v2), 2);
    assert_ne!(v2, std::fs::read(&wrapped).unwrap());
    let dec2 = format!("{a}/dk.dec2");
    ok(&agent.cli(&[
        "engine", "decrypt", "--key", "data", "--in", &rewrapped, "--out", &dec2,
    ]));
    assert_eq!(std::fs::read(&dec2).unwrap(), key);
    // The old ciphertext still decrypts with v1 (rotation does not disable it).
    ok(&agent.cli(&[
        "engine", "decrypt", "--key", "data", "--in", &wrapped, "--out", &dec2,
    ]));
    assert_eq!(std::fs::read(&dec2).unwrap(), key);
    let audit = s.cli_ok(&["audit", "show"]);
    assert!(audit.contains("key.generate_data_key"), "{audit}");
    assert!(audit.contains("key.rewrap"), "{audit}");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn data_keys_and_rewrap_in_transit_custody() {
    data_key_round_trip("transit");
}

#[test]
fn data_keys_and_rewrap_in_hsm_custody() {
    data_key_round_trip("hsm");
}

fn invalid_checksum(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("{field}_crc32c checksum mismatch")),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_crc32c_is_refused_and_nothing_happens() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _hsm) = server_for(dir.path(), "transit");
    s.cli_ok(&["engine", "create", "env", "--tier", "1"]);
    s.cli_ok(&[
        "engine",
        "key",
        "create",
        "env",
        "data",
        "--purpose",
        "encrypt",
    ]);
    s.cli_ok(&[
        "engine",
        "key",
        "create",
        "env",
        "signing",
        "--purpose",
        "sign",
    ]);
    s.create_entry_with_engine(ALIAS, &format!("unix:uid:{}", uid()), "env");
    let agent = TestAgent::start(&dir.path().join("agent"), &s, &s.token(Some(ALIAS)));
    let ch = continuity_common::grpc::uds_channel(&agent.socket)
        .await
        .unwrap();
    let mut c = EngineApiClient::new(ch);
    let pt = b"envelope me".to_vec();
    let mut ready = None;
    for _ in 0..300 {
        let r = c
            .encrypt(with_header(EncryptRequest {
                key: "data".into(),
                plaintext: pt.clone(),
                plaintext_crc32c: Some(crc32c(&pt)),
                ..Default::default()
            }))
            .await;
        if let Ok(r) = r {
            ready = Some(r.into_inner());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let enc = ready.expect("the Engine was not bound within 30 s");
    assert!(
        enc.verified_plaintext_crc32c,
        "a given checksum is verified"
    );
    assert!(!enc.verified_aad_crc32c, "no aad checksum was given");
    assert_eq!(enc.ciphertext_crc32c, crc32c(&enc.ciphertext));
    let ct = enc.ciphertext;

    // Correct checksums everywhere: verified, and the response checksums match.
    let dec = c
        .decrypt(with_header(DecryptRequest {
            key: "data".into(),
            ciphertext: ct.clone(),
            ciphertext_crc32c: Some(crc32c(&ct)),
            aad_crc32c: Some(crc32c(b"")),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dec.plaintext, pt);
    assert!(dec.verified_ciphertext_crc32c && dec.verified_aad_crc32c);
    assert_eq!(dec.plaintext_crc32c, crc32c(&pt));
    let sig = c
        .sign(with_header(SignRequest {
            key: "signing".into(),
            message: pt.clone(),
            message_crc32c: Some(crc32c(&pt)),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(sig.verified_message_crc32c && !sig.verified_digest_crc32c);
    assert_eq!(sig.signature_crc32c, crc32c(&sig.signature));
    let dk = c
        .generate_data_key(with_header(GenerateDataKeyRequest {
            key: "data".into(),
            aad: b"ctx".to_vec(),
            aad_crc32c: Some(crc32c(b"ctx")),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(dk.verified_aad_crc32c);
    assert_eq!(dk.ciphertext_crc32c, crc32c(&dk.ciphertext));
    assert_eq!(dk.plaintext_crc32c, crc32c(&dk.plaintext));
    assert_eq!(dk.plaintext.len(), 32);
    let rw = c
        .rewrap(with_header(RewrapRequest {
            key: "data".into(),
            ciphertext: dk.ciphertext.clone(),
            ciphertext_crc32c: Some(crc32c(&dk.ciphertext)),
            aad: b"ctx".to_vec(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(rw.verified_ciphertext_crc32c && !rw.verified_aad_crc32c);
    assert_eq!(rw.ciphertext_crc32c, crc32c(&rw.ciphertext));

    // Corrupted checksums: InvalidArgument naming the field, and nothing reaches the log.
    let before = audit_count(&s);
    let bad = |data: &[u8]| Some(crc32c(data) ^ 1);
    let e = c
        .encrypt(with_header(EncryptRequest {
            key: "data".into(),
            plaintext: pt.clone(),
            plaintext_crc32c: bad(&pt),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    invalid_checksum(&e, "plaintext");
    let e = c
        .decrypt(with_header(DecryptRequest {
            key: "data".into(),
            ciphertext: ct.clone(),
            ciphertext_crc32c: bad(&ct),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    invalid_checksum(&e, "ciphertext");
    let e = c
        .sign(with_header(SignRequest {
            key: "signing".into(),
            message: pt.clone(),
            message_crc32c: bad(&pt),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    invalid_checksum(&e, "message");
    let e = c
        .generate_data_key(with_header(GenerateDataKeyRequest {
            key: "data".into(),
            aad: b"ctx".to_vec(),
            aad_crc32c: bad(b"ctx"),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    invalid_checksum(&e, "aad");
    let e = c
        .rewrap(with_header(RewrapRequest {
            key: "data".into(),
            ciphertext: dk.ciphertext.clone(),
            ciphertext_crc32c: bad(&dk.ciphertext),
            aad: b"ctx".to_vec(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    invalid_checksum(&e, "ciphertext");
    assert_eq!(
        audit_count(&s),
        before,
        "a refused checksum uses no key and writes no audit record"
    );
    // A data-key spec other than AES_256 is refused too.
    let e = c
        .generate_data_key(with_header(GenerateDataKeyRequest {
            key: "data".into(),
            key_spec: "AES_128".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("AES_256"), "{e:?}");
}
