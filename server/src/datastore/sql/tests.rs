//! The datastore suite, part 1: entries, join tokens, agents, the CA journal and the bundle
//! sequence. Every test runs on SQLite and on PostgreSQL ([`on_both_backends!`]).

use std::sync::Arc;

use super::*;
use crate::datastore::{
    AgentRecord, AgentStore, AuditStore, CaKeyRecord, CaKeyState, CaStore, Entry, EntryStore,
    JoinToken, JoinTokenStore, KeyPurpose, Write, on_both_backends,
};

fn id_of(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

pub(super) fn entry(id: &str, parent: &str) -> Entry {
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

pub(super) fn agent(n: u32) -> AgentRecord {
    AgentRecord {
        spiffe_id: id_of(&format!(
            "spiffe://example.org/continuity/agent/join_token/{n}"
        )),
        attestation_type: "join_token".into(),
        serial: format!("{n:04x}"),
        previous_serial: String::new(),
        expires_at: 1_700_003_600,
        banned: false,
        alias: None,
        created_at: 1_700_000_000,
        last_seen: 1_700_000_000,
        revision: 0,
        serial_first_used: 0,
        forked: false,
        forked_at: 0,
        selectors: vec![],
    }
}

/// The audit linker of the datastore suite: the keyed chain under a fixed key.
pub(super) fn linker() -> crate::audit::chain::KeyedChain {
    crate::audit::chain::KeyedChain::new(Arc::new(crate::keys::SoftwareMac::new(&[7; 32])))
}

/// Applies `writes` with no audit records.
pub(super) async fn apply(s: &SqlDataStore, writes: &[Write]) -> Result<Vec<Applied>, StoreError> {
    s.apply(writes, &mut [], &linker()).await
}

on_both_backends! {
    /// Revisions grow, a moved or deleted entry leaves a tombstone, and a reopened store
    /// migrates nothing twice and keeps the data.
    async fn entries_revisions_and_tombstones(s) {
        let mut e = entry("a", "spiffe://example.org/p1");
        e.dns_names = vec!["a.example.org".into()];
        e.engine = Some("orders".into());
        e.admin = true;
        e.x509_svid_ttl = 3600;
        e.federates_with = vec!["spiffe://other.org".into()];
        let a = s.store.create_entry(e.clone()).await.unwrap();
        assert_eq!(a, Entry { revision: 1, ..e });
        let b = s
            .store
            .create_entry(entry("b", "spiffe://example.org/p1"))
            .await
            .unwrap();
        assert!(b.revision > a.revision);
        let mut moved = b.clone();
        moved.parent_id = id_of("spiffe://example.org/p2");
        moved.created_at = 99;
        let (stored, t) = s.store.update_entry(moved).await.unwrap();
        assert_eq!(stored.created_at, 1, "created_at is kept");
        assert_eq!(t.unwrap().parent_id.as_str(), "spiffe://example.org/p1");
        // An update that keeps the parent leaves no tombstone.
        let mut hinted = stored.clone();
        hinted.hint = "h".into();
        assert_eq!(s.store.update_entry(hinted).await.unwrap().1, None);
        let (_, t) = s.store.delete_entry("a").await.unwrap();
        assert_eq!(t.entry_id, "a");
        assert_eq!(t.revision, 5);
        let listed = s.store.list_entries().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].hint.as_str(), listed[0].revision), ("h", 4));
        assert_eq!(s.store.list_tombstones().await.unwrap().len(), 2);
        assert!(matches!(
            s.store.delete_entry("a").await,
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            s.store.update_entry(entry("nope", "spiffe://example.org/p1")).await,
            Err(StoreError::NotFound(_))
        ));
        let again = s.open_again().await;
        assert_eq!(again.entry_revision().await.unwrap(), 5);
        assert_eq!(again.list_entries().await.unwrap(), listed);
    }
}

