//! Server SVID renewal follows the injected clock.

use super::*;

/// A CA and server identity on a clock 30 days ahead of the system's.
async fn identity_on(
    clock: Arc<continuity_common::ManualClock>,
) -> (Arc<ServerIdentity>, Arc<CaManager>, std::path::PathBuf) {
    let (dir, _, store) = crate::datastore::scratch_sqlite("tls-identity").await;
    let cfg = crate::ca::CaConfig {
        trust_domain: continuity_common::TrustDomain::new("example.org").unwrap(),
        x509_key_type: crate::keys::KeyType::EcP256,
        jwt_key_type: crate::keys::KeyType::EcP256,
        ttl: Duration::from_secs(24 * 3600),
        jwt_issuer: None,
        upstream: None,
    };
    let ca = CaManager::start(
        cfg,
        Arc::new(crate::keys::MemoryKeyManager::default()),
        Arc::new(store),
        clock.clone(),
    )
    .await
    .unwrap();
    let identity = ServerIdentity::start(
        ca.clone(),
        TrustRoots::default(),
        Duration::from_secs(3600),
        clock,
    )
    .await
    .unwrap();
    (identity, ca, dir)
}

#[tokio::test]
async fn server_svid_renewal_is_due_at_half_life_by_the_injected_clock() {
    let start = std::time::SystemTime::now() + Duration::from_secs(30 * 86_400);
    let clock = Arc::new(continuity_common::ManualClock::new(start));
    let (identity, _ca, dir) = identity_on(clock.clone()).await;
    // One hour SVID: renewal due in half an hour of the injected clock (not of the system's,
    // which is 30 days behind and would put it weeks away).
    let due = identity.renew_in();
    assert!(
        due <= Duration::from_secs(1800) && due >= Duration::from_secs(1790),
        "{due:?}"
    );
    clock.advance(Duration::from_secs(1800));
    let due = identity.renew_in();
    assert!(
        due <= Duration::from_secs(900) && due >= Duration::from_secs(890),
        "half of what is left: {due:?}"
    );
    let before = identity.resolve_current();
    identity.renew().await.unwrap();
    assert!(
        !Arc::ptr_eq(&before, &identity.resolve_current()),
        "swapped"
    );
    let due = identity.renew_in();
    assert!(
        due <= Duration::from_secs(1800) && due >= Duration::from_secs(1790),
        "a renewed SVID is due at its own half-life: {due:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
