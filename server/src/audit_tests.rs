//! Tests of the audit log.

use std::time::SystemTime;

use continuity_common::ManualClock;

use async_trait::async_trait;

use super::*;
use crate::datastore::{
    AuditHead, AuditLinker, Backend, DataStore, JoinToken, Scratch, on_both_backends,
};
use crate::keys::{KeyManager, MemoryKeyManager, SoftwareMac};

fn mac() -> Arc<dyn MacKey> {
    Arc::new(SoftwareMac::new(&[7; 32]))
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(SystemTime::now()))
}

async fn intact(audit: &Audit, records: i64) {
    let v = audit.verify(&[]).await.unwrap();
    assert_eq!(
        v,
        Verification {
            records,
            checkpoints: 0,
            findings: vec![]
        }
    );
}

/// A trigger that makes the datastore refuse audit records of `action`.
async fn refuse_audit_of(s: &Scratch, action: &str) {
    let raw = s.raw().await;
    let statements = match s.backend {
        Backend::Sqlite => vec![format!(
            "CREATE TRIGGER refuse BEFORE INSERT ON audit_log WHEN NEW.action = '{action}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )],
        Backend::Postgres => vec![
            format!(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.action = '{action}' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$"
            ),
            "CREATE TRIGGER refuse BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION refuse()".into(),
        ],
    };
    for sql in statements {
        sqlx::query(&sql).execute(&raw).await.unwrap();
    }
}

on_both_backends! {
    async fn a_failed_admin_commit_leaves_no_trace_and_the_chain_continues(s) {
        refuse_audit_of(&s, "token.generate").await;
        let store: Arc<dyn DataStore> = Arc::new(s.store.clone());
        let audit = Audit::load(store.clone(), clock(), mac(), None)
            .await
            .unwrap();
        audit.record("a", "key.sign", "e/k", 1, "ok").await.unwrap();
        let token = JoinToken {
            token_hash: "h".into(),
            id: "i".into(),
            alias: None,
            expires_at: 1,
        };
        let err = audit
            .commit(
                &[Write::CreateJoinToken(token)],
                &[AuditEvent::ok("admin", "token.generate", "join_token")],
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Audit(_)), "{err}");
        assert_eq!(
            store.take_join_token("h").await.unwrap(),
            None,
            "not applied"
        );
        audit.record("a", "key.sign", "e/k", 1, "ok").await.unwrap();
        intact(&audit, 2).await;
    }
}

/// A store that counts key-use transactions, holds each one open for a while (so callers
/// queue behind it) and can fail the next one, before it commits or (ambiguously) after.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn DataStore>,
    batches: std::sync::atomic::AtomicUsize,
    fail_next: std::sync::atomic::AtomicBool,
    fail_after_commit: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl AuditStore for Counting {
    async fn apply(
        &self,
        writes: &[Write],
        audit: &mut [AuditRecord],
        link: &dyn AuditLinker,
    ) -> Result<Vec<Applied>, StoreError> {
        self.inner.apply(writes, audit, link).await
    }
    async fn append_audit_batch(
        &self,
        records: &mut [AuditRecord],
        link: &dyn AuditLinker,
    ) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        self.batches.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Io("disk full".into()));
        }
        self.inner.append_audit_batch(records, link).await?;
        if self.fail_after_commit.swap(false, Ordering::SeqCst) {
            // The commit went through but its answer was lost (a dropped connection).
            return Err(StoreError::Io("connection reset during COMMIT".into()));
        }
        Ok(())
    }
    async fn list_audit(&self) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.list_audit().await
    }
    async fn audit_head(&self) -> Result<AuditHead, StoreError> {
        self.inner.audit_head().await
    }
}

async fn counting(s: &Scratch) -> (Arc<Counting>, Arc<Audit>) {
    let backend = Arc::new(Counting {
        inner: Arc::new(s.store.clone()),
        batches: 0.into(),
        fail_next: false.into(),
        fail_after_commit: false.into(),
    });
    let audit = Audit::load(backend.clone(), clock(), mac(), None)
        .await
        .unwrap();
    (backend, audit)
}