on_both_backends! {
    /// Concurrent entry writes from two handles never share a revision.
    async fn concurrent_entry_writes_get_distinct_revisions(s) {
        let other = s.open_again().await;
        let mut tasks = Vec::new();
        for i in 0..20 {
            let st = if i % 2 == 0 { s.store.clone() } else { other.clone() };
            tasks.push(tokio::spawn(async move {
                st.create_entry(entry(&format!("e{i}"), "spiffe://example.org/p"))
                    .await
                    .unwrap()
                    .revision
            }));
        }
        let mut revs = Vec::new();
        for t in tasks {
            revs.push(t.await.unwrap());
        }
        revs.sort_unstable();
        assert_eq!(revs, (1..=20).collect::<Vec<i64>>());
        assert_eq!(s.store.entry_revision().await.unwrap(), 20);
    }
}

on_both_backends! {
    /// A join token is taken once; expired ones are pruned.
    async fn join_token_taken_once_and_pruned(s) {
        let t = JoinToken {
            token_hash: "h".into(),
            id: "i".into(),
            alias: Some(id_of("spiffe://example.org/node")),
            expires_at: 10,
        };
        s.store.create_join_token(t.clone()).await.unwrap();
        assert_eq!(s.store.take_join_token("h").await.unwrap(), Some(t));
        assert_eq!(s.store.take_join_token("h").await.unwrap(), None);
        for (h, exp) in [("old", 5), ("new", 50)] {
            let t = JoinToken { token_hash: h.into(), id: h.into(), alias: None, expires_at: exp };
            s.store.create_join_token(t).await.unwrap();
        }
        assert_eq!(s.store.prune_join_tokens(10).await.unwrap(), 1);
        assert_eq!(s.store.take_join_token("old").await.unwrap(), None);
        assert!(s.store.take_join_token("new").await.unwrap().is_some());
    }
}

on_both_backends! {
    /// Twenty concurrent takers of one token, on two handles: exactly one gets it.
    async fn a_join_token_is_consumed_exactly_once_under_20_concurrent_takers(s) {
        let other = s.open_again().await;
        for round in 0..3 {
            let hash = format!("race{round}");
            s.store
                .create_join_token(JoinToken {
                    token_hash: hash.clone(),
                    id: hash.clone(),
                    alias: None,
                    expires_at: i64::MAX,
                })
                .await
                .unwrap();
            let start = Arc::new(tokio::sync::Barrier::new(20));
            let mut tasks = Vec::new();
            for i in 0..20 {
                let st = if i % 2 == 0 { s.store.clone() } else { other.clone() };
                let (start, hash) = (start.clone(), hash.clone());
                tasks.push(tokio::spawn(async move {
                    start.wait().await;
                    st.take_join_token(&hash).await.unwrap()
                }));
            }
            let mut winners = 0;
            for t in tasks {
                if let Some(tok) = t.await.unwrap() {
                    assert_eq!(tok.token_hash, hash);
                    winners += 1;
                }
            }
            assert_eq!(winners, 1, "round {round}: {winners} takers got the token");
        }
    }
}

