//! Unit tests of the agent API connection caps.

use super::*;

#[test]
fn per_ip_caps_count_an_ipv6_64_as_one_peer() {
    let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
    let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
    let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
    assert_eq!(cap_key(a), cap_key(b));
    assert_ne!(cap_key(a), cap_key(c));
    let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
    assert_eq!(cap_key(mapped), "10.0.0.7".parse::<IpAddr>().unwrap());
}

#[test]
fn connections_without_a_certificate_hold_at_most_a_quarter() {
    let caps = ConnCaps::new(AcceptLimits {
        max_connections: 8,
        max_per_ip: 8,
        handshake_timeout: Duration::from_secs(1),
        tcp_keepalive: Duration::from_secs(60),
        anonymous_lifetime: Duration::from_secs(1),
    });
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let mut slots: Vec<_> = (0..3).map(|_| caps.admit(ip).unwrap()).collect();
    slots[0].anonymous().unwrap();
    slots[1].anonymous().unwrap();
    assert_eq!(slots[2].anonymous(), Err(Refused::Anonymous(2)));
    drop(slots.remove(0));
    slots[1].anonymous().unwrap();
    assert_eq!(caps.open(), 2);
}

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