on_both_backends! {
    async fn concurrent_key_uses_share_transactions_and_are_durable_before_they_return(s) {
        const N: usize = 32;
        let (backend, audit) = counting(&s).await;
        let start = Arc::new(tokio::sync::Barrier::new(N));
        let mut tasks = Vec::new();
        for i in 0..N {
            let (audit, backend, start) = (audit.clone(), backend.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                let target = format!("e/k{i}");
                audit
                    .record("a", "key.sign", &target, 1, "ok")
                    .await
                    .unwrap();
                // Durable now: the datastore itself holds the record.
                let stored = backend.inner.list_audit().await.unwrap();
                assert!(
                    stored.iter().any(|r| r.target == target),
                    "{target} answered before it was committed"
                );
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let batches = backend.batches.load(std::sync::atomic::Ordering::SeqCst);
        assert!(batches < N, "{N} records took {batches} transactions");
        intact(&audit, N as i64).await;
    }
}

on_both_backends! {
    async fn a_failed_key_use_batch_leaves_no_trace_and_the_chain_continues(s) {
        let (backend, audit) = counting(&s).await;
        backend
            .fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let err = audit
            .record("a", "key.sign", "e/refused", 1, "ok")
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "datastore: disk full");
        audit.record("a", "key.sign", "e/k", 1, "ok").await.unwrap();
        let records = audit.records(0).await.unwrap();
        assert_eq!(
            records
                .iter()
                .map(|r| r.target.as_str())
                .collect::<Vec<_>>(),
            ["e/k"],
            "a record whose caller was told it failed was written later"
        );
        intact(&audit, 1).await;
    }
}

on_both_backends! {
    /// The old bug: a commit that went through but reported failure left the head in memory
    /// behind the datastore, so every later append reused its sequence number and failed (a
    /// primary-key conflict) until the server restarted. The head is read in each transaction now.
    async fn after_an_ambiguous_failed_commit_later_appends_take_the_next_sequence_number(s) {
        let (backend, audit) = counting(&s).await;
        audit
            .record("a", "key.sign", "e/first", 1, "ok")
            .await
            .unwrap();
        backend
            .fail_after_commit
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let err = audit
            .record("a", "key.sign", "e/ambiguous", 1, "ok")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("connection reset"), "{err}");
        for i in 0..3 {
            audit
                .record("a", "key.sign", &format!("e/after{i}"), 1, "ok")
                .await
                .unwrap_or_else(|e| panic!("append {i} after the ambiguous commit failed: {e}"));
        }
        let admin = audit
            .commit(&[], &[AuditEvent::ok("admin", "engine.create", "e")])
            .await;
        assert!(admin.is_ok(), "{admin:?}");
        let records = audit.records(0).await.unwrap();
        let seqs: Vec<(i64, &str)> = records.iter().map(|r| (r.seq, r.target.as_str())).collect();
        assert_eq!(
            seqs,
            [
                (1, "e/first"),
                (2, "e/ambiguous"),
                (3, "e/after0"),
                (4, "e/after1"),
                (5, "e/after2"),
                (6, "e")
            ]
        );
        intact(&audit, 6).await;
    }
}

on_both_backends! {
    /// Two servers sharing one datastore (issue 13): each opens its own log on the same
    /// datastore, and their appends interleave on one chain without a sequence number used twice.
    async fn two_logs_on_one_datastore_share_one_chain(s) {
        let second = s.open_again().await;
        let a = Audit::load(Arc::new(s.store.clone()), clock(), mac(), None)
            .await
            .unwrap();
        let b = Audit::load(Arc::new(second), clock(), mac(), None)
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..20 {
            let log = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                log.record("a", "key.sign", &format!("e/{i}"), 1, "ok")
                    .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let records = a.records(0).await.unwrap();
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (1..=20).collect::<Vec<_>>()
        );
        intact(&a, 20).await;
        intact(&b, 20).await;
    }
}

/// Writes `n` records chained the old way (plain SHA-256) and sets the head, as a server
/// before the keyed chain left them.
async fn plain_log(url: &str, n: i64) {
    let raw = sqlx::AnyPool::connect(url).await.unwrap();
    let mut prev = String::new();
    for seq in 1..=n {
        let mut r = AuditRecord {
            seq,
            time: 1_700_000_000 + seq,
            actor: "admin uid 0".into(),
            action: "engine.create".into(),
            target: format!("e{seq}"),
            key_version: 0,
            result: "ok".into(),
            prev_hash: prev.clone(),
            hash: String::new(),
        };
        r.hash = chain::plain_hash(&r);
        sqlx::query("INSERT INTO audit_log (seq, time, actor, action, target, key_version, result, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8)")
            .bind(r.seq).bind(r.time).bind(&r.actor).bind(&r.action).bind(&r.target)
            .bind(&r.result).bind(&r.prev_hash).bind(&r.hash)
            .execute(&raw).await.unwrap();
        prev = r.hash;
    }
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
        .bind(n)
        .bind(&prev)
        .execute(&raw)
        .await
        .unwrap();
}

