//! Continuity proofs in process: rotations (admin and scheduled) are endorsed, persisted,
//! audited, published with the JWKS, and survive destruction and a reload.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use continuity_common::endorsement::verify_chain;
use continuity_common::{ManualClock, TrustDomain};

use super::model::{Algorithm, Purpose, VersionState};
use super::{Engines, VersionAction};
use crate::audit::Audit;
use crate::datastore::DataStore;
use crate::keys::{KeyManager, MemoryKeyManager};

#[tokio::test]
async fn every_rotation_is_endorsed_and_chains_survive_destruction_and_reload() {
    let (dir, _, store) = crate::datastore::scratch_sqlite("endorse").await;
    let store: Arc<dyn DataStore> = Arc::new(store);
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let keys: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::default());
    let load = || async {
        let audit = Audit::scratch(store.clone(), clock.clone()).await;
        let td = TrustDomain::new("example.org").unwrap();
        Engines::load(td, store.clone(), keys.clone(), clock.clone(), audit)
            .await
            .unwrap()
    };
    let e = load().await;
    e.create_engine("ledger", 1, None, None, false, "admin")
        .await
        .unwrap();
    e.create_key(
        "ledger",
        "rsa",
        Purpose::Sign,
        Some(Algorithm::Rsa2048),
        60,
        10,
        "admin",
    )
    .await
    .unwrap();
    e.create_key("ledger", "data", Purpose::Encrypt, None, 0, 10, "admin")
        .await
        .unwrap();
    let v1 = e.public_key("ledger", "rsa", 1).unwrap().spki;
    // Two admin rotations, one scheduled; the encrypt key's rotation endorses nothing.
    e.rotate("ledger", "rsa", "admin").await.unwrap();
    e.rotate("ledger", "rsa", "admin").await.unwrap();
    clock.advance(Duration::from_secs(61));
    e.tick().await.unwrap();
    e.rotate("ledger", "data", "admin").await.unwrap();
    let doc = e.jwks("ledger").unwrap();
    let chain = verify_chain(&doc, "rsa", &v1).unwrap();
    let path: Vec<u32> = chain.path.iter().map(|s| s.version).collect();
    assert_eq!(path, [1, 2, 3, 4]);
    assert_eq!(chain.reached_alg, "RS256");
    assert_eq!(
        chain.reached_spki,
        e.public_key("ledger", "rsa", 4).unwrap().spki
    );
    assert_eq!(doc["endorsements"].as_array().unwrap().len(), 3, "{doc}");
    let endorsed = store.list_endorsements().await.unwrap();
    assert_eq!(
        endorsed.iter().map(|x| x.version).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    let audit = store.list_audit().await.unwrap();
    let endorse: Vec<_> = audit.iter().filter(|r| r.action == "key.endorse").collect();
    assert_eq!(endorse.len(), 3);
    assert_eq!(endorse[2].actor, "scheduler");
    assert_eq!(endorse[2].result, "ok; endorsed by v3");

    // Destroy v2 past its grace: its endorsement stays published, marked, and the chain holds
    // after a reload from the datastore.
    e.set_state("ledger", "rsa", 2, VersionAction::Destroy, "admin")
        .await
        .unwrap();
    clock.advance(Duration::from_secs(11));
    e.tick().await.unwrap();
    let e = load().await;
    let doc = e.jwks("ledger").unwrap();
    assert!(
        doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["kid"] != "rsa-v2")
    );
    let v2 = doc["endorsements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["version"] == 2)
        .unwrap();
    assert_eq!(v2["state"], VersionState::Destroyed.as_str());
    let chain = verify_chain(&doc, "rsa", &v1).unwrap();
    assert_eq!(chain.path[1].state, "DESTROYED");
    assert_eq!(chain.path.len(), 4);

    // A primary destroyed before the next rotation cannot endorse it: the rotation goes on,
    // audited as not endorsed.
    e.set_state("ledger", "rsa", 4, VersionAction::Destroy, "admin")
        .await
        .unwrap();
    clock.advance(Duration::from_secs(61));
    e.tick().await.unwrap();
    let audit = store.list_audit().await.unwrap();
    let last = audit
        .iter()
        .rev()
        .find(|r| r.action == "key.endorse")
        .unwrap();
    assert!(last.result.contains("not endorsed"), "{}", last.result);
    // v5 is published but nothing endorses it: the chain ends at v4, so a relying party
    // never reaches v5's key through it.
    let doc = e.jwks("ledger").unwrap();
    assert!(
        doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kid"] == "rsa-v5")
    );
    let chain = verify_chain(&doc, "rsa", &v1).unwrap();
    assert_eq!(chain.path.last().unwrap().version, 4);
    assert_ne!(
        chain.reached_spki,
        e.public_key("ledger", "rsa", 5).unwrap().spki
    );
    std::fs::remove_dir_all(dir).ok();
}
