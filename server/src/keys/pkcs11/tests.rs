//! Tests of the pkcs11 key manager on a throwaway SoftHSM2 token. PKCS#11 modules read
//! SOFTHSM2_CONF when loaded, so the checks run in a child process (this test binary running
//! the ignored helper) with it set.

use super::*;

pub(super) const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

#[test]
fn keys_sign_through_a_sensitive_session_copy_that_dies_with_the_key() {
    in_child("keys::pkcs11::tests::session_copy_helper");
}

/// Runs the ignored test `helper` of this binary in a child process on a fresh token
/// labelled `unit` (PIN in UNIT_TOKEN_PIN); it must print `HELPER OK`.
pub(super) fn in_child(helper: &str) {
    if !Path::new(MODULE).exists() {
        eprintln!("SoftHSM2 is not installed ({MODULE}); scripts/setup installs it");
        return;
    }
    let dir = std::env::temp_dir().join(format!(
        "continuity-pkcs11-unit-{}-{}",
        std::process::id(),
        helper.rsplit("::").next().unwrap_or(helper)
    ));
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let init = std::process::Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args([
            "--init-token",
            "--free",
            "--label",
            "unit",
            "--so-pin",
            "87654321",
            "--pin",
            "4321",
        ])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", helper, "--ignored", "--nocapture"])
        .env("SOFTHSM2_CONF", &conf)
        .env("UNIT_TOKEN_PIN", "4321")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && text.contains("HELPER OK"),
        "helper failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
#[ignore = "helper: run by keys_sign_through_a_sensitive_session_copy_that_dies_with_the_key"]
async fn session_copy_helper() {
    let km = Pkcs11KeyManager::open(
        Path::new(MODULE),
        "unit",
        &PinSource::Env("UNIT_TOKEN_PIN".into()),
    )
    .unwrap();
    let key = km.generate("k1", KeyType::EcP256).await.unwrap();
    let check = |key: &Arc<dyn KeyHandle>| {
        let sig = key.sign(b"message").unwrap();
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
            key.public_key_raw(),
        )
        .verify(b"message", &sig)
        .unwrap();
    };
    check(&key);
    // The object C_Sign uses is a session copy: not on the token, still sensitive and
    // never extractable.
    let (_, copy) = *km.token.copies.lock().unwrap().get("k1").unwrap();
    let attrs = km
        .token
        .with_session(|s| {
            s.get_attributes(
                copy,
                &[
                    AttributeType::Token,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                ],
            )
            .map_err(ck("attributes"))
        })
        .unwrap();
    for a in &attrs {
        match a {
            Attribute::Token(v) => assert!(!v, "the copy is a session object"),
            Attribute::Sensitive(v) => assert!(v, "the copy is sensitive"),
            Attribute::Extractable(v) => assert!(!v, "the copy is not extractable"),
            _ => {}
        }
    }
    assert_eq!(attrs.len(), 3);
    // Found again by label (one copy, not a copy of the copy), and still signing.
    let again = km.get("k1").await.unwrap().unwrap();
    check(&again);
    assert_eq!(km.token.copies.lock().unwrap().len(), 1);
    // Deleting the key destroys the copy too: neither handle signs any more.
    km.delete("k1").await.unwrap();
    assert!(key.sign(b"message").is_err(), "a deleted key still signs");
    assert!(again.sign(b"message").is_err(), "a deleted key still signs");
    assert!(km.get("k1").await.unwrap().is_none());
    // A key generated again under an id whose earlier objects were left behind (a commit that
    // failed after generation) signs with its own private key, not the earlier one's copy.
    let first = km.generate("k2", KeyType::EcP256).await.unwrap();
    check(&first);
    let second = km.generate("k2", KeyType::EcP256).await.unwrap();
    assert_ne!(first.public_key_raw(), second.public_key_raw());
    check(&second);
    mac_keys_stay_in_the_token(&km).await;
    println!("HELPER OK");
}

/// HMAC keys: made once per id inside the token, sensitive and never extractable, found again
/// by label (same tags), a different id is a different key, and a wrong tag does not verify.
async fn mac_keys_stay_in_the_token(km: &Pkcs11KeyManager) {
    let m = km.mac_key("record-mac").await.unwrap();
    let tag = m.mac(b"row").unwrap();
    assert!(m.verify(b"row", &tag).unwrap());
    assert!(!m.verify(b"rov", &tag).unwrap());
    assert!(!m.verify(b"row", &tag[..31]).unwrap());
    let again = km.mac_key("record-mac").await.unwrap();
    assert_eq!(
        again.mac(b"row").unwrap(),
        tag,
        "found again, not made anew"
    );
    let other = km.mac_key("audit-mac").await.unwrap();
    assert_ne!(other.mac(b"row").unwrap(), tag);
    // The AES key and key pair namespaces do not collide with MAC keys of the same id.
    let kek = km.kek("record-mac").await.unwrap();
    assert!(kek.seal(b"x", b"").is_ok());
    assert_eq!(
        km.mac_key("record-mac").await.unwrap().mac(b"row").unwrap(),
        tag
    );
    let handle = km
        .token
        .with_session(|s| km.token.find(s, "hmac/record-mac", ObjectClass::SECRET_KEY))
        .unwrap()
        .unwrap();
    let attrs = km
        .token
        .with_session(|s| {
            s.get_attributes(
                handle,
                &[AttributeType::Sensitive, AttributeType::Extractable],
            )
            .map_err(ck("attributes"))
        })
        .unwrap();
    assert_eq!(attrs.len(), 2);
    for a in &attrs {
        match a {
            Attribute::Sensitive(v) => assert!(v, "the MAC key is sensitive"),
            Attribute::Extractable(v) => assert!(!v, "the MAC key is not extractable"),
            _ => {}
        }
    }
}
