//! Engine key import, the part built so far: material made and wrapped by the openssl CLI
//! (tests/src/import_wrap.rs) is unwrapped byte-exact by the server's import-job key, and a
//! garbled or truncated blob is refused. The import RPCs and CLI are not built yet.

#![allow(clippy::unwrap_used)]

use base64::Engine as _;
use continuity_server::keys::import_wrap::{OaepHash, WrappingKey};
use continuity_tests::import_wrap;

/// The SPKI PEM of a job key, as `import-job create` is to print it.
fn pem(key: &WrappingKey) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(key.spki_der().unwrap());
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        lines.join("\n")
    )
}

#[test]
fn openssl_wrapped_p256_and_aes_unwrap_to_the_original_material() {
    let dir = tempfile::tempdir().unwrap();
    let job = WrappingKey::generate().unwrap();
    let ec = import_wrap::p256_pkcs8(dir.path()).unwrap();
    let aes = import_wrap::aes256().unwrap();
    for material in [&ec, &aes] {
        let blob = import_wrap::wrap(dir.path(), &pem(&job), material).unwrap();
        assert_eq!(
            job.unwrap(&blob, OaepHash::Sha256).unwrap().as_slice(),
            material.as_slice()
        );
    }
}

#[test]
fn import_blob_garbled_truncated_or_for_another_job_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let job = WrappingKey::generate().unwrap();
    let other = WrappingKey::generate().unwrap();
    let aes = import_wrap::aes256().unwrap();
    let blob = import_wrap::wrap(dir.path(), &pem(&job), &aes).unwrap();
    let mut garbled = blob.clone();
    let last = garbled.len() - 1;
    garbled[last] ^= 1;
    assert!(
        job.unwrap(&garbled, OaepHash::Sha256).is_err(),
        "garbled KWP part accepted"
    );
    assert!(
        job.unwrap(&blob[..blob.len() - 8], OaepHash::Sha256)
            .is_err(),
        "truncated blob accepted"
    );
    assert!(
        job.unwrap(&blob[..100], OaepHash::Sha256).is_err(),
        "short RSA part accepted"
    );
    assert!(
        other.unwrap(&blob, OaepHash::Sha256).is_err(),
        "blob of another job accepted"
    );
}
