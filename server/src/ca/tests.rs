//! Rotation under a driven clock: prepare → activate → old keys dropped, with SVIDs from both
//! sides of the switch verifying against the bundle during the overlap.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use continuity_common::{ManualClock, TrustDomain};
use x509_parser::prelude::*;

use super::*;
use crate::keys::MemoryKeyManager;

const HOUR: u64 = 3600;

async fn ca(clock: Arc<ManualClock>) -> (Arc<CaManager>, std::path::PathBuf) {
    let (dir, _, store) = crate::datastore::scratch_sqlite("ca").await;
    let cfg = CaConfig {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        x509_key_type: KeyType::EcP256,
        jwt_key_type: KeyType::EcP256,
        ttl: Duration::from_secs(24 * HOUR),
        jwt_issuer: None,
        upstream: None,
    };
    let ca = CaManager::start(
        cfg,
        Arc::new(MemoryKeyManager::default()),
        Arc::new(store),
        clock,
    )
    .await
    .unwrap();
    (ca, dir)
}

fn leaf_key_spki() -> Vec<u8> {
    let kp = rcgen::KeyPair::generate().unwrap();
    rcgen::PublicKeyData::subject_public_key_info(&kp)
}

/// A one-hour SVID for `spiffe://example.org/w` with a fresh key.
fn sign_workload(ca: &CaManager) -> SignedSvid {
    ca.sign_x509_svid(
        "spiffe://example.org/w",
        &leaf_key_spki(),
        Duration::from_secs(HOUR),
        &[],
    )
    .unwrap()
}

/// True if `cert` is signed by one of the bundle's CA certificates.
fn verifies_against(bundle: &Bundle, cert: &[u8]) -> bool {
    let (_, leaf) = parse_x509_certificate(cert).unwrap();
    bundle.x509_authorities.iter().any(|ca| {
        let (_, ca) = parse_x509_certificate(ca).unwrap();
        leaf.issuer() == ca.subject() && leaf.verify_signature(Some(ca.public_key())).is_ok()
    })
}

