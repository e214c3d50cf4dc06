//! Two registries on one datastore, as two servers would hold them: what one writes the other
//! serves after catching up, in revision order, and a write of its own never skips another
//! server's.

use std::sync::Arc;
use std::time::SystemTime;

use continuity_common::{ManualClock, SpiffeId};

use super::Registry;
use crate::audit::Audit;
use continuity_attestors::Selector;

use crate::datastore::{DataStore, Entry};
use crate::metrics::Metrics;

async fn registry(store: &Arc<dyn DataStore>) -> Registry {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let audit = Audit::load(
        store.clone(),
        clock.clone(),
        Arc::new(crate::keys::SoftwareMac::new(&[7; 32])),
        None,
    )
    .await
    .unwrap();
    Registry::load(
        store.clone(),
        store.clone(),
        clock,
        audit,
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap()
}

fn entry(path: &str, parent: &SpiffeId) -> Entry {
    Entry {
        id: String::new(),
        spiffe_id: SpiffeId::new(&format!("spiffe://example.org/{path}")).unwrap(),
        parent_id: parent.clone(),
        selectors: vec![Selector::raw("unix", "uid:1000")],
        x509_svid_ttl: 0,
        jwt_svid_ttl: 0,
        dns_names: vec![],
        hint: String::new(),
        admin: false,
        engine: None,
        federates_with: vec![],
        revision: 0,
        created_at: 0,
    }
}

fn agent(parent: &SpiffeId) -> crate::datastore::AgentRecord {
    crate::datastore::AgentRecord {
        spiffe_id: parent.clone(),
        attestation_type: "join_token".into(),
        serial: "01".into(),
        previous_serial: String::new(),
        expires_at: i64::MAX,
        banned: false,
        alias: None,
        created_at: 0,
        last_seen: 0,
        revision: 1,
        serial_first_used: 0,
        forked: false,
        forked_at: 0,
        selectors: vec![],
    }
}

#[tokio::test]
async fn another_servers_entry_writes_reach_this_index_in_revision_order() {
    let (dir, _url, store) = crate::datastore::scratch_sqlite("registry-feed").await;
    let store: Arc<dyn DataStore> = Arc::new(store);
    let (a, b) = (registry(&store).await, registry(&store).await);
    let node = SpiffeId::new("spiffe://example.org/node/1").unwrap();
    let other = SpiffeId::new("spiffe://example.org/node/2").unwrap();
    let me = agent(&node);
    let start = b.sync(&me, 0).revision;
    let web = a.create_entry(entry("web", &node), "test").await.unwrap();
    let db = a.create_entry(entry("db", &node), "test").await.unwrap();
    // Not yet followed: B serves nothing new.
    assert!(b.sync(&me, start).entries.is_empty());
    // B writes one of its own: it catches up first, so its revision covers A's writes too.
    let api = b.create_entry(entry("api", &node), "test").await.unwrap();
    assert_eq!(api.revision, db.revision + 1);
    let s = b.sync(&me, start);
    let mut ids: Vec<&str> = s.entries.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    let mut want = vec![web.id.as_str(), db.id.as_str(), api.id.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want);
    assert_eq!(s.revision, api.revision);
    // A moves one entry to another parent and deletes another; B follows both.
    let mut moved = Entry::clone(&web);
    moved.parent_id = other.clone();
    a.update_entry(moved, "test").await.unwrap();
    a.delete_entry(&db.id, "test").await.unwrap();
    assert!(b.catch_up_entries().await.unwrap());
    let s = b.sync(&me, api.revision);
    let mut removed = s.removed.clone();
    removed.sort_unstable();
    let mut want = vec![web.id.clone(), db.id.clone()];
    want.sort_unstable();
    assert_eq!(removed, want);
    assert!(b.entry(&db.id).is_none());
    assert_eq!(b.entry(&web.id).unwrap().parent_id, other);
    assert_eq!(b.revision(), a.revision());
    // Nothing new: nothing read.
    assert!(!b.catch_up_entries().await.unwrap());
    // A full reload gives the same index.
    let before = b.entries(|_| true);
    b.reload_all().await.unwrap();
    assert_eq!(b.entries(|_| true), before);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_ban_through_another_server_reaches_this_index_and_stays() {
    let (dir, _url, store) = crate::datastore::scratch_sqlite("registry-feed-ban").await;
    let store: Arc<dyn DataStore> = Arc::new(store);
    let (a, b) = (registry(&store).await, registry(&store).await);
    let id = SpiffeId::new("spiffe://example.org/continuity/agent/join_token/x").unwrap();
    let rec = b
        .attest_agent(None, agent(&id), std::time::Duration::from_secs(3600))
        .await
        .unwrap();
    a.reload_agent(id.as_str()).await.unwrap();
    a.ban_agent(id.as_str(), "test").await.unwrap();
    // B still holds the record it read before the ban: authenticating with it is refused
    // (its compare-and-set fails, the row is read again) and the ban is not written back.
    let e = b.authenticate_agent(&id, &rec.serial).await.unwrap_err();
    assert!(matches!(e, super::RegistryError::Banned(_)), "{e}");
    assert!(b.agent(id.as_str()).unwrap().banned);
    b.reload_agent(id.as_str()).await.unwrap();
    assert!(store.get_agent(id.as_str()).await.unwrap().unwrap().banned);
    // Evicted through A: gone from B once followed.
    a.evict_agent(id.as_str(), "test").await.unwrap();
    b.reload_agent(id.as_str()).await.unwrap();
    assert!(b.agent(id.as_str()).is_none());
    let _ = std::fs::remove_dir_all(dir);
}

/// A k8s_psat agent of `cluster` on `node`.
fn psat_agent(cluster: &str, node: &str) -> crate::datastore::AgentRecord {
    let id = SpiffeId::new(&format!(
        "spiffe://example.org/continuity/agent/k8s_psat/{cluster}/{node}"
    ))
    .unwrap();
    crate::datastore::AgentRecord {
        attestation_type: "k8s_psat".into(),
        selectors: vec![
            Selector::raw("k8s_psat", format!("cluster:{cluster}")),
            Selector::raw("k8s_psat", format!("agent_node_name:{node}")),
        ],
        ..agent(&id)
    }
}

#[tokio::test]
async fn node_aliases_follow_node_entries_and_agent_selectors_across_servers() {
    let (dir, _url, store) = crate::datastore::scratch_sqlite("registry-node-alias").await;
    let store: Arc<dyn DataStore> = Arc::new(store);
    let (a, b) = (registry(&store).await, registry(&store).await);
    let ttl = std::time::Duration::from_secs(3600);
    let server = SpiffeId::new("spiffe://example.org/continuity/server").unwrap();
    let alias = SpiffeId::new("spiffe://example.org/k8s/demo").unwrap();
    let mut node = entry("k8s/demo", &server);
    node.selectors = vec![Selector::raw("k8s_psat", "cluster:demo")];
    // Written through A, the agents attested through B.
    let node = a.create_entry(node, "test").await.unwrap();
    let web = a.create_entry(entry("web", &alias), "test").await.unwrap();
    let demo = b
        .attest_agent(None, psat_agent("demo", "n1"), ttl)
        .await
        .unwrap();
    let other = b
        .attest_agent(None, psat_agent("other", "n2"), ttl)
        .await
        .unwrap();
    assert!(b.catch_up_entries().await.unwrap());
    let s = b.sync(&demo, 0);
    assert_eq!(
        s.entries.iter().map(|e| &e.id).collect::<Vec<_>>(),
        vec![&web.id]
    );
    assert!(b.authorized_entry(&demo, &web.id).is_some());
    assert_eq!(b.node_aliases(&demo), vec![alias.clone()]);
    assert!(b.sync(&other, 0).entries.is_empty());
    assert!(b.authorized_entry(&other, &web.id).is_none());
    // Nothing changed: the next sync is incremental and empty.
    let next = b.sync(&demo, s.revision);
    assert!(!next.full && next.entries.is_empty(), "{next:?}");
    // The agent re-attests through A in another cluster: B follows the row, and the agent's
    // next sync through B is a full one without the workload.
    let mut moved = psat_agent("demo", "n1");
    moved.selectors = vec![Selector::raw("k8s_psat", "cluster:elsewhere")];
    a.reload_agent(demo.spiffe_id.as_str()).await.unwrap();
    let moved = a
        .attest_agent(Some(a.agent(demo.spiffe_id.as_str()).unwrap()), moved, ttl)
        .await
        .unwrap();
    b.reload_agent(moved.spiffe_id.as_str()).await.unwrap();
    let rec = b.agent(moved.spiffe_id.as_str()).unwrap();
    assert_eq!(rec.selectors, moved.selectors);
    let after = b.sync(&rec, s.revision);
    assert!(after.full && after.entries.is_empty(), "{after:?}");
    assert!(b.authorized_entry(&rec, &web.id).is_none());
    // The node entry deleted through A: an agent of demo that synced before syncs in full.
    let again = b
        .attest_agent(None, psat_agent("demo", "n3"), ttl)
        .await
        .unwrap();
    let before = b.sync(&again, 0);
    assert_eq!(before.entries.len(), 1);
    a.delete_entry(&node.id, "test").await.unwrap();
    assert!(b.catch_up_entries().await.unwrap());
    let gone = b.sync(&again, before.revision);
    assert!(gone.full && gone.entries.is_empty(), "{gone:?}");
    let _ = std::fs::remove_dir_all(dir);
}
