//! Tests of the audit log.

use std::time::SystemTime;

use continuity_common::ManualClock;

use async_trait::async_trait;

use super::*;
use crate::datastore::{DataStore, JoinToken};

#[tokio::test]
async fn a_failed_admin_commit_leaves_no_trace_and_the_chain_continues() {
    let (dir, url, store) = crate::datastore::scratch_sqlite("audit").await;
    let store: Arc<dyn DataStore> = Arc::new(store);
    let raw = sqlx::AnyPool::connect(&url).await.unwrap();
    sqlx::query("CREATE TRIGGER refuse BEFORE INSERT ON audit_log WHEN NEW.action = 'token.generate' BEGIN SELECT RAISE(ABORT, 'refused'); END")
        .execute(&raw)
        .await
        .unwrap();
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let audit = Audit::load(store.clone(), clock).await.unwrap();
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
    let v = audit.verify().await.unwrap();
    assert_eq!(
        v,
        Verification {
            records: 2,
            problem: None
        }
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A store that counts key-use transactions, holds each one open for a while (so callers
/// queue behind it) and can fail the next one.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn DataStore>,
    batches: std::sync::atomic::AtomicUsize,
    fail_next: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl AuditStore for Counting {
    async fn apply(
        &self,
        writes: &[Write],
        audit: &[AuditRecord],
    ) -> Result<Vec<Applied>, StoreError> {
        self.inner.apply(writes, audit).await
    }
    async fn append_audit_batch(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        self.batches.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Io("disk full".into()));
        }
        self.inner.append_audit_batch(records).await
    }
    async fn list_audit(&self) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.list_audit().await
    }
    async fn audit_head(&self) -> Result<i64, StoreError> {
        self.inner.audit_head().await
    }
}

async fn counting() -> (std::path::PathBuf, Arc<Counting>, Arc<Audit>) {
    let (dir, _url, store) = crate::datastore::scratch_sqlite("audit-group").await;
    let backend = Arc::new(Counting {
        inner: Arc::new(store),
        batches: 0.into(),
        fail_next: false.into(),
    });
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let audit = Audit::load(backend.clone(), clock).await.unwrap();
    (dir, backend, audit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_key_uses_share_transactions_and_are_durable_before_they_return() {
    const N: usize = 32;
    let (dir, backend, audit) = counting().await;
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
    let v = audit.verify().await.unwrap();
    assert_eq!(
        v,
        Verification {
            records: N as i64,
            problem: None
        }
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_failed_key_use_batch_leaves_no_trace_and_the_chain_continues() {
    let (dir, backend, audit) = counting().await;
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
    let v = audit.verify().await.unwrap();
    assert_eq!(
        v,
        Verification {
            records: 1,
            problem: None
        }
    );
    let _ = std::fs::remove_dir_all(dir);
}
