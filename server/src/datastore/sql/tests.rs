//! Unit tests of the SQL datastore.

use super::*;
use crate::datastore::{AgentStore, Entry, EntryStore, JoinToken, JoinTokenStore};

async fn store() -> (SqlDataStore, std::path::PathBuf) {
    let (dir, _, store) = scratch_sqlite("ds").await;
    (store, dir)
}

fn id_of(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn entry(id: &str, parent: &str) -> Entry {
    Entry {
        id: id.into(),
        spiffe_id: id_of("spiffe://example.org/w"),
        parent_id: id_of(parent),
        selectors: vec![continuity_attestors::Selector::raw("unix", "uid:1000")],
        x509_svid_ttl: 0,
        jwt_svid_ttl: 0,
        dns_names: vec![],
        hint: String::new(),
        admin: false,
        engine: None,
        federates_with: vec![],
        revision: 0,
        created_at: 1,
    }
}

#[tokio::test]
async fn entries_revisions_and_tombstones() {
    let (s, dir) = store().await;
    let a = s
        .create_entry(entry("a", "spiffe://example.org/p1"))
        .await
        .unwrap();
    let b = s
        .create_entry(entry("b", "spiffe://example.org/p1"))
        .await
        .unwrap();
    assert!(b.revision > a.revision);
    let mut moved = b.clone();
    moved.parent_id = id_of("spiffe://example.org/p2");
    let (_, t) = s.update_entry(moved).await.unwrap();
    assert_eq!(t.unwrap().parent_id.as_str(), "spiffe://example.org/p1");
    let (_, t) = s.delete_entry("a").await.unwrap();
    assert_eq!(t.entry_id, "a");
    assert_eq!(s.list_entries().await.unwrap().len(), 1);
    assert_eq!(s.list_tombstones().await.unwrap().len(), 2);
    assert!(matches!(
        s.delete_entry("a").await,
        Err(StoreError::NotFound(_))
    ));
    // Reopening migrates nothing twice and keeps the data.
    let url = format!("sqlite://{}?mode=rwc", dir.join("ds.sqlite3").display());
    let s2 = SqlDataStore::connect(&url, test_sealer()).await.unwrap();
    assert_eq!(s2.entry_revision().await.unwrap(), 4);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn join_token_taken_once() {
    let (s, dir) = store().await;
    let t = JoinToken {
        token_hash: "h".into(),
        id: "i".into(),
        alias: None,
        expires_at: 10,
    };
    s.create_join_token(t.clone()).await.unwrap();
    assert_eq!(s.take_join_token("h").await.unwrap(), Some(t));
    assert_eq!(s.take_join_token("h").await.unwrap(), None);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_row_with_a_bad_id_is_an_error_naming_the_row() {
    let (s, dir) = store().await;
    s.create_entry(entry("good", "spiffe://example.org/p1"))
        .await
        .unwrap();
    // Someone with write access to the datastore plants rows whose IDs do not parse.
    sqlx::query("UPDATE entries SET parent_id = 'spiffe://example.org/../x' WHERE id = 'good'")
        .execute(&s.pool)
        .await
        .unwrap();
    let e = s.list_entries().await.unwrap_err().to_string();
    assert!(e.contains("entry good: parent_id: "), "{e}");
    sqlx::query(
        "INSERT INTO agents (spiffe_id, attestation_type, serial, previous_serial, expires_at, banned, alias, created_at, last_seen)
         VALUES ('spiffe://example.org/continuity/agent/x', 'join_token', 's', '', 0, 0, 'not an id', 0, 0)",
    )
    .execute(&s.pool)
    .await
    .unwrap();
    let e = s.list_agents().await.unwrap_err().to_string();
    assert!(
        e.contains("agent \"spiffe://example.org/continuity/agent/x\": alias: "),
        "{e}"
    );
    sqlx::query("INSERT INTO entry_tombstones (entry_id, parent_id, revision) VALUES ('t', '', 7)")
        .execute(&s.pool)
        .await
        .unwrap();
    let e = s.list_tombstones().await.unwrap_err().to_string();
    assert!(
        e.contains("tombstone of entry t at revision 7: parent_id: "),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