on_both_backends! {
    /// Agents: insert once, compare-and-set updates, ban that wins over a stale write, fork
    /// state kept, evict (delete) once.
    async fn agents_insert_update_ban_fork_and_evict(s) {
        let a = agent(1);
        let Applied::Agent(stored) = apply(&s.store, &[Write::InsertAgent(a.clone())])
            .await
            .unwrap()
            .remove(0)
        else {
            panic!("not an agent")
        };
        assert_eq!(stored, AgentRecord { revision: 1, ..a.clone() });
        assert!(matches!(
            apply(&s.store, &[Write::InsertAgent(a.clone())]).await,
            Err(StoreError::Conflict(_))
        ));
        // A renewal: new serial, the old one kept as previous; alias and fork state stored.
        let renewed = AgentRecord {
            serial: "beef".into(),
            previous_serial: stored.serial.clone(),
            alias: Some(id_of("spiffe://example.org/node/a")),
            forked: true,
            forked_at: 1_700_000_100,
            selectors: vec![continuity_attestors::Selector::raw("k8s_psat", "cluster:demo")],
            serial_first_used: 1_700_000_050,
            ..stored.clone()
        };
        apply(&s.store, &[Write::UpdateAgent(renewed.clone())]).await.unwrap();
        let got = s.store.get_agent(a.spiffe_id.as_str()).await.unwrap().unwrap();
        assert_eq!(got, AgentRecord { revision: 2, ..renewed.clone() });
        // The same revision again is stale now.
        assert!(matches!(
            apply(&s.store, &[Write::UpdateAgent(renewed)]).await,
            Err(StoreError::Conflict(_))
        ));
        apply(&s.store, &[Write::BanAgent(a.spiffe_id.to_string())]).await.unwrap();
        let banned = s.store.get_agent(a.spiffe_id.as_str()).await.unwrap().unwrap();
        assert!(banned.banned && banned.forked);
        assert_eq!(banned.revision, 3);
        apply(&s.store, &[Write::InsertAgent(agent(2))]).await.unwrap();
        assert_eq!(s.store.list_agents().await.unwrap().len(), 2);
        apply(&s.store, &[Write::DeleteAgent(a.spiffe_id.to_string())]).await.unwrap();
        assert_eq!(s.store.get_agent(a.spiffe_id.as_str()).await.unwrap(), None);
        assert!(matches!(
            apply(&s.store, &[Write::DeleteAgent(a.spiffe_id.to_string())]).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            apply(&s.store, &[Write::BanAgent(a.spiffe_id.to_string())]).await,
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(s.store.list_agents().await.unwrap(), vec![AgentRecord { revision: 1, ..agent(2) }]);
    }
}

on_both_backends! {
    /// Concurrent compare-and-set writes of one agent from two handles: each revision is
    /// written once, the losers get Conflict, and a ban in the middle is never lost.
    async fn concurrent_agent_writes_never_lose_a_ban(s) {
        let other = s.open_again().await;
        apply(&s.store, &[Write::InsertAgent(agent(7))]).await.unwrap();
        let id = agent(7).spiffe_id.to_string();
        let mut tasks = Vec::new();
        for i in 0..10 {
            let st = if i % 2 == 0 { s.store.clone() } else { other.clone() };
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                if i == 5 {
                    return apply(&st, &[Write::BanAgent(id)]).await.map(|_| ());
                }
                let current = st.get_agent(&id).await.unwrap().unwrap();
                let next = AgentRecord { last_seen: current.last_seen + 1, ..current };
                apply(&st, &[Write::UpdateAgent(next)]).await.map(|_| ())
            }));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => ok += 1,
                Err(StoreError::Conflict(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        let a = s.store.get_agent(&id).await.unwrap().unwrap();
        assert!(a.banned, "the ban was lost");
        assert_eq!(a.revision, 1 + ok, "one revision per successful write");
    }
}

fn ca_key(id: &str, purpose: KeyPurpose, state: CaKeyState, not_before: i64) -> CaKeyRecord {
    CaKeyRecord {
        key_id: id.into(),
        purpose,
        state,
        key_type: "ec-p256".into(),
        // Every byte value, including NUL and invalid UTF-8.
        cert_der: (0..=255u8).collect(),
        public_key: vec![0x30, 0, 0xff, 0x80],
        kid: format!("kid-{id}"),
        not_before,
        not_after: not_before + 86_400,
    }
}

on_both_backends! {
    /// The CA journal stores every column (bytes exactly) and replaces and deletes by key;
    /// the bundle sequence only grows, one number per caller, across handles.
    async fn ca_journal_and_bundle_sequence(s) {
        let x = ca_key("x1", KeyPurpose::X509, CaKeyState::Active, 200);
        let j = ca_key("j1", KeyPurpose::Jwt, CaKeyState::Prepared, 100);
        s.store.put_ca_key(&x).await.unwrap();
        s.store.put_ca_key(&j).await.unwrap();
        assert_eq!(s.store.list_ca_keys().await.unwrap(), vec![j.clone(), x.clone()]);
        let retired = CaKeyRecord { state: CaKeyState::Retired, cert_der: vec![], ..x.clone() };
        s.store.put_ca_key(&retired).await.unwrap();
        assert_eq!(s.store.list_ca_keys().await.unwrap(), vec![j.clone(), retired]);
        s.store.delete_ca_key("x1").await.unwrap();
        assert_eq!(s.store.list_ca_keys().await.unwrap(), vec![j]);

        assert_eq!(s.store.bundle_sequence().await.unwrap(), 0);
        assert_eq!(s.store.next_bundle_sequence().await.unwrap(), 1);
        let other = s.open_again().await;
        let mut tasks = Vec::new();
        for i in 0..10 {
            let st = if i % 2 == 0 { s.store.clone() } else { other.clone() };
            tasks.push(tokio::spawn(async move { st.next_bundle_sequence().await.unwrap() }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (2..=11).collect::<Vec<u64>>());
        assert_eq!(other.bundle_sequence().await.unwrap(), 11);
    }
}

on_both_backends! {
    /// Rows whose IDs do not parse are errors naming the row and column, never a panic.
    async fn a_row_with_a_bad_id_is_an_error_naming_the_row(s) {
        s.store
            .create_entry(entry("good", "spiffe://example.org/p1"))
            .await
            .unwrap();
        let raw = s.raw().await;
        // Someone with write access to the datastore plants rows whose IDs do not parse.
        sqlx::query("UPDATE entries SET parent_id = 'spiffe://example.org/../x' WHERE id = 'good'")
            .execute(&raw)
            .await
            .unwrap();
        let e = s.store.list_entries().await.unwrap_err().to_string();
        assert!(e.contains("entry good: parent_id: "), "{e}");
        sqlx::query(
            "INSERT INTO agents (spiffe_id, attestation_type, serial, previous_serial, expires_at, banned, alias, created_at, last_seen)
             VALUES ('spiffe://example.org/continuity/agent/x', 'join_token', 's', '', 0, 0, 'not an id', 0, 0)",
        )
        .execute(&raw)
        .await
        .unwrap();
        let e = s.store.list_agents().await.unwrap_err().to_string();
        assert!(
            e.contains("agent \"spiffe://example.org/continuity/agent/x\": alias: "),
            "{e}"
        );
        sqlx::query("INSERT INTO entry_tombstones (entry_id, parent_id, revision) VALUES ('t', '', 7)")
            .execute(&raw)
            .await
            .unwrap();
        let e = s.store.list_tombstones().await.unwrap_err().to_string();
        assert!(
            e.contains("tombstone of entry t at revision 7: parent_id: "),
            "{e}"
        );
    }
}

on_both_backends! {
    /// Several servers starting at once on one new datastore (an HA deployment's first
    /// start): every one migrates or waits for the one migrating, none fails, and the schema
    /// is applied once.
    async fn servers_starting_together_migrate_once(s) {
        let fresh = match s.backend {
            crate::datastore::Backend::Sqlite => {
                format!("sqlite://{}?mode=rwc", s.dir().join("together.sqlite3").display())
            }
            crate::datastore::Backend::Postgres => continuity_common::testing::postgres::database(),
        };
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let url = fresh.clone();
            tasks.push(tokio::spawn(async move {
                SqlDataStore::connect(&url, test_sealer()).await.map(|_| ())
            }));
        }
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                panic!("a server starting alongside others failed: {e}");
            }
        }
        let store = SqlDataStore::connect(&fresh, test_sealer()).await.unwrap();
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM schema_migrations")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(applied, store.schema_version().await.unwrap());
        assert_eq!(store.audit_head().await.unwrap().seq, 0);
        assert_eq!(store.bundle_sequence().await.unwrap(), 0);
    }
}
