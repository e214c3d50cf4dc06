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
            ..Default::default()
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
            created_at: 0,
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

/// A cache serving whatever snapshot the test publishes; JWT-SVID fetches never succeed.
struct Published(watch::Sender<Arc<Snapshot>>);

#[tonic::async_trait]
impl IdentityCache for Published {
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.0.subscribe()
    }
    async fn jwt_svid(
        &self,
        _: &str,
        _: &[String],
        _: &(dyn Fn() -> Result<(), RateLimited> + Send + Sync),
    ) -> Result<String, JwtFetchError> {
        Err(JwtFetchError::NotAttested)
    }
    fn report_incarnation(
        &self,
        _: &str,
        _: &str,
        _: &dyn Fn() -> continuity_proto::engine::Workload,
    ) {
    }
}

/// An attestor that counts its calls and gives every caller `unix:uid:0`.
#[derive(Default)]
struct Counting(AtomicUsize);

impl WorkloadAttestor for Counting {
    fn attest(&self, _: &crate::peer::Peer) -> Result<Arc<HashSet<Selector>>, String> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(HashSet::from([Selector::raw("unix", "uid:0")])))
    }
}

fn handler(attestor: Arc<Counting>) -> WorkloadHandler {
    let (tx, _) = watch::channel(Arc::new(cached_snapshot()));
    WorkloadHandler::new(
        Arc::new(Published(tx)),
        attestor,
        Arc::new(continuity_common::clock::SystemClock),
        Arc::new(RateLimiter::new(10.0, 10)),
        &WorkloadApiConfig::default(),
    )
}

#[tokio::test]
async fn jwt_calls_check_their_arguments_before_attestation() {
    let attestor = Arc::new(Counting::default());
    let h = handler(attestor.clone());
    // These requests carry no connection information: reaching attestation would fail with
    // Unavailable, so InvalidArgument shows the arguments were checked first.
    let validate = |audience: &str, svid: &str| {
        Request::new(ValidateJwtsvidRequest {
            audience: audience.into(),
            svid: svid.into(),
        })
    };
    for (req, why) in [
        (validate("", "a.b.c"), "audience must be specified"),
        (validate("aud", ""), "svid must be specified"),
    ] {
        let err = h.validate_jwtsvid(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(err.message().contains(why), "{err}");
    }
    let err = h
        .validate_jwtsvid(validate("aud", "a.b.c"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("attestation"), "{err}");

    let fetch = |spiffe_id: &str| {
        Request::new(JwtsvidRequest {
            audience: vec!["aud".into()],
            spiffe_id: spiffe_id.into(),
        })
    };
    for bad in [
        "not-a-spiffe-id",
        "spiffe://",
        "spiffe://example.org/a/../b",
        "https://example.org/w",
    ] {
        let err = h.fetch_jwtsvid(fetch(bad)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}: {err}");
        assert!(err.message().contains("SPIFFE ID"), "{err}");
    }
    let err = h
        .fetch_jwtsvid(fetch("spiffe://example.org/w"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert_eq!(attestor.0.load(Ordering::SeqCst), 0, "never attested");
}

#[test]
fn the_security_header_must_appear_exactly_once() {
    let with = |values: &[&str]| {
        let mut req = Request::new(());
        for v in values {
            req.metadata_mut()
                .append(SECURITY_HEADER, v.parse().unwrap());
        }
        check_security_header(req).map(|_| ())
    };
    with(&["true"]).unwrap();
    for bad in [
        &[][..],
        &["false"],
        &["true", "true"],
        &["true", "false"],
        &["TRUE"],
    ] {
        let err = with(bad).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
    }
    assert!(
        with(&["true", "true"])
            .unwrap_err()
            .message()
            .contains("more than once")
    );
}

/// The snapshot of [`cached_snapshot`] with identities `(entry id, hint, created_at)`.
fn snapshot_with(ids: &[(&str, &str, i64)], sequence: u64) -> Snapshot {
    let base = cached_snapshot();
    let template = base.identities[0].clone();
    let mut bundle = (*base.bundle).clone();
    bundle.sequence = sequence;
    Snapshot {
        bundle: Arc::new(bundle),
        identities: ids
            .iter()
            .map(|(id, hint, created_at)| {
                let mut i = (*template).clone();
                i.entry_id = (*id).into();
                i.spiffe_id = format!("spiffe://example.org/{id}");
                i.hint = (*hint).into();
                i.created_at = *created_at;
                Arc::new(i)
            })
            .collect(),
        engine_jwks: base.engine_jwks.clone(),
        federated: base.federated.clone(),
    }
}

#[test]
fn a_response_never_carries_two_identities_with_one_hint() {
    let me = HashSet::from([Selector::raw("unix", "uid:0")]);
    // "db" is shared: e3 is the oldest and wins. "cache" ties on time: the smaller id wins.
    let snap = snapshot_with(
        &[
            ("e1", "db", 20),
            ("e2", "", 5),
            ("e3", "db", 10),
            ("e4", "", 5),
            ("e6", "cache", 7),
            ("e5", "cache", 7),
            ("e7", "db", 30),
        ],
        1,
    );
    let served: Vec<_> = snap
        .served(&me)
        .iter()
        .map(|i| i.entry_id.clone())
        .collect();
    assert_eq!(
        served,
        ["e2", "e3", "e4", "e5"],
        "order kept, duplicates dropped"
    );
    let msg = WorkloadHandler::x509_response(&snap, &snap.served(&me));
    let hints: Vec<_> = msg
        .svids
        .iter()
        .map(|s| s.hint.as_str())
        .filter(|h| !h.is_empty())
        .collect();
    assert_eq!(hints, ["db", "cache"]);
    assert_eq!(snap.matching(&me).len(), 7, "matching itself is unfiltered");
}

#[tokio::test]
async fn stream_messages_are_deduplicated_by_content() {
    let (tx, rx) = watch::channel(Arc::new(snapshot_with(&[("e1", "", 1)], 1)));
    let (a, _b) = tokio::net::UnixStream::pair().unwrap();
    let caller = Caller {
        selectors: Arc::new(HashSet::from([Selector::raw("unix", "uid:0")])),
        peer: Arc::new(crate::peer::Peer::of(&a).unwrap()),
        workload_id: "test".into(),
        call: None,
    };
    let first = WorkloadHandler::x509_bundles_response(&rx.borrow(), &[]);
    let mut stream = watch_stream(rx, &caller, first, |snap, ids| {
        WorkloadHandler::x509_bundles_response(snap, ids)
    });
    use futures_util::StreamExt;
    assert!(stream.next().await.unwrap().is_ok());
    // A new bundle sequence (and a new identity) with the same bundle bytes: nothing is sent.
    tx.send(Arc::new(snapshot_with(&[("e1", "", 1), ("e2", "", 1)], 2)))
        .unwrap();
    tx.send(Arc::new(snapshot_with(&[("e1", "", 1)], 3)))
        .unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(quiet.is_err(), "an identical message was sent again");
    // Different content: sent once.
    let mut changed = snapshot_with(&[("e1", "", 1)], 4);
    let mut bundle = (*changed.bundle).clone();
    bundle.x509 = bytes::Bytes::from_static(b"ca-3");
    changed.bundle = Arc::new(bundle);
    tx.send(Arc::new(changed)).unwrap();
    let msg = stream.next().await.unwrap().unwrap();
    assert_eq!(&msg.bundles["spiffe://example.org"][..], b"ca-3");
}
