//! Key import into a throwaway SoftHSM2 token: blobs wrapped as a KMS client wraps them
//! (OAEP SHA-1, the token's only OAEP hash, then AES-KWP) unwrap inside the token into keys
//! that sign and encrypt as the original material does; refused blobs leave nothing behind.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, EcdsaKeyPair, KeyPair, UnparsedPublicKey};

use super::tests::{MODULE, in_child};
use super::*;
use crate::keys::ImportTarget;
use crate::keys::import_wrap::OaepHash;
use crate::keys::import_wrap::tests::wrap_with;

#[test]
fn imported_material_is_unwrapped_inside_the_token_and_works_as_the_original() {
    in_child("keys::pkcs11::import_tests::import_helper");
}

fn request(
    id: &str,
    target: ImportTarget,
    blob: Vec<u8>,
    public: Option<Vec<u8>>,
) -> ImportRequest {
    ImportRequest {
        wrapping_id: "job1".into(),
        id: id.into(),
        target,
        hash: OaepHash::Sha1,
        blob,
        public,
    }
}

/// Whether any object labelled for `id` is in the token.
fn leftovers(km: &Pkcs11KeyManager, id: &str) -> bool {
    km.token
        .with_session(|s| {
            for class in [
                ObjectClass::PRIVATE_KEY,
                ObjectClass::PUBLIC_KEY,
                ObjectClass::SECRET_KEY,
            ] {
                if km.token.find_any(s, id, class)?.is_some() {
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .unwrap()
}

#[tokio::test]
#[ignore = "helper: run by imported_material_is_unwrapped_inside_the_token_and_works_as_the_original"]
async fn import_helper() {
    let km = Pkcs11KeyManager::open(
        Path::new(MODULE),
        "unit",
        &PinSource::Env("UNIT_TOKEN_PIN".into()),
    )
    .unwrap();
    // SoftHSM2's OAEP is SHA-1 only: a SHA-256 job is refused when made, and leaves nothing.
    let err = km
        .generate_wrapping_key("job256", OaepHash::Sha256)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("RSA_OAEP_3072_SHA1_AES_256"),
        "{err}"
    );
    assert!(!leftovers(&km, "job256"));
    let spki = km
        .generate_wrapping_key("job1", OaepHash::Sha1)
        .await
        .unwrap();
    wrapping_key_only_unwraps(&km);
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .unwrap();
    let original = EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.as_ref(),
    )
    .unwrap();
    let original_spki = crate::keys::spki_of(KeyType::EcP256, original.public_key().as_ref());
    let blob = wrap_with(&spki, pkcs8.as_ref(), OaepHash::Sha1);
    let signer = ImportTarget::Signer(KeyType::EcP256);

    // SoftHSM2 keeps no public point on an EC private key: without the public key, refused.
    let err = km
        .unwrap_import(request("imp-ec", signer, blob.clone(), None))
        .await
        .unwrap_err();
    assert!(matches!(err, KeyError::Rejected(_)), "{err}");
    assert!(err.to_string().contains("--public-key"), "{err}");
    assert!(
        !leftovers(&km, "imp-ec"),
        "a refused import left objects in the token"
    );
    // Another key's public half is refused too (the token's signature does not verify).
    let other =
        EcdsaKeyPair::generate_pkcs8(&aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .unwrap();
    let other = EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        other.as_ref(),
    )
    .unwrap();
    let wrong = crate::keys::spki_of(KeyType::EcP256, other.public_key().as_ref());
    let err = km
        .unwrap_import(request("imp-ec", signer, blob.clone(), Some(wrong)))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not the imported private key's"),
        "{err}"
    );
    assert!(!leftovers(&km, "imp-ec"));

    // With its public key: the token signs, the original public key verifies.
    let Imported::Signer(key) = km
        .unwrap_import(request(
            "imp-ec",
            signer,
            blob.clone(),
            Some(original_spki.clone()),
        ))
        .await
        .unwrap()
    else {
        panic!("not a signer");
    };
    assert_eq!(key.spki_der(), original_spki);
    let sig = key.sign(b"imported").unwrap();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, original.public_key().as_ref())
        .verify(b"imported", &sig)
        .unwrap();
    // Found again by id, as after a restart, with the same public key.
    let again = km.get("imp-ec").await.unwrap().unwrap();
    assert_eq!(again.public_key_raw(), original.public_key().as_ref());
    // The imported private key is sensitive and never extractable.
    let attrs = km
        .token
        .with_session(|s| {
            let h = km
                .token
                .find(s, "imp-ec", ObjectClass::PRIVATE_KEY)?
                .unwrap();
            s.get_attributes(h, &[AttributeType::Sensitive, AttributeType::Extractable])
                .map_err(ck("attributes"))
        })
        .unwrap();
    assert!(
        matches!(
            attrs.as_slice(),
            [Attribute::Sensitive(true), Attribute::Extractable(false)]
        ),
        "{attrs:?}"
    );

    imported_rsa_key_checks_a_given_public_key(&km, &spki).await;
    imported_aes_key_interoperates(&km, &spki).await;
    hostile_blobs_are_refused(&km, &spki, pkcs8.as_ref(), &original_spki).await;
    println!("HELPER OK");
}

