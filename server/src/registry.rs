//! The in-memory index of entries and agents, kept in step with the datastore by the writes
//! themselves, so an agent sync or an SVID authorization never costs a database query.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use continuity_common::Clock;

use crate::datastore::{AgentRecord, DataStore, Entry, StoreError, Tombstone};

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
}

#[derive(Default)]
struct Index {
    entries: HashMap<String, Arc<Entry>>,
    by_parent: HashMap<String, BTreeSet<String>>,
    /// Sorted by revision.
    tombstones: Vec<Tombstone>,
    revision: i64,
    agents: HashMap<String, AgentRecord>,
}

impl Index {
    fn insert(&mut self, e: Entry) {
        self.revision = self.revision.max(e.revision);
        self.by_parent
            .entry(e.parent_id.clone())
            .or_default()
            .insert(e.id.clone());
        self.entries.insert(e.id.clone(), Arc::new(e));
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Entry>> {
        let old = self.entries.remove(id)?;
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
    store: Arc<dyn DataStore>,
    clock: Arc<dyn Clock>,
    index: RwLock<Index>,
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
    /// Loads entries, tombstones and agents from the datastore.
    pub async fn load(
        store: Arc<dyn DataStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, RegistryError> {
        let mut index = Index::default();
        for e in store.list_entries().await? {
            index.insert(e);
        }
        for t in store.list_tombstones().await? {
            index.tombstone(t);
        }
        index.revision = index.revision.max(store.entry_revision().await?);
        for a in store.list_agents().await? {
            index.agents.insert(a.spiffe_id.clone(), a);
        }
        Ok(Self {
            store,
            clock,
            index: RwLock::new(index),
            writes: tokio::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates an entry (id and revision assigned here).
    pub async fn create_entry(&self, mut e: Entry) -> Result<Arc<Entry>, RegistryError> {
        let _w = self.writes.lock().await;
        if let Some(dup) = self.find_duplicate(&e, None) {
            return Err(RegistryError::Duplicate(dup));
        }
        e.id = new_uuid()?;
        e.created_at = self.clock.unix();
        let stored = self.store.create_entry(e).await?;
        let arc = Arc::new(stored.clone());
        self.write().insert(stored);
        Ok(arc)
    }

    /// Replaces an entry.
    pub async fn update_entry(&self, e: Entry) -> Result<Arc<Entry>, RegistryError> {
        let _w = self.writes.lock().await;
        if self.entry(&e.id).is_none() {
            return Err(RegistryError::NotFound(format!("entry {}", e.id)));
        }
        if let Some(dup) = self.find_duplicate(&e, Some(&e.id)) {
            return Err(RegistryError::Duplicate(dup));
        }
        let (stored, moved) = self.store.update_entry(e).await?;
        let arc = Arc::new(stored.clone());
        let mut idx = self.write();
        idx.remove(&stored.id);
        if let Some(t) = moved {
            idx.tombstone(t);
        }
        idx.insert(stored);
        Ok(arc)
    }

    /// Deletes an entry.
    pub async fn delete_entry(&self, id: &str) -> Result<Arc<Entry>, RegistryError> {
        let _w = self.writes.lock().await;
        if self.entry(id).is_none() {
            return Err(RegistryError::NotFound(format!("entry {id}")));
        }
        let (old, t) = self.store.delete_entry(id).await?;
        let mut idx = self.write();
        idx.remove(id);
        idx.tombstone(t);
        Ok(Arc::new(old))
    }

    fn find_duplicate(&self, e: &Entry, except: Option<&str>) -> Option<String> {
        let idx = self.read();
        let mut sel = e.selectors.clone();
        sel.sort();
        let ids = idx.by_parent.get(&e.parent_id)?;
        ids.iter()
            .filter_map(|id| idx.entries.get(id))
            .find(|o| {
                Some(o.id.as_str()) != except && o.spiffe_id == e.spiffe_id && {
                    let mut s = o.selectors.clone();
                    s.sort();
                    s == sel
                }
            })
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

    /// The parent IDs through which `agent` is authorized: itself and its node alias.
    fn parents(agent: &AgentRecord) -> Vec<&str> {
        let mut p = vec![agent.spiffe_id.as_str()];
        if let Some(a) = agent.alias.as_deref() {
            p.push(a);
        }
        p
    }

    /// The entry `id` if `agent` may obtain SVIDs for it.
    pub fn authorized_entry(&self, agent: &AgentRecord, id: &str) -> Option<Arc<Entry>> {
        let e = self.entry(id)?;
        Self::parents(agent)
            .contains(&e.parent_id.as_str())
            .then_some(e)
    }

    /// Entries authorized for `agent` that changed after `since` (everything when `since` is 0).
    pub fn sync(&self, agent: &AgentRecord, since: i64) -> SyncResult {
        let idx = self.read();
        let full = since <= 0;
        let mut out = SyncResult {
            revision: idx.revision,
            full,
            ..Default::default()
        };
        for parent in Self::parents(agent) {
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
                        .is_some_and(|e| Self::parents(agent).contains(&e.parent_id.as_str()));
                    if t.parent_id == parent && !still_here {
                        out.removed.push(t.entry_id.clone());
                    }
                }
            }
        }
        out
    }

    /// The current entry revision.
    pub fn revision(&self) -> i64 {
        self.read().revision
    }

    /// One agent.
    pub fn agent(&self, spiffe_id: &str) -> Option<AgentRecord> {
        self.read().agents.get(spiffe_id).cloned()
    }

    /// Every agent, ordered by ID.
    pub fn agents(&self) -> Vec<AgentRecord> {
        let mut v: Vec<_> = self.read().agents.values().cloned().collect();
        v.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        v
    }

    /// Inserts or replaces an agent.
    pub async fn put_agent(&self, a: AgentRecord) -> Result<(), RegistryError> {
        let _w = self.writes.lock().await;
        self.store.put_agent(&a).await?;
        self.write().agents.insert(a.spiffe_id.clone(), a);
        Ok(())
    }

    /// Removes an agent; it must attest again (with a new token) to come back.
    pub async fn evict_agent(&self, spiffe_id: &str) -> Result<(), RegistryError> {
        let _w = self.writes.lock().await;
        if !self.store.delete_agent(spiffe_id).await? {
            return Err(RegistryError::NotFound(format!("agent {spiffe_id}")));
        }
        self.write().agents.remove(spiffe_id);
        Ok(())
    }

    /// Bans an agent: every call it makes is refused and it cannot attest again under this ID.
    pub async fn ban_agent(&self, spiffe_id: &str) -> Result<(), RegistryError> {
        let _w = self.writes.lock().await;
        let mut a = self
            .agent(spiffe_id)
            .ok_or_else(|| RegistryError::NotFound(format!("agent {spiffe_id}")))?;
        a.banned = true;
        self.store.put_agent(&a).await?;
        self.write().agents.insert(a.spiffe_id.clone(), a);
        Ok(())
    }
}
