//! The CSR policy against real CSRs made by the `openssl` CLI.

use std::path::Path;
use std::process::Command;

use super::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl CLI is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A key made by `keygen` (openssl arguments writing `key.pem`) and a DER CSR for it signed
/// with `digest` (e.g. "-sha256"; empty for Ed25519), plus any extra `req` arguments.
fn csr(keygen: &[&str], digest: &str, extra: &[&str]) -> Vec<u8> {
    let dir = tempfile_dir();
    openssl(&dir, keygen);
    let mut args = vec!["req", "-new", "-key", "key.pem", "-subj", "/CN=x"];
    if !digest.is_empty() {
        args.push(digest);
    }
    args.extend(extra);
    args.extend(["-outform", "DER", "-out", "csr.der"]);
    openssl(&dir, &args);
    let der = std::fs::read(dir.join("csr.der")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    der
}

fn rsa(bits: &str) -> Vec<String> {
    vec![
        "genpkey".into(),
        "-algorithm".into(),
        "RSA".into(),
        "-pkeyopt".into(),
        format!("rsa_keygen_bits:{bits}"),
        "-out".into(),
        "key.pem".into(),
    ]
}

fn ec(curve: &str) -> [&str; 7] {
    [
        "ecparam", "-name", curve, "-genkey", "-noout", "-out", "key.pem",
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn tempfile_dir() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "continuity-csr-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn strong_keys_and_algorithms_are_accepted() {
    let spki = check(&csr(&strs(&rsa("2048")), "-sha256", &[])).unwrap();
    assert!(!spki.is_empty());
    check(&csr(&strs(&rsa("3072")), "-sha384", &[])).unwrap();
    check(&csr(&ec("prime256v1"), "-sha256", &[])).unwrap();
    check(&csr(&ec("secp384r1"), "-sha384", &[])).unwrap();
    check(&csr(
        &["genpkey", "-algorithm", "ED25519", "-out", "key.pem"],
        "",
        &[],
    ))
    .unwrap();
    // rcgen's default (what the agent sends).
    let kp = rcgen::KeyPair::generate().unwrap();
    let der = rcgen::CertificateParams::default()
        .serialize_request(&kp)
        .unwrap();
    check(der.der()).unwrap();
}

#[test]
fn rsa_1024_with_sha256_is_refused_naming_the_size() {
    let e = check(&csr(&strs(&rsa("1024")), "-sha256", &[])).unwrap_err();
    assert_eq!(e, CsrError::RsaModulus { bits: 1024 });
    assert!(e.to_string().contains("1024 bits"), "{e}");
}

#[test]
fn sha1_and_md5_signatures_are_refused_naming_the_hash() {
    let e = check(&csr(&strs(&rsa("2048")), "-sha1", &[])).unwrap_err();
    assert!(
        matches!(e, CsrError::WeakHash { hash: "SHA-1", .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("SHA-1"), "{e}");
    let e = check(&csr(&ec("prime256v1"), "-sha1", &[])).unwrap_err();
    assert!(e.to_string().contains("ecdsa-with-SHA1"), "{e}");
    let e = check(&csr(&strs(&rsa("2048")), "-md5", &[])).unwrap_err();
    assert!(e.to_string().contains("MD5"), "{e}");
    // SHA-1 over a weak key: the hash is named first.
    let e = check(&csr(&strs(&rsa("1024")), "-sha1", &[])).unwrap_err();
    assert!(e.to_string().contains("SHA-1"), "{e}");
}

#[test]
fn weak_and_unsupported_curves_are_refused_naming_the_curve() {
    let e = check(&csr(&ec("prime192v1"), "-sha256", &[])).unwrap_err();
    assert!(matches!(e, CsrError::UnsupportedCurve(_)), "{e:?}");
    assert!(e.to_string().contains("P-192"), "{e}");
    let e = check(&csr(&ec("secp256k1"), "-sha256", &[])).unwrap_err();
    assert!(e.to_string().contains("secp256k1"), "{e}");
    let e = check(&csr(&ec("secp521r1"), "-sha512", &[])).unwrap_err();
    assert!(!matches!(e, CsrError::BadSignature), "{e:?}");
}

#[test]
fn an_rsa_exponent_other_than_65537_is_refused() {
    let mut keygen = rsa("2048");
    keygen.extend(["-pkeyopt".into(), "rsa_keygen_pubexp:3".into()]);
    let e = check(&csr(&strs(&keygen), "-sha256", &[])).unwrap_err();
    assert_eq!(e, CsrError::RsaExponent("3".into()));
}

#[test]
fn a_bad_self_signature_and_garbage_are_refused() {
    let mut der = csr(&ec("prime256v1"), "-sha256", &[]);
    // The signature BIT STRING ends the CSR: flip its last byte.
    let last = der.len() - 1;
    der[last] ^= 0x55;
    assert_eq!(check(&der).unwrap_err(), CsrError::BadSignature);
    // A CSR whose public key was swapped for another one's (signature no longer matches).
    let good = csr(&ec("prime256v1"), "-sha256", &[]);
    let other = csr(&ec("prime256v1"), "-sha256", &[]);
    let (a, b) = (check(&good).unwrap(), check(&other).unwrap());
    let pos = good.windows(a.len()).position(|w| w == a).unwrap();
    let mut swapped = good.clone();
    swapped[pos..pos + a.len()].copy_from_slice(&b);
    assert_eq!(check(&swapped).unwrap_err(), CsrError::BadSignature);
    for junk in [&b""[..], b"\x30\x03\x02\x01\x00", &[0xff; 64]] {
        assert!(matches!(check(junk), Err(CsrError::Malformed(_))));
    }
}

#[test]
fn requested_extensions_do_not_stop_a_strong_csr() {
    // The policy looks at the key and signature only; what the CSR asks for is ignored later
    // (see ca::tests::csr_requested_extensions_are_ignored).
    let der = csr(
        &ec("prime256v1"),
        "-sha256",
        &[
            "-addext",
            "subjectAltName=URI:spiffe://example.org/admin",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ],
    );
    check(&der).unwrap();
}

#[test]
fn unsigned_bits_counts_the_significant_bits() {
    assert_eq!(unsigned_bits(&[]), 0);
    assert_eq!(unsigned_bits(&[0, 0]), 0);
    assert_eq!(unsigned_bits(&[0x01, 0x00, 0x01]), 17);
    assert_eq!(unsigned_bits(&[0x00, 0x80]), 8);
}
