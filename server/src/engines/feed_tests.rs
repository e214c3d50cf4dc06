//! Two Engine services on one datastore and one key manager, as two servers hold them: a key
//! rotated or a version disabled through one is what the other uses after following, and a
//! stale copy is never written back.

use std::sync::Arc;
use std::time::SystemTime;

use continuity_common::{ManualClock, TrustDomain};

use super::model::{Purpose, VersionState};
use super::{EngineError, Engines, VersionAction};
use crate::audit::Audit;
use crate::datastore::DataStore;
use crate::keys::{KeyManager, MemoryKeyManager};

async fn service(store: &Arc<dyn DataStore>, keys: &Arc<dyn KeyManager>) -> Arc<Engines> {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let audit = Audit::load(
        store.clone(),
        clock.clone(),
        Arc::new(crate::keys::SoftwareMac::new(&[7; 32])),
        None,
    )
    .await
    .unwrap();
    Engines::load(
        TrustDomain::new("example.org").unwrap(),
        store.clone(),
        keys.clone(),
        clock,
        audit,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_stale_copy_never_undoes_another_servers_rotation_or_state_change() {
    let (dir, _, store) = crate::datastore::scratch_sqlite("engines-feed").await;
    let store: Arc<dyn DataStore> = Arc::new(store);
    let keys: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::default());
    let (a, b) = (service(&store, &keys).await, service(&store, &keys).await);
    a.create_engine("payments", 1, None, None, false, "admin")
        .await
        .unwrap();
    a.create_key("payments", "signing", Purpose::Sign, None, 0, 3600, "admin")
        .await
        .unwrap();
    b.reload().await.unwrap();
    assert_eq!(
        b.sign("payments", "signing", 0, Some(b"m"), None, "w")
            .await
            .unwrap()
            .version,
        1
    );
    // Rotated through A; B, not yet followed, rotates too: it reads the key again first, so
    // it makes v3 and A's v2 stays as A made it.
    a.rotate("payments", "signing", "admin").await.unwrap();
    let v2 = a.key("payments", "signing").unwrap().1[1].clone();
    let k = b.rotate("payments", "signing", "admin").await.unwrap();
    assert_eq!(k.primary_version, 3);
    let stored = store.list_key_versions().await.unwrap();
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[1].kid, v2.kid);
    assert_eq!(stored[1].public_key, v2.public_key);
    // Disabled through B: A refuses v1 once it follows, and B's stale view of v1 cannot
    // bring it back.
    b.set_state("payments", "signing", 1, VersionAction::Disable, "admin")
        .await
        .unwrap();
    a.reload().await.unwrap();
    let e = a
        .sign("payments", "signing", 1, Some(b"m"), None, "w")
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::Precondition(_)), "{e}");
    assert_eq!(
        a.sign("payments", "signing", 0, Some(b"m"), None, "w")
            .await
            .unwrap()
            .version,
        3
    );
    let v1 = store
        .list_key_versions()
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.version == 1)
        .unwrap();
    assert_eq!(v1.state, VersionState::Disabled);
    let _ = std::fs::remove_dir_all(dir);
}
