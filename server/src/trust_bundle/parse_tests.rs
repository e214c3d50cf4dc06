#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use continuity_common::TrustDomain;
use serde_json::json;

use super::*;

fn td() -> TrustDomain {
    TrustDomain::new("other.org").unwrap()
}

fn cert(is_ca: bool) -> Vec<u8> {
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = if is_ca {
        rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
    } else {
        rcgen::IsCa::ExplicitNoCa
    };
    params.self_signed(&kp).unwrap().der().to_vec()
}

fn spki() -> Vec<u8> {
    let kp = rcgen::KeyPair::generate().unwrap();
    rcgen::PublicKeyData::subject_public_key_info(&kp)
}

fn pem(ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| continuity_common::x509::pem_encode("CERTIFICATE", d))
        .collect()
}

fn spiffe_doc(certs: &[Vec<u8>], jwt: &[(&str, Vec<u8>)]) -> String {
    let jwt: Vec<_> = jwt
        .iter()
        .map(|(kid, k)| continuity_common::jwk::JwtAuthority {
            key_id: kid,
            public_key: k,
        })
        .collect();
    continuity_common::jwk::spiffe_bundle(certs, &jwt, 7, 300)
        .unwrap()
        .to_string()
}

#[test]
fn pem_with_two_cas_parses_in_order() {
    let (a, b) = (cert(true), cert(true));
    let got = parse_bundle(
        &td(),
        pem(&[a.clone(), b.clone()]).as_bytes(),
        BundleFormat::Pem,
    )
    .unwrap();
    assert_eq!(got.trust_domain, td());
    assert_eq!(got.x509_authorities, vec![a, b]);
    assert!(got.jwt_authorities.is_empty());
    assert_eq!((got.sequence, got.refresh_hint), (0, 0));
}

#[test]
fn pem_refusals_name_the_problem() {
    let refused = |text: &str| parse_bundle(&td(), text.as_bytes(), BundleFormat::Pem).unwrap_err();
    assert_eq!(
        refused(""),
        BundleParseError::Pem("no CERTIFICATE block".into())
    );
    assert_eq!(
        refused("hello"),
        BundleParseError::Pem("no CERTIFICATE block".into())
    );
    let key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    assert!(matches!(refused(key), BundleParseError::Pem(m) if m.contains("PRIVATE KEY")));
    let cut = "-----BEGIN CERTIFICATE-----\nAAAA\n";
    assert!(matches!(refused(cut), BundleParseError::Pem(m) if m.contains("unterminated")));
    let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    assert!(matches!(
        refused(junk),
        BundleParseError::Certificate { index: 0, .. }
    ));
    let leaf = pem(&[cert(true), cert(false)]);
    match refused(&leaf) {
        BundleParseError::Certificate { index, reason } => {
            assert_eq!(index, 1);
            assert!(reason.contains("not a CA"), "{reason}");
        }
        other => panic!("a leaf certificate was not refused as such: {other:?}"),
    }
}

#[test]
fn size_and_encoding_are_bounded_before_parsing() {
    let big = vec![b' '; MAX_BUNDLE_BYTES + 1];
    assert_eq!(
        parse_bundle(&td(), &big, BundleFormat::Spiffe).unwrap_err(),
        BundleParseError::TooLarge(MAX_BUNDLE_BYTES + 1)
    );
    assert_eq!(
        parse_bundle(&td(), &[0xff, 0xfe], BundleFormat::Pem).unwrap_err(),
        BundleParseError::NotText
    );
    let many = json!({"keys": vec![json!({"use": "other"}); MAX_BUNDLE_KEYS + 1]}).to_string();
    assert_eq!(
        parse_bundle(&td(), many.as_bytes(), BundleFormat::Spiffe).unwrap_err(),
        BundleParseError::TooManyKeys
    );
}

#[test]
fn spiffe_document_round_trips_what_bundle_show_prints() {
    let (ca, k) = (cert(true), spki());
    let doc = spiffe_doc(std::slice::from_ref(&ca), &[("k1", k.clone())]);
    let got = parse_bundle(&td(), doc.as_bytes(), BundleFormat::Spiffe).unwrap();
    assert_eq!(got.x509_authorities, vec![ca]);
    assert_eq!(got.jwt_authorities.len(), 1);
    assert_eq!(got.jwt_authorities[0].key_id, "k1");
    assert_eq!(got.jwt_authorities[0].public_key, k);
    assert_eq!((got.sequence, got.refresh_hint), (7, 300));
}

#[test]
fn spiffe_document_refusals() {
    let refused = |v: serde_json::Value| {
        parse_bundle(&td(), v.to_string().as_bytes(), BundleFormat::Spiffe).unwrap_err()
    };
    assert!(matches!(
        parse_bundle(&td(), b"{not json", BundleFormat::Spiffe).unwrap_err(),
        BundleParseError::Json(_)
    ));
    assert_eq!(
        refused(json!({"kes": []})),
        BundleParseError::Json("no \"keys\" array".into())
    );
    assert_eq!(refused(json!({"keys": []})), BundleParseError::Empty);
    assert!(matches!(
        refused(json!({"keys": [], "spiffe_refresh_hint": -1})),
        BundleParseError::Json(m) if m.contains("spiffe_refresh_hint")
    ));
    assert!(matches!(
        refused(json!({"keys": [], "spiffe_sequence": "1"})),
        BundleParseError::Json(m) if m.contains("spiffe_sequence")
    ));
    let c = STANDARD.encode(cert(true));
    assert!(matches!(
        refused(json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [c, c]}]})),
        BundleParseError::Json(m) if m.contains("exactly one")
    ));
    assert!(matches!(
        refused(json!({"keys": [{"use": "x509-svid", "x5c": ["%%%"]}]})),
        BundleParseError::Json(m) if m.contains("base64")
    ));
    let leaf = STANDARD.encode(cert(false));
    assert!(matches!(
        refused(json!({"keys": [{"use": "x509-svid", "x5c": [leaf]}]})),
        BundleParseError::Certificate { index: 0, .. }
    ));
    assert!(matches!(
        refused(json!({"keys": [{"use": "jwt-svid", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]})),
        BundleParseError::JwtKey { reason, .. } if reason.contains("no kid")
    ));
    assert!(matches!(
        refused(json!({"keys": [{"use": "jwt-svid", "kid": "a", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]})),
        BundleParseError::JwtKey { kid, .. } if kid == "a"
    ));
    assert!(matches!(
        refused(json!({"keys": [{"use": "jwt-svid", "kid": "a", "kty": "oct", "k": "AA"}]})),
        BundleParseError::JwtKey { reason, .. } if reason.contains("unsupported")
    ));
    let k = spki();
    let twice = spiffe_doc(&[], &[("same", k.clone()), ("same", k)]);
    assert!(matches!(
        parse_bundle(&td(), twice.as_bytes(), BundleFormat::Spiffe).unwrap_err(),
        BundleParseError::JwtKey { reason, .. } if reason.contains("twice")
    ));
}

#[test]
fn keys_of_unknown_use_are_ignored() {
    let k = spki();
    let doc = spiffe_doc(&[], &[("k", k)]);
    let mut v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    v["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"use": "wit-svid", "kty": "nonsense"}));
    let got = parse_bundle(&td(), v.to_string().as_bytes(), BundleFormat::Spiffe).unwrap();
    assert_eq!(got.jwt_authorities.len(), 1);
    assert!(got.x509_authorities.is_empty());
}
