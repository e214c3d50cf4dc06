//! The in-memory index of entries and agents, kept in step with the datastore by the writes
//! themselves, so an agent sync or an SVID authorization never costs a database query.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use continuity_common::Clock;

use crate::audit::{Audit, AuditEvent};
use crate::datastore::{
    AgentRecord, AgentStore, Applied, Entry, EntryStore, StoreError, Tombstone, Write,
};
use crate::metrics::Metrics;

/// How long the previous agent SVID is still accepted after the current one was first used:
/// calls already in flight on the agent's old channel when it switched after a renewal.
pub const DEFAULT_PREVIOUS_SVID_GRACE: Duration = Duration::from_secs(30);

/// Attempts of one agent read-modify-write before giving up under contention.
const AGENT_CAS_ATTEMPTS: usize = 4;

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

/// What an agent read-modify-write decided to do with the record it was given.
#[derive(Debug)]
pub enum AgentChange {
    /// Leave it as it is.
    Keep,
    /// Write this record (a compare-and-set on the revision that was read), with these audit
    /// records in the same transaction.
    Write(AgentRecord, Vec<AuditEvent>),
}

/// Which of its serials an agent authenticated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerialUse {
    /// The current agent SVID.
    Current,
    /// The previous one (before the current was used, or within the grace).
    Previous,
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
    /// Re-reads an agent record when a compare-and-set lost.
    agents: Arc<dyn AgentStore>,
    clock: Arc<dyn Clock>,
    audit: Arc<Audit>,
    metrics: Arc<Metrics>,
    previous_svid_grace: i64,
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
    /// Loads entries and tombstones from `entries` and agents from `agents`; admin writes are
    /// audited in `audit` (in the same transaction), agent forks counted in `metrics`.
    pub async fn load(
        entries: &dyn EntryStore,
        agents: Arc<dyn AgentStore>,
        clock: Arc<dyn Clock>,
        audit: Arc<Audit>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RegistryError> {
        let mut index = Index::default();
        for e in entries.list_entries().await? {
            index.insert(e);
        }
        for t in entries.list_tombstones().await? {
            index.tombstone(t);
        }
        index.revision = index.revision.max(entries.entry_revision().await?);
        for a in agents.list_agents().await? {
            index.agents.insert(a.spiffe_id.clone(), a);
        }
        Ok(Self {
            agents,
            clock,
            audit,
            metrics,
            previous_svid_grace: DEFAULT_PREVIOUS_SVID_GRACE.as_secs() as i64,
            index: RwLock::new(index),
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
    pub async fn create_entry(
        &self,
        mut e: Entry,
        actor: &str,
    ) -> Result<Arc<Entry>, RegistryError> {
        let _w = self.writes.lock().await;
        if let Some(dup) = self.find_duplicate(&e, None) {
            return Err(RegistryError::Duplicate(dup));
        }
        e.id = new_uuid()?;
        e.created_at = self.clock.unix();
        let ev = AuditEvent::ok(actor, "entry.create", &e.id);
        let Applied::Entry(stored, _) = self.commit(Write::CreateEntry(e), ev).await? else {
            return Err(RegistryError::Store(StoreError::Corrupt(
                "entry write result".into(),
            )));
        };
        let arc = Arc::new(stored.clone());
        self.write().insert(stored);
        Ok(arc)
    }

    /// Replaces an entry, audited as `actor`.
    pub async fn update_entry(&self, e: Entry, actor: &str) -> Result<Arc<Entry>, RegistryError> {
        let _w = self.writes.lock().await;
        if self.entry(&e.id).is_none() {
            return Err(RegistryError::NotFound(format!("entry {}", e.id)));
        }
        if let Some(dup) = self.find_duplicate(&e, Some(&e.id)) {
            return Err(RegistryError::Duplicate(dup));
        }
        let ev = AuditEvent::ok(actor, "entry.update", &e.id);
        let Applied::Entry(stored, moved) = self.commit(Write::UpdateEntry(e), ev).await? else {
            return Err(RegistryError::Store(StoreError::Corrupt(
                "entry write result".into(),
            )));
        };
        let arc = Arc::new(stored.clone());
        let mut idx = self.write();
        idx.remove(&stored.id);
        if let Some(t) = moved {
            idx.tombstone(t);
        }
        idx.insert(stored);
        Ok(arc)
    }

    /// Deletes an entry, audited as `actor`.
    pub async fn delete_entry(&self, id: &str, actor: &str) -> Result<Arc<Entry>, RegistryError> {
        let _w = self.writes.lock().await;
        if self.entry(id).is_none() {
            return Err(RegistryError::NotFound(format!("entry {id}")));
        }
        let ev = AuditEvent::ok(actor, "entry.delete", id);
        let Applied::Entry(old, t) = self.commit(Write::DeleteEntry(id.into()), ev).await? else {
            return Err(RegistryError::Store(StoreError::Corrupt(
                "entry write result".into(),
            )));
        };
        let mut idx = self.write();
        idx.remove(id);
        if let Some(t) = t {
            idx.tombstone(t);
        }
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

    /// An atomic read-modify-write of one agent record. `read` is what the caller read
    /// earlier (before slow work such as signing); `f` decides from it what to write, and
    /// the write is a compare-and-set on its revision in the datastore. If the record changed
    /// meanwhile (a ban, an eviction, another server), the CAS fails, the record is read
    /// again from the datastore and `f` decides again: so a ban or eviction is never undone
    /// by a write prepared before it. Returns the record as committed (or as `f` kept it).
    pub async fn modify_agent(
        &self,
        id: &str,
        read: Option<AgentRecord>,
        mut f: impl FnMut(Option<&AgentRecord>) -> Result<AgentChange, RegistryError>,
    ) -> Result<Option<AgentRecord>, RegistryError> {
        let mut current = read;
        // Deciding from what was read needs no lock: most calls change nothing.
        let mut change = f(current.as_ref())?;
        for attempt in 1..=AGENT_CAS_ATTEMPTS {
            let (mut new, events) = match change {
                AgentChange::Keep => return Ok(current),
                AgentChange::Write(new, events) => (new, events),
            };
            // Writes of this server are serialized, so the index follows commit order.
            let _w = self.writes.lock().await;
            new.spiffe_id = id.to_string();
            let write = match &current {
                None => Write::InsertAgent(new),
                Some(cur) => {
                    new.revision = cur.revision;
                    Write::UpdateAgent(new)
                }
            };
            match self.audit.commit(&[write], &events).await {
                Ok(mut applied) => {
                    let Some(Applied::Agent(stored)) = applied.pop() else {
                        return Err(RegistryError::Store(StoreError::Corrupt(
                            "agent write result".into(),
                        )));
                    };
                    self.refresh_agent(id, Some(stored.clone()));
                    return Ok(Some(stored));
                }
                Err(StoreError::Conflict(_)) if attempt < AGENT_CAS_ATTEMPTS => {
                    tracing::debug!(agent = %id, "agent record changed since it was read; reading it again");
                    current = self.agents.get_agent(id).await?;
                    self.refresh_agent(id, current.clone());
                    change = f(current.as_ref())?;
                }
                Err(StoreError::Conflict(_)) => break,
                Err(e) => return Err(RegistryError::Store(e)),
            }
        }
        Err(RegistryError::Contended(id.to_string()))
    }

    fn refresh_agent(&self, id: &str, a: Option<AgentRecord>) {
        let mut idx = self.write();
        match a {
            Some(a) => idx.agents.insert(id.to_string(), a),
            None => idx.agents.remove(id),
        };
    }

    /// Authenticates an agent by the serial of the SVID it presented (chain and expiry are
    /// checked by the caller). The current serial is accepted (its first use is recorded
    /// once); the previous one until the current is first used plus the grace. Any other
    /// serial of this agent ID, or the previous after the grace, means two lineages exist:
    /// the agent is flagged forked (audited, counted, logged) and the call refused; the
    /// current lineage keeps working.
    pub async fn authenticate_agent(
        &self,
        id: &str,
        serial: &str,
    ) -> Result<(AgentRecord, SerialUse), RegistryError> {
        let now = self.clock.unix();
        let grace = self.previous_svid_grace;
        let mut flagged = None;
        let rec = self
            .modify_agent(id, self.agent(id), |cur| {
                flagged = None;
                let a = cur.ok_or_else(|| RegistryError::NotAttested(id.into()))?;
                if a.banned {
                    return Err(RegistryError::Banned(id.into()));
                }
                if serial == a.serial {
                    if a.serial_first_used != 0 {
                        return Ok(AgentChange::Keep);
                    }
                    let mut new = a.clone();
                    new.serial_first_used = now;
                    new.last_seen = now;
                    return Ok(AgentChange::Write(new, vec![]));
                }
                let in_grace =
                    a.serial_first_used == 0 || now < a.serial_first_used.saturating_add(grace);
                if serial == a.previous_serial && in_grace {
                    return Ok(AgentChange::Keep);
                }
                if a.forked {
                    return Err(RegistryError::Forked(format!(
                        "agent {id} presented superseded SVID serial {serial} (already flagged forked)"
                    )));
                }
                let detail = if serial == a.previous_serial {
                    format!(
                        "serial {serial} presented {}s after its successor {} was first used",
                        now - a.serial_first_used,
                        a.serial
                    )
                } else {
                    format!(
                        "superseded serial {serial} presented; current {}, previous {}",
                        a.serial,
                        if a.previous_serial.is_empty() { "none" } else { &a.previous_serial }
                    )
                };
                let mut new = a.clone();
                new.forked = true;
                new.forked_at = now;
                // The older lineage is refused from now on, whichever serial it shows.
                new.previous_serial = String::new();
                let ev = AuditEvent::ok(SERVER_ACTOR, "agent.forked", id)
                    .result(format!("refused: {detail}"));
                flagged = Some(detail);
                Ok(AgentChange::Write(new, vec![ev]))
            })
            .await?
            .ok_or_else(|| RegistryError::NotAttested(id.into()))?;
        if let Some(detail) = flagged {
            self.metrics.inc(&self.metrics.agent_forks);
            tracing::warn!(agent = %id, %detail, "agent identity forked: a superseded agent SVID was presented; ban or evict the agent and re-attest it");
            return Err(RegistryError::Forked(format!("agent {id}: {detail}")));
        }
        let used = if serial == rec.serial {
            SerialUse::Current
        } else {
            SerialUse::Previous
        };
        Ok((rec, used))
    }

    /// Records a renewal: `presented` (the serial the agent authenticated with, read as
    /// `read`) is replaced by `serial`. Refused if the agent was banned or evicted meanwhile,
    /// or if `presented` is no longer renewable (the previous SVID renews only while its
    /// successor has never been used: a lost RenewAgent response).
    pub async fn renew_agent(
        &self,
        read: AgentRecord,
        presented: &str,
        serial: &str,
        expires_at: i64,
    ) -> Result<AgentRecord, RegistryError> {
        let id = read.spiffe_id.clone();
        let now = self.clock.unix();
        self.modify_agent(&id, Some(read), |cur| {
            let a = cur.ok_or_else(|| RegistryError::NotAttested(id.clone()))?;
            if a.banned {
                return Err(RegistryError::Banned(id.clone()));
            }
            let renewable = presented == a.serial
                || (presented == a.previous_serial && a.serial_first_used == 0);
            if !renewable {
                return Err(RegistryError::Refused(format!(
                    "agent {id} may renew only with its current SVID"
                )));
            }
            let mut new = a.clone();
            new.previous_serial = presented.to_string();
            new.serial = serial.to_string();
            new.serial_first_used = 0;
            new.expires_at = expires_at;
            new.last_seen = now;
            Ok(AgentChange::Write(new, vec![]))
        })
        .await?
        .ok_or_else(|| RegistryError::NotAttested(id.clone()))
    }

    /// Records a node attestation of `id` with a freshly signed SVID. `read` is the record
    /// read before signing: a new agent is inserted only if none appeared meanwhile, an
    /// existing one replaced only if it did not change (banned or evicted meanwhile: refused).
    /// A banned agent cannot attest again; a forked flag stays until the agent is evicted.
    /// Replacing an agent whose SVID is unexpired and that was seen within `svid_ttl` (a
    /// live agent) is audited as `agent.takeover` in the same transaction and logged.
    pub async fn attest_agent(
        &self,
        read: Option<AgentRecord>,
        attested: AgentRecord,
        svid_ttl: Duration,
    ) -> Result<AgentRecord, RegistryError> {
        let id = attested.spiffe_id.clone();
        let now = self.clock.unix();
        let ttl = i64::try_from(svid_ttl.as_secs()).unwrap_or(i64::MAX);
        let was_present = read.is_some();
        let mut takeover = None;
        let rec = self
            .modify_agent(&id, read, |cur| {
                takeover = None;
                let mut new = attested.clone();
                new.created_at = now;
                let mut events = vec![];
                match cur {
                    None if was_present => return Err(RegistryError::NotAttested(id.clone())),
                    None => {}
                    Some(a) if a.banned => return Err(RegistryError::Banned(id.clone())),
                    Some(a) => {
                        new.created_at = a.created_at;
                        new.forked = a.forked;
                        new.forked_at = a.forked_at;
                        if a.expires_at > now && now.saturating_sub(a.last_seen) <= ttl {
                            let detail = format!(
                                "replaced the live agent's SVID serial {} (last seen {}s ago) with {} by {} attestation",
                                a.serial,
                                now.saturating_sub(a.last_seen),
                                new.serial,
                                new.attestation_type
                            );
                            events.push(
                                AuditEvent::ok(SERVER_ACTOR, "agent.takeover", &id)
                                    .result(format!("ok; {detail}")),
                            );
                            takeover = Some(detail);
                        }
                    }
                }
                Ok(AgentChange::Write(new, events))
            })
            .await?
            .ok_or_else(|| RegistryError::NotAttested(id.clone()))?;
        if let Some(detail) = takeover {
            tracing::warn!(agent = %id, %detail, "re-attestation took over a node whose agent was live; if that agent was not restarted on purpose, investigate the node");
        }
        Ok(rec)
    }

    /// Bans an agent: every call it makes is refused and it cannot attest again under this
    /// ID. Unconditional: wins over any write in flight. Audited as `actor`.
    pub async fn ban_agent(&self, spiffe_id: &str, actor: &str) -> Result<(), RegistryError> {
        let _w = self.writes.lock().await;
        let ev = AuditEvent::ok(actor, "agent.ban", spiffe_id);
        if let Applied::Agent(a) = self.commit(Write::BanAgent(spiffe_id.into()), ev).await? {
            self.write().agents.insert(a.spiffe_id.clone(), a);
        }
        Ok(())
    }

    /// Removes an agent; it must attest again (with a new token) to come back.
    /// Unconditional: wins over any write in flight. Audited as `actor`.
    pub async fn evict_agent(&self, spiffe_id: &str, actor: &str) -> Result<(), RegistryError> {
        let _w = self.writes.lock().await;
        let ev = AuditEvent::ok(actor, "agent.evict", spiffe_id);
        self.commit(Write::DeleteAgent(spiffe_id.into()), ev)
            .await?;
        self.write().agents.remove(spiffe_id);
        Ok(())
    }
}