on_both_backends! {
    async fn a_plain_chain_is_verified_and_anchored_once_and_stays_protected(s) {
        let url = s.url.clone();
        plain_log(&url, 3).await;
        let store: Arc<dyn DataStore> = Arc::new(s.store.clone());
        let audit = Audit::load(store.clone(), clock(), mac(), None)
            .await
            .unwrap();
        let records = audit.records(0).await.unwrap();
        assert_eq!(records.len(), 4);
        assert_eq!(records[3].action, verify::ANCHOR_ACTION);
        assert_eq!(
            records[3].result,
            "ok: plain SHA-256 records 1..=3 verified; keyed chain from here"
        );
        assert_eq!(records[3].prev_hash, records[2].hash);
        audit.record("a", "key.sign", "e/k", 1, "ok").await.unwrap();
        intact(&audit, 5).await;
        // Loading again does not anchor again.
        let again = Audit::load(store.clone(), clock(), mac(), None)
            .await
            .unwrap();
        intact(&again, 5).await;
        // An old record edited and its plain chain recomputed: the anchor's HMAC names the break.
        let raw = sqlx::AnyPool::connect(&url).await.unwrap();
        let mut r2 = records[1].clone();
        r2.actor = "someone else".into();
        r2.hash = chain::plain_hash(&r2);
        let mut r3 = records[2].clone();
        r3.prev_hash = r2.hash.clone();
        r3.hash = chain::plain_hash(&r3);
        for r in [&r2, &r3] {
            sqlx::query("UPDATE audit_log SET actor = $1, prev_hash = $2, hash = $3 WHERE seq = $4")
                .bind(&r.actor)
                .bind(&r.prev_hash)
                .bind(&r.hash)
                .bind(r.seq)
                .execute(&raw)
                .await
                .unwrap();
        }
        let v = audit.verify(&[]).await.unwrap();
        assert_eq!(v.findings.len(), 1, "{v:?}");
        assert_eq!(v.findings[0].seq, 4);
        assert_eq!(v.findings[0].kind, FindingKind::Reordered, "{v:?}");
    }
}

on_both_backends! {
    async fn a_log_rewritten_as_plain_sha256_is_not_anchored_when_checkpoints_exist(s) {
        let (dir, url) = (s.dir().to_path_buf(), s.url.clone());
        let store: Arc<dyn DataStore> = Arc::new(s.store.clone());
        let keys = MemoryKeyManager::default();
        let cps = || async { Checkpoints::open(&dir.join("data"), &keys).await.unwrap() };
        let audit = Audit::load(store.clone(), clock(), mac(), Some(cps().await))
            .await
            .unwrap();
        audit.record("a", "key.sign", "e/k", 1, "ok").await.unwrap();
        audit.checkpoint().await.unwrap();
        // The attacker replaces the whole log with a plain SHA-256 chain of their own.
        let raw = sqlx::AnyPool::connect(&url).await.unwrap();
        sqlx::query("DELETE FROM audit_log")
            .execute(&raw)
            .await
            .unwrap();
        plain_log(&url, 2).await;
        let reopened = Audit::load(store.clone(), clock(), mac(), Some(cps().await))
            .await
            .unwrap();
        let records = reopened.records(0).await.unwrap();
        assert_eq!(records.len(), 2, "not anchored: {records:?}");
        let v = reopened.verify(&[]).await.unwrap();
        assert_eq!(v.checkpoints, 1);
        assert!(
            v.findings
                .iter()
                .any(|f| f.seq == 1 && f.detail.contains("plain SHA-256")),
            "{v:?}"
        );
        assert!(
            v.findings
                .iter()
                .any(|f| f.kind == FindingKind::Truncated && f.seq == 1),
            "the checkpoint of record 1 names the rewrite: {v:?}"
        );
        let _ = keys.delete(CHECKPOINT_KEY).await;
    }
}

/// A group commit larger than one INSERT statement's chunk is written whole, in chain order.
#[tokio::test]
async fn a_batch_larger_than_one_insert_chunk_is_written_whole_and_verifies() {
    let (dir, _url, store) = crate::datastore::scratch_sqlite("audit-chunks").await;
    let store = Arc::new(store);
    let chain = KeyedChain::new(mac());
    let mut records: Vec<AuditRecord> = (0..1201)
        .map(|i| unlinked(1, AuditEvent::ok("a", "key.sign", &format!("e/k{i}"))))
        .collect();
    store
        .append_audit_batch(&mut records, &chain)
        .await
        .unwrap();
    let audit = Audit::load(store.clone(), clock(), mac(), None)
        .await
        .unwrap();
    intact(&audit, 1201).await;
    let stored = store.list_audit().await.unwrap();
    assert_eq!(stored.last().unwrap().target, "e/k1200");
    assert_eq!(store.audit_head().await.unwrap().seq, 1201);
    let _ = std::fs::remove_dir_all(dir);
}
