//! The datastore suite, part 2: Engines, keys, key versions (and their encryption
//! reservations), secrets and incarnations, on SQLite and on PostgreSQL.

use super::tests::{apply, linker};
use super::*;
use crate::datastore::{AuditRecord, AuditStore, EngineStore, Write, on_both_backends};
use crate::model::engine::{
    Algorithm, Custody, Engine, EngineKey, Incarnation, KeyVersion, Secret, VersionState,
};

pub(super) fn engine(name: &str) -> Engine {
    Engine {
        name: name.into(),
        spiffe_id: format!("spiffe://example.org/engine/{name}"),
        tier: 1,
        custody: Custody::Transit,
        exposure_override: false,
        created_at: 1_700_000_000,
    }
}

pub(super) fn key(engine: &str, name: &str) -> EngineKey {
    EngineKey {
        engine: engine.into(),
        name: name.into(),
        algorithm: Algorithm::Aes256Gcm,
        custody: Custody::Transit,
        primary_version: 1,
        rotation_period: 0,
        destroy_grace: 86_400,
        next_rotation_at: 0,
        created_at: 1_700_000_000,
    }
}

pub(super) fn version(engine: &str, key: &str, v: u32, sealed: Option<Vec<u8>>) -> KeyVersion {
    KeyVersion {
        engine: engine.into(),
        key: key.into(),
        version: v,
        state: VersionState::Enabled,
        kid: format!("{engine}-{key}-{v}"),
        public_key: vec![],
        sealed,
        mechanism: "aes-gcm-kek".into(),
        hsm_id: String::new(),
        created_at: 1_700_000_000 + i64::from(v),
        destroy_at: 0,
        encryptions: 0,
        imported: false,
    }
}

pub(super) fn incarnation(workload: &str, first: i64, last: i64) -> Incarnation {
    Incarnation {
        engine: "orders".into(),
        entry_id: "e1".into(),
        agent_id: "spiffe://example.org/continuity/agent/join_token/1".into(),
        workload_id: workload.into(),
        pid: 4242,
        uid: 1000,
        selectors: vec![continuity_attestors::Selector::raw("k8s", "pod-uid:abc")],
        first_seen: first,
        last_seen: last,
    }
}

on_both_backends! {
    /// Engines, keys and versions are stored and replaced whole; a version without sealed
    /// material (NULL) and one with every byte value both round-trip.
    async fn engines_keys_and_versions(s) {
        let mut hsm = engine("payments");
        hsm.tier = 0;
        hsm.custody = Custody::Hsm;
        s.store.put_engine(&engine("orders")).await.unwrap();
        s.store.put_engine(&hsm).await.unwrap();
        let mut raised = engine("orders");
        raised.custody = Custody::Kv;
        raised.exposure_override = true;
        s.store.put_engine(&raised).await.unwrap();
        assert_eq!(s.store.list_engines().await.unwrap(), vec![raised, hsm]);

        let mut sign = key("payments", "sig");
        sign.algorithm = Algorithm::EcP256;
        sign.custody = Custody::Hsm;
        sign.rotation_period = 3600;
        sign.next_rotation_at = 1_700_003_600;
        s.store.put_engine_key(&key("orders", "data")).await.unwrap();
        s.store.put_engine_key(&sign).await.unwrap();
        let rotated = EngineKey { primary_version: 2, ..key("orders", "data") };
        s.store.put_engine_key(&rotated).await.unwrap();
        assert_eq!(s.store.list_engine_keys().await.unwrap(), vec![rotated, sign]);

        let v1 = version("orders", "data", 1, Some((0..=255u8).rev().collect()));
        let mut v2 = version("payments", "sig", 1, None);
        v2.public_key = vec![0x30, 0x59, 0, 0xff];
        v2.hsm_id = "engine-payments-sig-1".into();
        v2.mechanism = String::new();
        s.store.put_key_version(&v1).await.unwrap();
        s.store.put_key_version(&v2).await.unwrap();
        let scheduled = KeyVersion {
            state: VersionState::DestroyScheduled,
            destroy_at: 1_700_086_400,
            ..v1.clone()
        };
        s.store.put_key_version(&scheduled).await.unwrap();
        assert_eq!(s.store.list_key_versions().await.unwrap(), vec![scheduled, v2]);
    }
}

