use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};

use super::*;
use crate::ca::profile;
use crate::keys::software::SoftwareKey;

fn dir() -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "continuity-upstream-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn now() -> i64 {
    continuity_common::clock::unix_seconds(std::time::SystemTime::now())
}

fn ca_params(cn: &str, days: i64) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = time::OffsetDateTime::from_unix_timestamp(now() - 60).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp(now() + days * 86400).unwrap();
    p
}

fn write_key(d: &Path, name: &str, kp: &KeyPair) -> PathBuf {
    let p = d.join(name);
    std::fs::write(&p, kp.serialize_pem()).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn disk(cert: &Path, key: &Path, bundle: Option<&Path>) -> UpstreamConfig {
    UpstreamConfig {
        cert_file: cert.into(),
        bundle_file: bundle.map(Into::into),
        key: UpstreamKey::Disk {
            key_file: key.into(),
        },
    }
}

/// A root: (cert file, key file, cert DER).
fn root(d: &Path, days: i64) -> (PathBuf, PathBuf, Vec<u8>, KeyPair) {
    let kp = KeyPair::generate().unwrap();
    let cert = ca_params("Upstream Root", days).self_signed(&kp).unwrap();
    let c = d.join("root.pem");
    std::fs::write(&c, cert.pem()).unwrap();
    let k = write_key(d, "root.key", &kp);
    (c, k, cert.der().to_vec(), kp)
}

#[test]
fn a_root_signs_intermediates_and_is_the_bundle() {
    let d = dir();
    let (c, k, root_der, _) = root(&d, 30);
    let up = Arc::new(
        UpstreamAuthority::load(&disk(&c, &k, None), now(), Duration::from_secs(86400)).unwrap(),
    );
    assert_eq!(up.roots(), std::slice::from_ref(&root_der));
    let ca_key: Arc<dyn KeyHandle> =
        Arc::new(SoftwareKey::generate("ca", KeyType::EcP256).unwrap());
    let params = profile::ca_params("example.org", now(), now() + 3600).unwrap();
    let ca = issue_ca_cert(Some(up.clone()), params, &RcgenKey(ca_key)).unwrap();
    assert!(!self_signed(&ca));
    let (_, ca_cert) = X509Certificate::from_der(&ca).unwrap();
    let (_, root_cert) = X509Certificate::from_der(&root_der).unwrap();
    ca_cert
        .verify_signature(Some(root_cert.public_key()))
        .unwrap();
    assert_eq!(intermediates(Some(&up), &ca), vec![ca.clone()]);
    // The bundle keeps a self-signed CA from before the upstream, drops the intermediate.
    assert_eq!(
        bundle_x509(Some(&up), vec![ca.clone(), root_der.clone()]),
        vec![root_der.clone(), root_der]
    );
    // A CA asked to outlive the upstream certificate is clamped to it.
    assert_eq!(ca_not_after(Some(&up), now() + 400 * 86400), up.not_after());
    assert_eq!(ca_not_after(Some(&up), 5), 5);
}

#[test]
fn an_intermediate_upstream_needs_its_roots_and_joins_the_chain() {
    let d = dir();
    let (root_file, _, root_der, root_kp) = root(&d, 30);
    let issuer = Issuer::from_ca_cert_der(&root_der.clone().into(), root_kp).unwrap();
    let mid_kp = KeyPair::generate().unwrap();
    let mid = ca_params("Upstream Intermediate", 10)
        .signed_by(&mid_kp, &issuer)
        .unwrap();
    let mid_file = d.join("mid.pem");
    std::fs::write(&mid_file, mid.pem()).unwrap();
    let mid_key = write_key(&d, "mid.key", &mid_kp);
    let e = UpstreamAuthority::load(
        &disk(&mid_file, &mid_key, None),
        now(),
        Duration::from_secs(60),
    )
    .unwrap_err();
    assert_eq!(e.key, "upstream_authority.cert_file", "{e}");
    let up = UpstreamAuthority::load(
        &disk(&mid_file, &mid_key, Some(&root_file)),
        now(),
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(up.roots(), &[root_der]);
    assert_eq!(
        intermediates(Some(&up), b"not-a-cert"),
        vec![b"not-a-cert".to_vec(), mid.der().to_vec()]
    );
    // A bundle that is not the issuer's is refused, naming bundle_file.
    let other = dir();
    let (other_root, _, _, _) = root(&other, 30);
    let e = UpstreamAuthority::load(
        &disk(&mid_file, &mid_key, Some(&other_root)),
        now(),
        Duration::from_secs(60),
    )
    .unwrap_err();
    assert_eq!(e.key, "upstream_authority.bundle_file", "{e}");
}

#[test]
fn bad_upstreams_name_the_key() {
    let d = dir();
    let (c, k, _, _) = root(&d, 30);
    // Key not matching the certificate.
    let wrong = write_key(&d, "wrong.key", &KeyPair::generate().unwrap());
    let e = UpstreamAuthority::load(&disk(&c, &wrong, None), now(), Duration::from_secs(60))
        .unwrap_err();
    assert_eq!(e.key, "upstream_authority.key_file", "{e}");
    assert!(e.to_string().contains("does not match"), "{e}");
    // Unreadable files.
    let e = UpstreamAuthority::load(
        &disk(&d.join("none.pem"), &k, None),
        now(),
        Duration::from_secs(60),
    )
    .unwrap_err();
    assert_eq!(e.key, "upstream_authority.cert_file", "{e}");
    let e = UpstreamAuthority::load(
        &disk(&c, &d.join("none.key"), None),
        now(),
        Duration::from_secs(60),
    )
    .unwrap_err();
    assert_eq!(e.key, "upstream_authority.key_file", "{e}");
    // Expired: checked against the given time.
    let e = UpstreamAuthority::load(
        &disk(&c, &k, None),
        now() + 31 * 86400,
        Duration::from_secs(60),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("upstream_authority.cert_file: the certificate expired"),
        "{e}"
    );
    // Not a CA.
    let kp = KeyPair::generate().unwrap();
    let mut p = ca_params("leaf", 30);
    p.is_ca = IsCa::ExplicitNoCa;
    let leaf = p.self_signed(&kp).unwrap();
    let lf = d.join("leaf.pem");
    std::fs::write(&lf, leaf.pem()).unwrap();
    let lk = write_key(&d, "leaf.key", &kp);
    let e =
        UpstreamAuthority::load(&disk(&lf, &lk, None), now(), Duration::from_secs(60)).unwrap_err();
    assert!(e.to_string().contains("not a CA"), "{e}");
}

/// Under an upstream authority the X.509 authorities are intermediates whose SVIDs chain to the
/// upstream roots: taint and revoke are refused (they could not take trust away); JWT keys,
/// which the bundle does hold, are tainted as usual.
#[tokio::test]
async fn an_intermediate_x509_authority_cannot_be_tainted_or_revoked() {
    use crate::ca::{AuthorityError, AuthorityKind, CaConfig, CaManager};
    let d = dir();
    let (c, k, _, _) = root(&d, 30);
    let up = Arc::new(
        UpstreamAuthority::load(&disk(&c, &k, None), now(), Duration::from_secs(86400)).unwrap(),
    );
    let (ds, _, store) = crate::datastore::scratch_sqlite("upstreamtaint").await;
    let cfg = CaConfig {
        trust_domain: continuity_common::TrustDomain::new("example.org").unwrap(),
        x509_key_type: KeyType::EcP256,
        jwt_key_type: KeyType::EcP256,
        ttl: Duration::from_secs(86400),
        jwt_issuer: None,
        upstream: Some(up),
    };
    let ca = CaManager::start(
        cfg,
        Arc::new(crate::keys::MemoryKeyManager::default()),
        Arc::new(store),
        Arc::new(continuity_common::SystemClock),
    )
    .await
    .unwrap();
    for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
        let old = ca.authority_slots(kind).await.unwrap().active.unwrap();
        let new = ca.prepare_authority(kind).await.unwrap();
        ca.activate_authority(kind, &new.authority_id)
            .await
            .unwrap();
        let tainted = ca.taint_authority(kind, &old.authority_id).await;
        match kind {
            AuthorityKind::X509 => {
                let err = tainted.unwrap_err();
                assert!(
                    matches!(&err, AuthorityError::Precondition(m) if m.contains("intermediate signed by the upstream authority")),
                    "{err}"
                );
                let err = ca
                    .revoke_authority(kind, &old.authority_id)
                    .await
                    .unwrap_err();
                assert!(matches!(err, AuthorityError::Precondition(_)), "{err}");
                let slots = ca.authority_slots(kind).await.unwrap();
                assert_eq!(
                    slots.old.unwrap().state,
                    "old",
                    "the refused taint changed nothing"
                );
            }
            AuthorityKind::Jwt => assert_eq!(tainted.unwrap().state, "tainted"),
        }
    }
    let _ = std::fs::remove_dir_all(ds);
    let _ = std::fs::remove_dir_all(d);
}
