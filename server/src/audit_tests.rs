//! Tests of the audit log.

use std::time::SystemTime;

use continuity_common::ManualClock;

use super::*;
use crate::datastore::JoinToken;

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
