use super::caller::AttestGate;
use super::*;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Attestations that block until released, counting how many run at once.
struct Stuck {
    running: AtomicUsize,
    peak: AtomicUsize,
    release: (Mutex<bool>, std::sync::Condvar),
}

impl Stuck {
    fn attest(&self) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let (m, cv) = &self.release;
        let mut go = m.lock().unwrap();
        while !*go {
            go = cv.wait(go).unwrap();
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A snapshot as the cache builds it: one identity with a two-certificate chain.
fn cached_snapshot() -> Snapshot {
    use crate::manager::cache::{BundleState, Entry, JwtKey, PersistedState, Svid};
    use bytes::Bytes;
    use continuity_common::secret::SecretBytes;
    let mut st = PersistedState {
        bundle: BundleState {
            trust_domain: "example.org".into(),
            x509_authorities: vec![b"ca-1".to_vec(), b"ca-2".to_vec()],
            jwt_authorities: vec![JwtKey {
                kid: "k1".into(),
                public_key: b"spki".to_vec(),
                expires_at: 10,
            }],
            sequence: 3,
        },
        ..Default::default()
    };
    st.entries.insert(
        "e1".into(),
        Entry {
            id: "e1".into(),
            spiffe_id: "spiffe://example.org/w".into(),
            selectors: vec![Selector::raw("unix", "uid:0")],
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            hint: String::new(),
            engine: String::new(),
            revision: 1,
            federates_with: vec![],
        },
    );
    st.svids.insert(
        "e1".into(),
        Svid {
            chain: vec![Bytes::from_static(b"leaf"), Bytes::from_static(b"inter")],
            key: SecretBytes::new(b"pkcs8-key".to_vec()),
            expires_at: 10,
            issued_at: 0,
            rotate_at: 5,
        },
    );
    Snapshot::build(&st, None)
}

#[test]
fn responses_share_the_cached_chain_key_and_bundle() {
    let snap = cached_snapshot();
    let ids = snap.identities.clone();
    assert_eq!(ids.len(), 1);
    let (a, b) = (
        WorkloadHandler::x509_response(&snap, &ids),
        WorkloadHandler::x509_response(&snap, &ids),
    );
    let (a, b) = (&a.svids[0], &b.svids[0]);
    assert_eq!(&a.x509_svid[..], b"leafinter");
    assert_eq!(&a.x509_svid_key[..], b"pkcs8-key");
    assert_eq!(&a.bundle[..], b"ca-1ca-2");
    // Two messages, one buffer each: the cache's (reference counts, not copies).
    assert_eq!(a.x509_svid.as_ptr(), b.x509_svid.as_ptr());
    assert_eq!(a.x509_svid.as_ptr(), ids[0].x509_svid.as_ptr());
    assert_eq!(a.x509_svid_key.as_ptr(), b.x509_svid_key.as_ptr());
    assert_eq!(a.x509_svid_key.as_ptr(), ids[0].key.expose().as_ptr());
    assert_eq!(a.bundle.as_ptr(), b.bundle.as_ptr());
    assert_eq!(a.bundle.as_ptr(), snap.bundle.x509.as_ptr());

    let td = "spiffe://example.org";
    let (a, b) = (
        WorkloadHandler::x509_bundles_response(&snap, &ids),
        WorkloadHandler::x509_bundles_response(&snap, &ids),
    );
    assert_eq!(a.bundles[td].as_ptr(), b.bundles[td].as_ptr());
    assert_eq!(a.bundles[td].as_ptr(), snap.bundle.x509.as_ptr());

    let (a, b) = (
        WorkloadHandler::jwt_bundles_response(&snap, &ids),
        WorkloadHandler::jwt_bundles_response(&snap, &ids),
    );
    assert!(a.bundles[td].starts_with(b"{"));
    assert_eq!(a.bundles[td].as_ptr(), b.bundles[td].as_ptr());
    assert_eq!(a.bundles[td].as_ptr(), snap.bundle.jwks.as_ptr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestations_are_bounded_in_all_per_uid_and_in_time() {
    let gate = Arc::new(AttestGate::new(4, 2, Duration::from_millis(300)));
    let stuck = Arc::new(Stuck {
        running: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        release: (Mutex::new(false), std::sync::Condvar::new()),
    });
    let mut calls = Vec::new();
    for i in 0..12u32 {
        let (g, s) = (gate.clone(), stuck.clone());
        // uid 1 floods; uids 2 and 3 call a few times.
        let uid = if i < 8 { 1 } else { 2 + i % 2 };
        calls.push(tokio::spawn(
            async move { g.run(uid, move || s.attest()).await },
        ));
    }
    let mut timed_out = 0;
    for c in calls {
        let err = c.await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert!(err.message().contains("timed out"), "{err}");
        timed_out += 1;
    }
    assert_eq!(timed_out, 12);
    // uid 1 got at most 2 threads; 2 + 2 for the others: never more than 4 in all.
    assert_eq!(stuck.peak.load(Ordering::SeqCst), 4);
    // Timed out, but still stuck: their permits are held until they return.
    let (g, s) = (gate.clone(), stuck.clone());
    assert!(g.run(5, move || s.attest()).await.is_err());
    {
        let (m, cv) = &stuck.release;
        *m.lock().unwrap() = true;
        cv.notify_all();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stuck.running.load(Ordering::SeqCst) > 0 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gate.run(1, || 7).await.unwrap(), 7);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        gate.uids.lock().unwrap().is_empty(),
        "per-uid entries are dropped"
    );
}