on_both_backends! {
    /// Encryption reservations only grow: concurrent reservations from two handles add up,
    /// a rewrite of the version keeps them, and an unknown version is NotFound.
    async fn encryption_reservations_add_up_and_survive_rewrites(s) {
        let other = s.open_again().await;
        let v = version("orders", "data", 1, Some(vec![1, 2, 3]));
        s.store.put_key_version(&v).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..10u64 {
            let st = if i % 2 == 0 { s.store.clone() } else { other.clone() };
            tasks.push(tokio::spawn(async move {
                st.reserve_encryptions("orders", "data", 1, 100).await.unwrap()
            }));
        }
        let mut totals = Vec::new();
        for t in tasks {
            totals.push(t.await.unwrap());
        }
        totals.sort_unstable();
        assert_eq!(totals, (1..=10).map(|i| i * 100).collect::<Vec<u64>>());
        let disabled = KeyVersion { state: VersionState::Disabled, ..v.clone() };
        s.store.put_key_version(&disabled).await.unwrap();
        let stored = s.store.list_key_versions().await.unwrap();
        assert_eq!(stored, vec![KeyVersion { encryptions: 1000, ..disabled }]);
        assert!(matches!(
            s.store.reserve_encryptions("orders", "data", 9, 1).await,
            Err(StoreError::NotFound(_))
        ));
    }
}

on_both_backends! {
    /// Secret versions are kept side by side, in order.
    async fn secrets_are_versioned(s) {
        for v in [2u32, 1] {
            s.store
                .put_secret(&Secret {
                    engine: "orders".into(),
                    name: "db".into(),
                    version: v,
                    sealed: vec![0, u8::try_from(v).unwrap(), 0xff],
                    mechanism: "aes-gcm-kek".into(),
                    created_at: i64::from(v),
                })
                .await
                .unwrap();
        }
        let listed = s.store.list_secrets().await.unwrap();
        assert_eq!(listed.iter().map(|s| s.version).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(listed[1].sealed, vec![0, 2, 0xff]);
        // A version is written once.
        assert!(s.store.put_secret(&listed[0]).await.is_err());
    }
}

on_both_backends! {
    /// Engine writes through the audited transaction commit with their audit records, and
    /// roll back with them when a write fails.
    async fn audited_engine_writes_are_all_or_nothing(s) {
        let mut audit = vec![record("engine.create"), record("key.create")];
        s.store
            .apply(
                &[
                    Write::PutEngine(engine("orders")),
                    Write::PutEngineKey(key("orders", "data")),
                    Write::PutKeyVersion(version("orders", "data", 1, Some(vec![9]))),
                ],
                &mut audit,
                &linker(),
            )
            .await
            .unwrap();
        assert_eq!((audit[0].seq, audit[1].seq), (1, 2));
        // The second write fails (a secret version written twice): nothing of it is kept.
        let secret = Secret {
            engine: "orders".into(),
            name: "db".into(),
            version: 1,
            sealed: vec![1],
            mechanism: "m".into(),
            created_at: 1,
        };
        apply(&s.store, &[Write::PutSecret(secret.clone())]).await.unwrap();
        let err = s
            .store
            .apply(
                &[Write::PutEngine(engine("billing")), Write::PutSecret(secret)],
                &mut [record("engine.create")],
                &linker(),
            )
            .await;
        assert!(err.is_err());
        assert_eq!(s.store.list_engines().await.unwrap(), vec![engine("orders")]);
        assert_eq!(s.store.list_audit().await.unwrap().len(), 2);
        assert_eq!(s.store.audit_head().await.unwrap().seq, 2);
    }
}

pub(super) fn record(action: &str) -> AuditRecord {
    AuditRecord {
        seq: 0,
        time: 1_700_000_000,
        actor: "admin uid 0".into(),
        action: action.into(),
        target: "orders".into(),
        key_version: 0,
        result: "ok".into(),
        prev_hash: String::new(),
        hash: String::new(),
    }
}

on_both_backends! {
    /// An incarnation keeps its first sighting; later ones move last_seen only; listed per
    /// Engine, oldest first; concurrent sightings from two handles merge into one row.
    async fn incarnations_keep_their_first_sighting(s) {
        let other = s.open_again().await;
        s.store.upsert_incarnation(&incarnation("w2", 20, 20)).await.unwrap();
        s.store.upsert_incarnation(&incarnation("w1", 10, 10)).await.unwrap();
        s.store.upsert_incarnation(&incarnation("w1", 30, 30)).await.unwrap();
        let mut elsewhere = incarnation("w9", 1, 1);
        elsewhere.engine = "billing".into();
        s.store.upsert_incarnation(&elsewhere).await.unwrap();
        let listed = s.store.list_incarnations("orders").await.unwrap();
        assert_eq!(listed, vec![incarnation("w1", 10, 30), incarnation("w2", 20, 20)]);
        let mut tasks = Vec::new();
        for i in 0..10 {
            let st = if i % 2 == 0 { s.store.clone() } else { other.clone() };
            tasks.push(tokio::spawn(async move {
                st.upsert_incarnation(&incarnation("w3", 100 + i, 100 + i)).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let w3: Vec<_> = s
            .store
            .list_incarnations("orders")
            .await
            .unwrap()
            .into_iter()
            .filter(|i| i.workload_id == "w3")
            .collect();
        assert_eq!(w3, vec![incarnation("w3", 100, 109)], "earliest first, latest last sighting");
    }
}
