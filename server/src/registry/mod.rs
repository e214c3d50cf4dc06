//! The in-memory index of entries and agents, kept in step with the datastore by the writes
//! themselves, so an agent sync or an SVID authorization never costs a database query.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use continuity_common::{Clock, SpiffeId};

use crate::audit::{Audit, AuditEvent};
use crate::datastore::{
    AgentRecord, AgentStore, Applied, Entry, EntryStore, StoreError, Tombstone, Write,
};
use crate::metrics::Metrics;

mod agents;
mod feed;

pub use agents::{AgentChange, SerialUse};

/// How long the previous agent SVID is still accepted after the current one was first used:
/// calls already in flight on the agent's old channel when it switched after a renewal.
pub const DEFAULT_PREVIOUS_SVID_GRACE: Duration = Duration::from_secs(30);

/// The audit actor of what the server decides by itself.
pub const SERVER_ACTOR: &str = "server";

/// Registry failures, mapped to gRPC statuses at the API edge.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An identical entry already exists.
    #[error("an entry with the same SPIFFE ID, parent ID and selectors already exists: {0}")]
    Duplicate(String),
    /// No such entry or agent.
    #[error("{0} not found")]
    NotFound(String),
    /// No randomness for an id.
    #[error(transparent)]
    Rng(#[from] continuity_common::rand::RngError),
    /// The agent has no record (never attested, or evicted).
    #[error("agent {0} is not attested (evicted?); attest again")]
    NotAttested(String),
    /// The agent is banned.
    #[error("agent {0} is banned")]
    Banned(String),
    /// A superseded SVID of the agent was presented: two lineages exist.
    #[error(
        "agent identity forked: {0}; a superseded agent SVID was presented, so its key is held by more than one party: ban or evict it and re-attest"
    )]
    Forked(String),
    /// The presented SVID may not do this.
    #[error("{0}")]
    Refused(String),
    /// The agent record kept changing under a read-modify-write.
    #[error("agent {0} changed concurrently too often; retry")]
    Contended(String),
}

impl RegistryError {
    fn from_store(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => Self::NotFound(m),
            other => Self::Store(other),
        }
    }
}

#[derive(Default)]
struct Index {
    entries: HashMap<String, Arc<Entry>>,
    by_parent: HashMap<SpiffeId, BTreeSet<String>>,
    /// Sorted by revision.
    tombstones: Vec<Tombstone>,
    revision: i64,
    agents: HashMap<String, AgentRecord>,
    /// Ids of the node alias entries.
    nodes: BTreeSet<String>,
}

impl Index {
    /// The parent IDs through which `agent` is authorized: itself, its join-token alias, and
    /// the SPIFFE ID of every node alias entry whose selectors its node selectors include.
    /// Sorted, without duplicates.
    fn parents(&self, agent: &AgentRecord) -> Vec<SpiffeId> {
        let mut p = vec![agent.spiffe_id.clone()];
        p.extend(agent.alias.iter().cloned());
        if !agent.selectors.is_empty() {
            let aliases = self
                .nodes
                .iter()
                .filter_map(|id| self.entries.get(id))
                .filter(|e| e.parent_id.trust_domain() == agent.spiffe_id.trust_domain())
                .filter(|e| {
                    continuity_common::selector::matches(&e.selectors, &agent.selectors[..])
                })
                .map(|e| e.spiffe_id.clone());
            p.extend(aliases);
        }
        p.sort();
        p.dedup();
        p
    }