/// An RSA private key's public half comes from the token; a public key given must be it (an
/// operator who wrapped the wrong key learns so, as in transit custody).
async fn imported_rsa_key_checks_a_given_public_key(km: &Pkcs11KeyManager, spki: &[u8]) {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::KeySize;
    use aws_lc_rs::signature::RsaKeyPair;
    let pkcs8 = |k: &RsaKeyPair| k.as_der().unwrap().as_ref().to_vec();
    let (original, other) = (
        RsaKeyPair::generate(KeySize::Rsa2048).unwrap(),
        RsaKeyPair::generate(KeySize::Rsa2048).unwrap(),
    );
    let spki_of = |k: &RsaKeyPair| crate::keys::spki_of(KeyType::Rsa2048, k.public_key().as_ref());
    let blob = wrap_with(spki, &pkcs8(&original), OaepHash::Sha1);
    let signer = ImportTarget::Signer(KeyType::Rsa2048);
    let err = km
        .unwrap_import(request(
            "imp-rsa",
            signer,
            blob.clone(),
            Some(spki_of(&other)),
        ))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not the imported private key's"),
        "{err}"
    );
    assert!(!leftovers(km, "imp-rsa"), "a refused import left objects");
    for given in [None, Some(spki_of(&original))] {
        let id = if given.is_some() {
            "imp-rsa-given"
        } else {
            "imp-rsa"
        };
        let Imported::Signer(key) = km
            .unwrap_import(request(id, signer, blob.clone(), given))
            .await
            .unwrap()
        else {
            panic!("not a signer");
        };
        assert_eq!(key.spki_der(), spki_of(&original));
    }
}

/// The job's private key may unwrap and nothing else; it never leaves the token.
fn wrapping_key_only_unwraps(km: &Pkcs11KeyManager) {
    let attrs = km
        .token
        .with_session(|s| {
            let h = km.token.find(s, "job1", ObjectClass::PRIVATE_KEY)?.unwrap();
            s.get_attributes(
                h,
                &[
                    AttributeType::Unwrap,
                    AttributeType::Decrypt,
                    AttributeType::Sign,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                ],
            )
            .map_err(ck("attributes"))
        })
        .unwrap();
    assert!(
        matches!(
            attrs.as_slice(),
            [
                Attribute::Unwrap(true),
                Attribute::Decrypt(false),
                Attribute::Sign(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false)
            ]
        ),
        "{attrs:?}"
    );
}

/// An imported AES-256 key decrypts what the original key encrypted, and the other way.
async fn imported_aes_key_interoperates(km: &Pkcs11KeyManager, spki: &[u8]) {
    let raw: [u8; 32] = continuity_common::rand::array().unwrap();
    let blob = wrap_with(spki, &raw, OaepHash::Sha1);
    let Imported::Aes(key) = km
        .unwrap_import(request("imp-aes", ImportTarget::Aes, blob, None))
        .await
        .unwrap()
    else {
        panic!("not an AES key");
    };
    let original = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).unwrap());
    // nonce ‖ ciphertext ‖ tag, as the token makes it.
    let sealed = key.encrypt(b"plaintext", b"aad").unwrap();
    let (nonce, ct) = sealed.split_at(12);
    let mut buf = ct.to_vec();
    let clear = original
        .open_in_place(
            Nonce::try_assume_unique_for_key(nonce).unwrap(),
            Aad::from(b"aad"),
            &mut buf,
        )
        .unwrap();
    assert_eq!(clear, b"plaintext");
    let nonce: [u8; 12] = continuity_common::rand::array().unwrap();
    let mut buf = b"the other way".to_vec();
    original
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(b"x"),
            &mut buf,
        )
        .unwrap();
    let sealed = [nonce.as_slice(), &buf].concat();
    assert_eq!(key.decrypt(&sealed, b"x").unwrap(), b"the other way");
}

/// Garbled, truncated, wrong-hash and wrong-type blobs: refused as the caller's error, and
/// nothing of them stays in the token.
async fn hostile_blobs_are_refused(
    km: &Pkcs11KeyManager,
    spki: &[u8],
    pkcs8: &[u8],
    public: &[u8],
) {
    let signer = ImportTarget::Signer(KeyType::EcP256);
    let good = wrap_with(spki, pkcs8, OaepHash::Sha1);
    let mut garbled_kwp = good.clone();
    *garbled_kwp.last_mut().unwrap() ^= 1;
    let mut garbled_rsa = good.clone();
    garbled_rsa[10] ^= 1;
    let aes: [u8; 32] = continuity_common::rand::array().unwrap();
    let cases: Vec<(&str, ImportTarget, Vec<u8>)> = vec![
        ("garbled KWP", signer, garbled_kwp),
        ("garbled RSA", signer, garbled_rsa),
        (
            "SHA-256 OAEP on a SHA-1 job",
            signer,
            wrap_with(spki, pkcs8, OaepHash::Sha256),
        ),
        (
            "AES material as a signer",
            signer,
            wrap_with(spki, &aes, OaepHash::Sha1),
        ),
        ("EC material as an AES key", ImportTarget::Aes, good.clone()),
        (
            "a 16-byte AES key",
            ImportTarget::Aes,
            wrap_with(spki, &aes[..16], OaepHash::Sha1),
        ),
        (
            "P-256 material as RSA",
            ImportTarget::Signer(KeyType::Rsa2048),
            good.clone(),
        ),
    ];
    for (what, target, blob) in cases {
        let err = km
            .unwrap_import(request("imp-bad", target, blob, Some(public.to_vec())))
            .await
            .expect_err(what);
        assert!(matches!(err, KeyError::Rejected(_)), "{what}: {err}");
        assert!(
            !leftovers(km, "imp-bad"),
            "{what} left objects in the token"
        );
    }
    let err = km
        .unwrap_import(request("imp-bad", signer, good[..200].to_vec(), None))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("too short"), "{err}");
}