#[tokio::test]
async fn scheduled_rotation_prepare_activate_drop() {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let (ca, dir) = ca(clock.clone()).await;
    let b0 = ca.bundle();
    assert_eq!(b0.x509_authorities.len(), 1);
    assert_eq!(b0.jwt_authorities.len(), 1);
    let first_ca = ca.active_x509_key_id().unwrap();
    let svid_before = sign_workload(&ca);

    // Before half-life nothing happens.
    clock.advance(Duration::from_secs(11 * HOUR));
    assert!(!ca.rotate().await.unwrap());

    // Half-life: the next authority is prepared and published, the old one still signs.
    clock.advance(Duration::from_secs(HOUR + 1));
    assert!(ca.rotate().await.unwrap());
    let b1 = ca.bundle();
    assert_eq!(b1.x509_authorities.len(), 2);
    assert_eq!(b1.jwt_authorities.len(), 2);
    assert!(b1.sequence > b0.sequence);
    assert_eq!(ca.active_x509_key_id().unwrap(), first_ca);

    // 5/6: the prepared authority becomes active.
    clock.advance(Duration::from_secs(8 * HOUR));
    assert!(ca.rotate().await.unwrap());
    let b2 = ca.bundle();
    assert_ne!(ca.active_x509_key_id().unwrap(), first_ca);
    assert_eq!(
        b2.x509_authorities.len(),
        2,
        "old CA stays while its SVIDs may be valid"
    );
    let svid_after = sign_workload(&ca);
    assert!(
        verifies_against(&b2, &svid_before.cert_der),
        "SVID from the old CA verifies during the overlap"
    );
    assert!(
        verifies_against(&b2, &svid_after.cert_der),
        "SVID from the new CA verifies"
    );
    let (_, old_leaf) = parse_x509_certificate(&svid_before.cert_der).unwrap();
    let (_, new_leaf) = parse_x509_certificate(&svid_after.cert_der).unwrap();
    assert_ne!(
        old_leaf.issuer().to_string(),
        new_leaf.issuer().to_string(),
        "signed by different CAs"
    );

    // The old CA's lifetime ends: it leaves the bundle.
    clock.advance(Duration::from_secs(4 * HOUR));
    assert!(ca.rotate().await.unwrap());
    let b3 = ca.bundle();
    // (The new authority reaches its own half-life at the same moment, so its successor may
    // already be prepared: count what is gone, not what is left.)
    assert!(
        !b3.x509_authorities.contains(&b0.x509_authorities[0]),
        "old CA dropped"
    );
    assert!(
        !b3.jwt_authorities.contains(&b0.jwt_authorities[0]),
        "old JWT key dropped"
    );
    assert!(!verifies_against(&b3, &svid_before.cert_der));
    assert!(verifies_against(&b3, &svid_after.cert_der));
    assert!(b3.sequence > b2.sequence);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn svid_profile_and_ttl_cap() {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let (ca, dir) = ca(clock).await;
    // Asking for more than the CA has left is capped at the CA's NotAfter.
    let svid = ca
        .sign_x509_svid(
            "spiffe://example.org/w",
            &leaf_key_spki(),
            Duration::from_secs(48 * HOUR),
            &["web.example.org".into()],
        )
        .unwrap();
    let (_, cert) = parse_x509_certificate(&svid.cert_der).unwrap();
    let bundle = ca.bundle();
    let (_, root) = parse_x509_certificate(&bundle.x509_authorities[0]).unwrap();
    assert!(cert.validity().not_after <= root.validity().not_after);
    assert!(!cert.is_ca());
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.digital_signature());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let uris = continuity_common::x509::uri_sans(&svid.cert_der).unwrap();
    assert_eq!(uris, vec!["spiffe://example.org/w".to_string()]);
    assert_eq!(
        cert.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "web.example.org"
    );
    assert!(
        cert.get_extension_unique(&oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
            .unwrap()
            .is_some()
    );
    assert!(
        cert.get_extension_unique(&oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
            .unwrap()
            .is_some()
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn jwt_svid_is_compact_jws_with_kid() {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let (ca, dir) = ca(clock).await;
    let (token, exp) = ca
        .sign_jwt_svid(
            "spiffe://example.org/w",
            &["aud1".into()],
            Duration::from_secs(300),
        )
        .unwrap();
    let parts: Vec<_> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    use base64::Engine;
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[0])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "ES256");
    assert_eq!(
        header["kid"],
        ca.bundle().jwt_authorities[0].key_id.as_str()
    );
    // Verify the signature with the bundle's public key.
    let spki = &ca.bundle().jwt_authorities[0].public_key;
    let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).unwrap();
    let key = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        parsed.subject_public_key.data.to_vec(),
    );
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[2])
        .unwrap();
    key.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .unwrap();
    assert!(exp > 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn csr_requested_extensions_are_ignored() {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let (ca, dir) = ca(clock).await;
    // A hostile CSR: another SPIFFE ID, a DNS name, CA basic constraints, CA key usages.
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://example.org/admin".try_into().unwrap(),
    ));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let csr = params.serialize_request(&kp).unwrap();
    let svid = ca
        .sign_x509_svid_from_csr(
            "spiffe://example.org/web",
            csr.der(),
            Duration::from_secs(HOUR),
            &[],
        )
        .unwrap();
    let (_, leaf) = parse_x509_certificate(&svid.cert_der).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(
        san.general_names,
        vec![GeneralName::URI("spiffe://example.org/web")],
        "only the entry's SPIFFE ID"
    );
    assert!(!leaf.is_ca());
    assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    // The key is the CSR's.
    assert_eq!(
        leaf.public_key().raw,
        &rcgen::PublicKeyData::subject_public_key_info(&kp)[..]
    );
    let _ = std::fs::remove_dir_all(dir);
}