    fn insert(&mut self, e: Entry) {
        self.revision = self.revision.max(e.revision);
        if e.is_node() {
            self.nodes.insert(e.id.clone());
        }
        self.by_parent
            .entry(e.parent_id.clone())
            .or_default()
            .insert(e.id.clone());
        self.entries.insert(e.id.clone(), Arc::new(e));
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Entry>> {
        let old = self.entries.remove(id)?;
        self.nodes.remove(id);
        if let Some(set) = self.by_parent.get_mut(&old.parent_id) {
            set.remove(id);
            if set.is_empty() {
                self.by_parent.remove(&old.parent_id);
            }
        }
        Some(old)
    }

    fn tombstone(&mut self, t: Tombstone) {
        self.revision = self.revision.max(t.revision);
        self.tombstones.push(t);
    }
}

/// What an agent needs to bring its entry cache up to date.
#[derive(Debug, Clone, Default)]
pub struct SyncResult {
    /// Entries changed after the agent's revision (or all of them when `full`).
    pub entries: Vec<Arc<Entry>>,
    /// Entries the agent must drop.
    pub removed: Vec<String>,
    /// The revision the agent holds after applying this.
    pub revision: i64,
    /// Whether `entries` is the complete set.
    pub full: bool,
}

/// Entries and agents, indexed in memory, written through to the datastore.
pub struct Registry {
    /// Entries and tombstones are read from here by revision (the change feed's catch-up).
    entries: Arc<dyn EntryStore>,
    /// Re-reads an agent record when a compare-and-set lost, or another server changed it.
    agents: Arc<dyn AgentStore>,
    clock: Arc<dyn Clock>,
    audit: Arc<Audit>,
    metrics: Arc<Metrics>,
    previous_svid_grace: i64,
    index: RwLock<Index>,
    /// Per agent with node selectors: the revision and parent IDs of its last sync here. An
    /// incremental sync is only correct from the parents the agent synced with; when its node
    /// aliases changed since (a node entry, or its selectors at re-attestation), or this
    /// server does not know what it saw, it syncs in full.
    synced: std::sync::Mutex<HashMap<String, (i64, Vec<SpiffeId>)>>,
    writes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// A new random id (UUID v4 form).
pub fn new_uuid() -> Result<String, continuity_common::rand::RngError> {
    let mut b = continuity_common::rand::array::<16>()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

impl Registry {
    /// Loads entries and tombstones from `entries` and agents from `agents`; admin writes are
    /// audited in `audit` (in the same transaction), agent forks counted in `metrics`.
    pub async fn load(
        entries: Arc<dyn EntryStore>,
        agents: Arc<dyn AgentStore>,
        clock: Arc<dyn Clock>,
        audit: Arc<Audit>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RegistryError> {
        let index = feed::load_index(&*entries, &*agents).await?;
        Ok(Self {
            entries,
            agents,
            clock,
            audit,
            metrics,
            previous_svid_grace: DEFAULT_PREVIOUS_SVID_GRACE.as_secs() as i64,
            index: RwLock::new(index),
            synced: std::sync::Mutex::default(),
            writes: tokio::sync::Mutex::new(()),
        })
    }

    /// The same registry accepting the previous agent SVID for `grace` after the current one
    /// was first used.
    pub fn with_previous_svid_grace(mut self, grace: Duration) -> Self {
        self.previous_svid_grace = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
        self
    }

    /// Applies one write with its audit record; nothing is applied if the audit fails.
    async fn commit(&self, w: Write, ev: AuditEvent) -> Result<Applied, RegistryError> {
        let mut applied = self
            .audit
            .commit(&[w], &[ev])
            .await
            .map_err(RegistryError::from_store)?;
        applied
            .pop()
            .ok_or_else(|| RegistryError::Store(StoreError::Corrupt("no write result".into())))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates an entry (id and revision assigned here), audited as `actor`.
    pub async fn create_entry(&self, e: Entry, actor: &str) -> Result<Arc<Entry>, RegistryError> {
        self.create_entry_with_id_prefix(e, "", actor).await
    }

    /// Like [`Registry::create_entry`], the new id being `id_prefix` followed by a UUID (how
    /// the registration controller marks its entries: ids never reach workloads).
    pub async fn create_entry_with_id_prefix(
        &self,
        mut e: Entry,
        id_prefix: &str,
        actor: &str,
    ) -> Result<Arc<Entry>, RegistryError> {
        let _w = self.writes.lock().await;
        self.follow().await;
        if let Some(dup) = self.find_duplicate(&e, None) {
            return Err(RegistryError::Duplicate(dup));
        }
        e.id = format!("{id_prefix}{}", new_uuid()?);
        e.created_at = self.clock.unix();
        let ev = AuditEvent::ok(actor, "entry.create", &e.id);
        let Applied::Entry(stored, _) = self.commit(Write::CreateEntry(e), ev).await? else {
            return Err(RegistryError::Store(StoreError::Corrupt(
                "entry write result".into(),
            )));
        };
        self.follow().await;
        Ok(Arc::new(stored))
    }

    /// Replaces an entry, audited as `actor`.
    pub async fn update_entry(&self, e: Entry, actor: &str) -> Result<Arc<Entry>, RegistryError> {
        let _w = self.writes.lock().await;
        self.follow().await;
        if self.entry(&e.id).is_none() {
            return Err(RegistryError::NotFound(format!("entry {}", e.id)));
        }
        if let Some(dup) = self.find_duplicate(&e, Some(&e.id)) {
            return Err(RegistryError::Duplicate(dup));
        }
        let ev = AuditEvent::ok(actor, "entry.update", &e.id);
        let Applied::Entry(stored, _) = self.commit(Write::UpdateEntry(e), ev).await? else {
            return Err(RegistryError::Store(StoreError::Corrupt(
                "entry write result".into(),
            )));
        };
        self.follow().await;
        Ok(Arc::new(stored))
    }

    /// Deletes an entry, audited as `actor`.
    pub async fn delete_entry(&self, id: &str, actor: &str) -> Result<Arc<Entry>, RegistryError> {
        let _w = self.writes.lock().await;
        self.follow().await;
        if self.entry(id).is_none() {
            return Err(RegistryError::NotFound(format!("entry {id}")));
        }
        let ev = AuditEvent::ok(actor, "entry.delete", id);
        let Applied::Entry(old, _) = self.commit(Write::DeleteEntry(id.into()), ev).await? else {
            return Err(RegistryError::Store(StoreError::Corrupt(
                "entry write result".into(),
            )));
        };
        self.follow().await;
        Ok(Arc::new(old))
    }

    fn find_duplicate(&self, e: &Entry, except: Option<&str>) -> Option<String> {
        let idx = self.read();
        let ids = idx.by_parent.get(&e.parent_id)?;
        ids.iter()
            .filter_map(|id| idx.entries.get(id))
            .find(|o| Some(o.id.as_str()) != except && o.same_registration(e))
            .map(|o| o.id.clone())
    }

    /// One entry by id.
    pub fn entry(&self, id: &str) -> Option<Arc<Entry>> {
        self.read().entries.get(id).cloned()
    }

    /// Every entry matching the filter closure, ordered by SPIFFE ID then id.
    pub fn entries(&self, filter: impl Fn(&Entry) -> bool) -> Vec<Arc<Entry>> {
        let mut out: Vec<_> = self
            .read()
            .entries
            .values()
            .filter(|e| filter(e))
            .cloned()
            .collect();
        out.sort_by(|a, b| (&a.spiffe_id, &a.id).cmp(&(&b.spiffe_id, &b.id)));
        out
    }

    /// The entry `id` if `agent` may obtain SVIDs for it.
    pub fn authorized_entry(&self, agent: &AgentRecord, id: &str) -> Option<Arc<Entry>> {
        let idx = self.read();
        let e = idx.entries.get(id)?;
        idx.parents(agent).contains(&e.parent_id).then(|| e.clone())
    }

    /// The trust domains (as written in `federates_with`) the entries authorized for `agent`
    /// federate with.
    pub fn federated_trust_domains(
        &self,
        agent: &AgentRecord,
    ) -> std::collections::BTreeSet<String> {
        let idx = self.read();
        let mut out = std::collections::BTreeSet::new();
        for parent in &idx.parents(agent) {
            for id in idx.by_parent.get(parent).into_iter().flatten() {
                if let Some(e) = idx.entries.get(id) {
                    out.extend(e.federates_with.iter().cloned());
                }
            }
        }
        out
    }

    /// The node alias IDs `agent` holds now (node entries its node selectors satisfy).
    pub fn node_aliases(&self, agent: &AgentRecord) -> Vec<SpiffeId> {
        let idx = self.read();
        let mut p = idx.parents(agent);
        p.retain(|id| *id != agent.spiffe_id && Some(id) != agent.alias.as_ref());
        p
    }

    /// Entries authorized for `agent` that changed after `since` (everything when `since` is 0).
    pub fn sync(&self, agent: &AgentRecord, since: i64) -> SyncResult {
        let idx = self.read();
        let parents = idx.parents(agent);
        let full = since <= 0 || !self.same_parents(agent, since, &parents);
        let mut out = SyncResult {
            revision: idx.revision,
            full,
            ..Default::default()
        };
        for parent in &parents {
            for id in idx.by_parent.get(parent).into_iter().flatten() {
                if let Some(e) = idx.entries.get(id).filter(|e| full || e.revision > since) {
                    out.entries.push(e.clone());
                }
            }
            if !full {
                let start = idx.tombstones.partition_point(|t| t.revision <= since);
                for t in &idx.tombstones[start..] {
                    let still_here = idx
                        .entries
                        .get(&t.entry_id)
                        .is_some_and(|e| parents.contains(&e.parent_id));
                    if t.parent_id == *parent && !still_here {
                        out.removed.push(t.entry_id.clone());
                    }
                }
            }
        }
        if !agent.selectors.is_empty() {
            let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
            synced.insert(agent.spiffe_id.to_string(), (out.revision, parents));
        }
        out
    }

    /// Whether `agent`, syncing from `since`, synced here at `since` with these `parents`.
    /// An agent without node selectors has fixed parents (itself and its token's alias).
    fn same_parents(&self, agent: &AgentRecord, since: i64, parents: &[SpiffeId]) -> bool {
        if agent.selectors.is_empty() {
            return true;
        }
        let synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        synced
            .get(agent.spiffe_id.as_str())
            .is_some_and(|(rev, p)| *rev == since && p == parents)
    }

    /// The current entry revision.
    pub fn revision(&self) -> i64 {
        self.read().revision
    }
}
