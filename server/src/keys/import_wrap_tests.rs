//! The import wrapping against blobs made as KMS clients make them: aws-lc-rs here, and the
//! openssl command line (pkeyutl OAEP + enc -id-aes256-wrap-pad).

use std::process::Command;

use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey};

use super::*;

/// Wraps `material` for the public key `spki` as a KMS client does (OAEP SHA-256).
fn wrap(spki: &[u8], material: &[u8]) -> Vec<u8> {
    wrap_with(spki, material, OaepHash::Sha256)
}

/// Wraps `material` for the public key `spki` with RSA-OAEP of `hash`, then AES-KWP.
pub(crate) fn wrap_with(spki: &[u8], material: &[u8], hash: OaepHash) -> Vec<u8> {
    let eph: [u8; 32] = continuity_common::rand::array().unwrap();
    let public =
        OaepPublicEncryptingKey::new(PublicEncryptingKey::from_der(spki).unwrap()).unwrap();
    let mut rsa = vec![0u8; public.ciphertext_size()];
    public
        .encrypt(
            match hash {
                OaepHash::Sha1 => &OAEP_SHA1_MGF1SHA1,
                OaepHash::Sha256 => &OAEP_SHA256_MGF1SHA256,
            },
            &eph,
            &mut rsa,
            None,
        )
        .unwrap();
    let mut kwp = vec![0u8; material.len() + 16];
    let n = AesKek::new(&AES_256, &eph)
        .unwrap()
        .wrap_with_padding(material, &mut kwp)
        .unwrap()
        .len();
    kwp.truncate(n);
    [rsa, kwp].concat()
}

#[test]
fn a_blob_wrapped_for_the_job_unwraps_to_the_material() {
    let job = WrappingKey::generate().unwrap();
    let spki = job.spki_der().unwrap();
    for material in [vec![7u8; 32], vec![1u8; 138], vec![9u8; 1217]] {
        let blob = wrap(&spki, &material);
        assert_eq!(*job.unwrap(&blob, OaepHash::Sha256).unwrap(), material);
    }
    // The sealed form round-trips.
    let again = WrappingKey::from_pkcs8(&job.pkcs8().unwrap()).unwrap();
    assert_eq!(again.spki_der().unwrap(), spki);
}

#[test]
fn malformed_blobs_are_refused_with_the_reason() {
    let job = WrappingKey::generate().unwrap();
    let blob = wrap(&job.spki_der().unwrap(), &[5u8; 32]);
    let err = |b: &[u8]| job.unwrap(b, OaepHash::Sha256).unwrap_err().to_string();
    assert!(
        err(&blob[..100]).contains("too short"),
        "{}",
        err(&blob[..100])
    );
    assert!(err(&blob[..blob.len() - 3]).contains("multiple of 8"));
    assert!(err(&vec![0u8; MAX_BLOB + 1]).contains("at most"));
    let mut flipped = blob.clone();
    flipped[10] ^= 1;
    assert!(err(&flipped).contains("RSA-OAEP part does not decrypt"));
    let mut flipped = blob.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert!(err(&flipped).contains("AES-KWP part does not unwrap"));
    // Another job's blob does not open with this one.
    let other = WrappingKey::generate().unwrap();
    let foreign = wrap(&other.spki_der().unwrap(), &[5u8; 32]);
    assert!(err(&foreign).contains("RSA-OAEP part does not decrypt"));
}

#[test]
fn a_blob_made_with_the_openssl_command_line_unwraps() {
    let dir = std::env::temp_dir().join(format!("continuity-import-wrap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let job = WrappingKey::generate().unwrap();
    let pem = continuity_common::x509::pem_encode("PUBLIC KEY", &job.spki_der().unwrap());
    let p = |n: &str| dir.join(n);
    std::fs::write(p("pub.pem"), pem).unwrap();
    let eph: [u8; 32] = continuity_common::rand::array().unwrap();
    std::fs::write(p("eph"), eph).unwrap();
    let target: [u8; 32] = continuity_common::rand::array().unwrap();
    std::fs::write(p("target"), target).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "pkeyutl",
        "-encrypt",
        "-pubin",
        "-inkey",
        "pub.pem",
        "-in",
        "eph",
        "-out",
        "rsa",
        "-pkeyopt",
        "rsa_padding_mode:oaep",
        "-pkeyopt",
        "rsa_oaep_md:sha256",
        "-pkeyopt",
        "rsa_mgf1_md:sha256",
    ]);
    run(&[
        "enc",
        "-id-aes256-wrap-pad",
        "-K",
        &hex::encode(eph),
        "-iv",
        "A65959A6",
        "-in",
        "target",
        "-out",
        "kwp",
    ]);
    let blob = [
        std::fs::read(p("rsa")).unwrap(),
        std::fs::read(p("kwp")).unwrap(),
    ]
    .concat();
    assert_eq!(*job.unwrap(&blob, OaepHash::Sha256).unwrap(), target);
    std::fs::remove_dir_all(&dir).unwrap();
}
