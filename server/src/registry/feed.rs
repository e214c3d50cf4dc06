//! The registry's side of the change feed: what another server wrote reaches this index.
//!
//! Entries advance only by revision, in order: [`Registry::catch_up_entries`] reads the entry
//! revision `R` first, then every entry and tombstone in `(index revision, R]`, and applies
//! them in revision order. This server's own entry writes go the same way (right after they
//! commit, under the same lock), so the index revision an agent syncs to always means "every
//! change up to here is in the index", even when another server's write committed in between.
//! Agents are read again one by one ([`Registry::reload_agent`]). Every row comes through the
//! datastore's checked reads: a row whose record MAC fails is reported there and never applied.

use super::{Index, Registry, RegistryError};
use crate::datastore::{AgentStore, Entry, EntryStore, Tombstone};

/// Reads the whole index: entries and tombstones up to the entry revision read first (later
/// ones come with the first catch-up), and every agent.
pub(super) async fn load_index(
    entries: &dyn EntryStore,
    agents: &dyn AgentStore,
) -> Result<Index, RegistryError> {
    let revision = entries.entry_revision().await?;
    let mut index = Index::default();
    for e in entries.list_entries().await? {
        if e.revision <= revision {
            index.insert(e);
        }
    }
    for t in entries.list_tombstones().await? {
        if t.revision <= revision {
            index.tombstone(t);
        }
    }
    index.revision = revision;
    for a in agents.list_agents().await? {
        index.agents.insert(a.spiffe_id.to_string(), a);
    }
    Ok(index)
}

/// Applies entries and tombstones of revisions in `(index.revision, upto]`, in revision order.
fn apply(index: &mut Index, entries: Vec<Entry>, tombstones: Vec<Tombstone>, upto: i64) {
    // The entries are the rows as they are now: each replaces what the index held.
    for e in entries {
        index.remove(&e.id);
        index.insert(e);
    }
    for t in tombstones {
        // A tombstone removes what was there before it; an entry moved to another parent
        // carries the tombstone's own revision and stays.
        if index
            .entries
            .get(&t.entry_id)
            .is_some_and(|e| e.revision < t.revision)
        {
            index.remove(&t.entry_id);
        }
        index.tombstone(t);
    }
    index.revision = index.revision.max(upto);
}

impl Registry {
    /// Brings the entries up to the datastore's entry revision; returns whether anything was
    /// read. With nothing new this costs one tiny query.
    pub async fn catch_up_entries(&self) -> Result<bool, RegistryError> {
        let _w = self.writes.lock().await;
        self.catch_up_locked().await
    }

    /// [`Registry::catch_up_entries`] with the write lock held.
    pub(super) async fn catch_up_locked(&self) -> Result<bool, RegistryError> {
        let from = self.revision();
        let upto = self.entries.entry_revision().await?;
        if upto <= from {
            return Ok(false);
        }
        let entries = self.entries.entries_between(from, upto).await?;
        let tombstones = self.entries.tombstones_between(from, upto).await?;
        apply(&mut self.write(), entries, tombstones, upto);
        Ok(true)
    }

    /// Before one of this server's entry writes is checked (duplicates, existence) and after it
    /// committed: the index follows the datastore (this write and whatever other servers
    /// committed before it), with the write lock held. A failure here is only logged: the
    /// change feed's next poll catches up.
    pub(super) async fn follow(&self) {
        if let Err(e) = self.catch_up_locked().await {
            tracing::warn!(error = %e, "entry index could not read back a committed write; the change feed will retry");
        }
    }

    /// Reads agent `id` again from the datastore (another server changed it). A row that
    /// fails its record MAC is an error (reported by the datastore) and changes nothing.
    pub async fn reload_agent(&self, id: &str) -> Result<(), RegistryError> {
        let _w = self.writes.lock().await;
        let a = self.agents.get_agent(id).await?;
        self.refresh_agent(id, a);
        Ok(())
    }

    /// Reads the whole index again (the change feed lost track: its changes were pruned).
    pub async fn reload_all(&self) -> Result<(), RegistryError> {
        let _w = self.writes.lock().await;
        let index = load_index(&*self.entries, &*self.agents).await?;
        *self.write() = index;
        Ok(())
    }
}

#[cfg(test)]
#[path = "feed_tests.rs"]
mod tests;
