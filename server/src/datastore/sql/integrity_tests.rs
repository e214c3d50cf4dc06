//! The datastore suite, part 3: audit appends under concurrency, record MACs (integrity
//! verify finding tampered rows), and the logical dump and load of backups, on SQLite and on
//! PostgreSQL — and a dump carried from one backend to the other.

use super::engines_tests::{engine, incarnation, key, record, version};
use super::tests::{agent, apply, entry, linker};
use super::*;
use crate::datastore::{
    AgentStore, AuditStore, Backend, CaKeyRecord, CaKeyState, CaStore, EngineStore, EntryStore,
    IntegrityStore, JoinToken, JoinTokenStore, KeyPurpose, Scratch, Write, on_both_backends,
};

on_both_backends! {
    /// Audit appends from two store handles (two servers on one datastore), audited writes
    /// and bare batches interleaved: every sequence number is used once, the chain links, and
    /// the head is the last record.
    async fn concurrent_audit_appends_from_two_handles_share_one_chain(s) {
        let other = s.open_again().await;
        let mut tasks = Vec::new();
        for i in 0..40 {
            let st = if i % 2 == 0 { s.store.clone() } else { other.clone() };
            tasks.push(tokio::spawn(async move {
                let mut recs = vec![record(&format!("a{i}")), record(&format!("b{i}"))];
                if i % 3 == 0 {
                    st.append_audit_batch(&mut recs, &linker()).await.unwrap();
                } else {
                    let e = entry(&format!("e{i}"), "spiffe://example.org/p");
                    st.apply(&[Write::CreateEntry(e)], &mut recs, &linker()).await.unwrap();
                }
                assert_eq!(recs[1].seq, recs[0].seq + 1, "one transaction's records are adjacent");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let log = s.store.list_audit().await.unwrap();
        assert_eq!(log.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=80).collect::<Vec<i64>>());
        let chain = linker();
        for w in log.windows(2) {
            assert_eq!(w[1].prev_hash, w[0].hash, "record {} links to {}", w[1].seq, w[0].seq);
        }
        assert!(log.iter().all(|r| chain.verifies(r).unwrap()));
        let head = other.audit_head().await.unwrap();
        assert_eq!((head.seq, head.hash.as_str()), (80, log[79].hash.as_str()));
    }
}

on_both_backends! {
    /// A row edited behind the server's back fails its record MAC: `verify_integrity` names
    /// each one, list reads leave them out and single-row reads refuse them.
    async fn integrity_verify_finds_tampered_rows(s) {
        populate(&s.store).await;
        let clean = s.store.verify_integrity().await.unwrap();
        assert!(clean.bad.is_empty(), "{:?}", clean.bad);
        assert!(clean.rows >= 10, "{clean:?}");
        let raw = s.raw().await;
        let agent_id = agent(1).spiffe_id.to_string();
        for sql in [
            "UPDATE entries SET hint = 'evil' WHERE id = 'e1'",
            "UPDATE engine_key_versions SET state = 'ENABLED', destroy_at = 0 WHERE engine = 'orders'",
            "UPDATE ca_keys SET not_after = not_after + 1 WHERE key_id = 'x1'",
            "UPDATE meta SET value = value + 5 WHERE name = 'bundle_sequence'",
        ] {
            sqlx::query(sql).execute(&raw).await.unwrap();
        }
        sqlx::query("UPDATE agents SET banned = 0 WHERE spiffe_id = $1")
            .bind(&agent_id)
            .execute(&raw)
            .await
            .unwrap();
        let report = s.store.verify_integrity().await.unwrap();
        let bad: Vec<(&str, &str)> =
            report.bad.iter().map(|b| (b.table.as_str(), b.key.as_str())).collect();
        assert_eq!(
            bad,
            [
                ("agents", agent_id.as_str()),
                ("ca_keys", "x1"),
                ("engine_key_versions", "orders/data/1"),
                ("entries", "e1"),
                ("meta", "bundle_sequence"),
            ],
            "{report:?}"
        );
        assert_eq!(report.rows, clean.rows);
        assert!(s.store.list_entries().await.unwrap().iter().all(|e| e.id != "e1"));
        assert!(s.store.list_ca_keys().await.unwrap().is_empty());
        assert!(matches!(
            s.store.get_agent(&agent_id).await,
            Err(StoreError::Integrity { .. })
        ));
        assert!(matches!(
            s.store.bundle_sequence().await,
            Err(StoreError::Integrity { .. })
        ));
        assert!(s.store.bad_rows().list().len() >= 4);
    }
}

/// A row in every MACed table (and some audit records).
async fn populate(s: &SqlDataStore) {
    let mut e = entry("e1", "spiffe://example.org/p");
    e.engine = Some("orders".into());
    s.create_entry(e).await.unwrap();
    s.create_entry(entry("e2", "spiffe://example.org/p"))
        .await
        .unwrap();
    s.delete_entry("e2").await.unwrap();
    s.create_join_token(JoinToken {
        token_hash: "h".into(),
        id: "i".into(),
        alias: None,
        expires_at: 10,
    })
    .await
    .unwrap();
    let mut banned = agent(1);
    banned.banned = true;
    apply(s, &[Write::InsertAgent(banned)]).await.unwrap();
    s.put_ca_key(&CaKeyRecord {
        key_id: "x1".into(),
        purpose: KeyPurpose::X509,
        state: CaKeyState::Active,
        key_type: "ec-p256".into(),
        cert_der: vec![0x30, 0x82, 0, 0xff],
        public_key: vec![1, 2, 3],
        kid: String::new(),
        not_before: 1,
        not_after: 2,
    })
    .await
    .unwrap();
    s.next_bundle_sequence().await.unwrap();
    let mut scheduled = version("orders", "data", 1, Some(vec![0, 1, 0xfe]));
    scheduled.state = crate::model::engine::VersionState::DestroyScheduled;
    scheduled.destroy_at = 99;
    let mut audit = vec![record("engine.create")];
    s.apply(
        &[
            Write::PutEngine(engine("orders")),
            Write::PutEngineKey(key("orders", "data")),
            Write::PutKeyVersion(scheduled),
            Write::PutKeyVersion(version("orders", "sig", 1, None)),
        ],
        &mut audit,
        &linker(),
    )
    .await
    .unwrap();
    s.put_secret(&crate::model::engine::Secret {
        engine: "orders".into(),
        name: "db".into(),
        version: 1,
        sealed: vec![7; 40],
        mechanism: "aes-gcm-kek".into(),
        created_at: 3,
    })
    .await
    .unwrap();
    s.upsert_incarnation(&incarnation("w1", 1, 2))
        .await
        .unwrap();
}

on_both_backends! {
    /// A dump of every table loads into a fresh datastore unchanged; a column the schema
    /// lacks is refused, naming it.
    async fn a_dump_loads_into_a_fresh_datastore_unchanged(s) {
        populate(&s.store).await;
        let dump = s.store.dump().await.unwrap();
        assert!(dump.iter().all(|t| t.name != "schema_migrations"));
        for table in ["entries", "agents", "ca_keys", "engine_key_versions", "incarnations", "audit_log"] {
            assert!(
                dump.iter().any(|t| t.name == table && !t.rows.is_empty()),
                "{table} is in the dump with its rows"
            );
        }
        let fresh = Scratch::new(s.backend, "dump-target").await;
        assert!(fresh.store.non_empty_tables().await.unwrap().is_empty());
        fresh.store.load(&dump).await.unwrap();
        assert_eq!(fresh.store.dump().await.unwrap(), dump);
        let report = fresh.store.verify_integrity().await.unwrap();
        assert!(report.bad.is_empty(), "{report:?}");
        assert_eq!(fresh.store.list_entries().await.unwrap(), s.store.list_entries().await.unwrap());
        assert_eq!(
            fresh.store.list_key_versions().await.unwrap(),
            s.store.list_key_versions().await.unwrap()
        );
        assert_eq!(fresh.store.audit_head().await.unwrap(), s.store.audit_head().await.unwrap());
        let mut bad = dump.clone();
        bad[0].columns.push(("nope".into(), "TEXT".into()));
        for r in &mut bad[0].rows {
            r.push(serde_json::Value::Null);
        }
        let e = fresh.store.load(&bad).await.unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }
}

/// What a store holds, backend-independently.
async fn content(s: &SqlDataStore) -> String {
    format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        s.list_entries().await.unwrap(),
        s.list_tombstones().await.unwrap(),
        s.list_agents().await.unwrap(),
        s.list_ca_keys().await.unwrap(),
        s.bundle_sequence().await.unwrap(),
        s.list_engines().await.unwrap(),
        s.list_key_versions().await.unwrap(),
        s.list_secrets().await.unwrap(),
        s.list_incarnations("orders").await.unwrap(),
        s.list_audit().await.unwrap(),
    )
}

/// A backup carries a datastore from SQLite to PostgreSQL and back: same content, every
/// record MAC intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_moves_between_sqlite_and_postgres() {
    let lite = Scratch::new(Backend::Sqlite, "cross-lite").await;
    populate(&lite.store).await;
    let pg = Scratch::new(Backend::Postgres, "cross-pg").await;
    pg.store
        .load(&lite.store.dump().await.unwrap())
        .await
        .unwrap();
    assert_eq!(content(&pg.store).await, content(&lite.store).await);
    assert!(pg.store.verify_integrity().await.unwrap().bad.is_empty());
    let back = Scratch::new(Backend::Sqlite, "cross-back").await;
    back.store
        .load(&pg.store.dump().await.unwrap())
        .await
        .unwrap();
    assert_eq!(content(&back.store).await, content(&lite.store).await);
    assert!(back.store.verify_integrity().await.unwrap().bad.is_empty());
}
