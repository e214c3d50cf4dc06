//! Persistence: entries, join tokens, attested agents, CA key metadata and bundle sequence.
//!
//! One narrow trait per consumer ([`EntryStore`], [`AgentStore`], [`JoinTokenStore`],
//! [`CaStore`], [`EngineStore`], [`AuditStore`], [`StoreHealth`]) and their union
//! [`DataStore`]; [`SqlDataStore`] implements them over sqlx's `Any` driver so the same SQL
//! serves SQLite (the embedded default) and PostgreSQL. Reads on hot paths never come here:
//! the server keeps an in-memory index updated by its own writes (see `registry`).

use async_trait::async_trait;
use continuity_common::SpiffeId;

use crate::model::engine::{
    Endorsement, Engine, EngineKey, ImportJob, Incarnation, KeyVersion, Secret,
};

mod bad_rows;
mod feed;
mod seal;
mod sql;

pub use crate::entry::{Entry, Tombstone};
pub use bad_rows::{BadRow, BadRows};
pub use feed::{Change, ChangeFeed, ChangeKind, LeaseStore};
pub use seal::{Canon, Failure, RecordSealer};
pub use sql::SqlDataStore;
pub use sql::backup::TableDump;
#[cfg(test)]
pub(crate) use sql::scratch::{Backend, Scratch, on_both_backends};
#[cfg(test)]
pub(crate) use sql::{scratch_sqlite, test_sealer};

/// Datastore failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or a statement failed.
    #[error("datastore: {0}")]
    Database(#[from] sqlx::Error),
    /// A row that should exist does not.
    #[error("{0} not found")]
    NotFound(String),
    /// A stored value could not be decoded (corruption or a newer schema).
    #[error("datastore holds an invalid value: {0}")]
    Corrupt(String),
    /// The database's directory could not be prepared.
    #[error("datastore: {0}")]
    Io(String),
    /// A compare-and-set write found the row changed (or created) since it was read.
    #[error("{0} changed concurrently")]
    Conflict(String),
    /// The audit log could not be appended; the write it belongs to was not applied.
    #[error("audit log could not be written, so the change was not applied: {0}")]
    Audit(String),
    /// A row failed its record MAC (edited, forged, moved under another key, or unsealed):
    /// it is not used, and it is reported.
    #[error(
        "datastore row {key} of {table} failed its integrity check (record MAC); it is not used"
    )]
    Integrity {
        /// The table.
        table: String,
        /// The row's primary key.
        key: String,
    },
    /// The record-MAC key could not compute or check a tag.
    #[error("record MAC key: {0}")]
    MacKey(String),
    /// A schema migration failed.
    #[error("schema migration {version} failed: {source}")]
    Migration {
        /// The migration that failed.
        version: i64,
        /// The database error.
        source: sqlx::Error,
    },
}

/// A join token as stored: only a hash of the secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the token value, hex.
    pub token_hash: String,
    /// Public id used in the agent ID.
    pub id: String,
    /// Optional node alias SPIFFE ID.
    pub alias: Option<SpiffeId>,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
}

/// An attested agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Node attestor type.
    pub attestation_type: String,
    /// Serial of the current agent SVID (hex).
    pub serial: String,
    /// Serial of the previous agent SVID, accepted until the agent reconnects.
    pub previous_serial: String,
    /// Expiry of the current agent SVID.
    pub expires_at: i64,
    /// Banned agents are refused and cannot re-attest.
    pub banned: bool,
    /// Node alias from the join token.
    pub alias: Option<SpiffeId>,
    /// First attestation.
    pub created_at: i64,
    /// Last authenticated call that changed state.
    pub last_seen: i64,
    /// Compare-and-set revision: every write of the record increments it.
    pub revision: i64,
    /// When the current serial was first presented (0: not yet). The previous serial is
    /// accepted until then, plus a short grace.
    pub serial_first_used: i64,
    /// Two lineages of this agent's SVIDs were seen: a superseded SVID was presented.
    pub forked: bool,
    /// When the fork was detected (0: never).
    pub forked_at: i64,
    /// The node selectors of the last attestation (`k8s_psat:cluster:…`; none for join
    /// tokens): node alias entries whose selectors they include authorize this agent.
    pub selectors: Vec<continuity_attestors::Selector>,
}

/// One write of [`DataStore::apply`]; every write of a call commits in one transaction.
#[derive(Debug, Clone)]
pub enum Write {
    /// Inserts an entry; assigns its revision.
    CreateEntry(Entry),
    /// Replaces an entry; assigns a new revision; tombstones the old parent if it changed.
    UpdateEntry(Entry),
    /// Deletes the entry with this id, recording a tombstone.
    DeleteEntry(String),
    /// Stores a new join token.
    CreateJoinToken(JoinToken),
    /// Inserts a new agent (revision 1); [`StoreError::Conflict`] if one exists.
    InsertAgent(AgentRecord),
    /// Replaces an agent if its stored revision is still `revision`; [`StoreError::Conflict`]
    /// otherwise (or if it was deleted).
    UpdateAgent(AgentRecord),
    /// Bans an agent unconditionally (wins over any write in flight).
    BanAgent(String),
    /// Deletes an agent unconditionally; [`StoreError::NotFound`] if absent.
    DeleteAgent(String),
    /// Inserts or replaces an Engine.
    PutEngine(Engine),
    /// Inserts or replaces an Engine key.
    PutEngineKey(EngineKey),
    /// Inserts or replaces a key version.
    PutKeyVersion(KeyVersion),
    /// Inserts a new key version; [`StoreError::Conflict`] if that version exists (another
    /// server rotated the key first).
    InsertKeyVersion(KeyVersion),
    /// Inserts a secret version.
    PutSecret(Secret),
    /// Inserts or replaces the bundle of a foreign trust domain, updated at (Unix seconds).
    PutForeignBundle(crate::trust_bundle::Bundle, i64),
    /// Deletes the bundle of this foreign trust domain; [`StoreError::NotFound`] if absent.
    DeleteForeignBundle(String),
    /// Inserts or replaces a federation relationship, updated at (Unix seconds).
    PutRelationship(crate::trust_bundle::Relationship, i64),
    /// Deletes the relationship with this trust domain; [`StoreError::NotFound`] if absent.
    DeleteRelationship(String),
    /// Inserts the endorsement of a new key version; [`StoreError::Conflict`] if it exists.
    InsertEndorsement(Endorsement),
    /// Inserts or replaces an import job.
    PutImportJob(ImportJob),
}

/// What one [`Write`] committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The entry as stored (for a delete: the removed entry) and its tombstone, if any.
    Entry(Entry, Option<Tombstone>),
    /// The agent as stored, with its new revision.
    Agent(AgentRecord),
    /// Nothing to report.
    Done,
}

/// What a CA key is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyPurpose {
    /// Signs X509-SVIDs.
    X509,
    /// Signs JWT-SVIDs.
    Jwt,
}

/// Where a CA key is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CaKeyState {
    /// Published in the bundle, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// No longer signing; public part kept in the bundle until it expires.
    Retired,
    /// Retired and marked compromised by an operator: still in the bundle (until revoked), and
    /// every agent replaces what it signed.
    Tainted,
}

impl CaKeyState {
    /// Whether the key no longer signs (retired or tainted): its public part only verifies.
    pub fn is_old(self) -> bool {
        matches!(self, Self::Retired | Self::Tainted)
    }
}

/// Metadata of a CA or JWT key (the private part lives in the key manager).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaKeyRecord {
    /// Key manager id.
    pub key_id: String,
    /// X509 or JWT.
    pub purpose: KeyPurpose,
    /// Lifecycle state.
    pub state: CaKeyState,
    /// Key type spelling (ec-p256, ...).
    pub key_type: String,
    /// Self-signed CA certificate (X509 keys), DER.
    pub cert_der: Vec<u8>,
    /// SubjectPublicKeyInfo, DER.
    pub public_key: Vec<u8>,
    /// JWT `kid` (JWT keys).
    pub kid: String,
    /// Validity start, Unix seconds.
    pub not_before: i64,
    /// Validity end, Unix seconds.
    pub not_after: i64,
}

/// One record of the append-only, hash-chained audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// 1, 2, 3, ... without gaps.
    pub seq: i64,
    /// Unix seconds.
    pub time: i64,
    /// Who (admin uid, agent + workload, scheduler).
    pub actor: String,
    /// What (engine.create, key.sign, ...).
    pub action: String,
    /// On what (engine/key).
    pub target: String,
    /// Key version involved (0 = none).
    pub key_version: u32,
    /// ok, or the refusal.
    pub result: String,
    /// Hash of the previous record (hex; empty for the first).
    pub prev_hash: String,
    /// HMAC-SHA256 (the `audit-mac` key) over this record's canonical encoding, `prev_hash`
    /// included (hex); records written before the keyed chain carry plain SHA-256.
    pub hash: String,
}

/// Registration entries, their tombstones and the entry revision (the registry's and the admin
/// API's view).
#[async_trait]
pub trait EntryStore: Send + Sync + std::fmt::Debug {
    /// Inserts an entry; assigns its revision. Returns the stored entry.
    async fn create_entry(&self, entry: Entry) -> Result<Entry, StoreError>;
    /// Replaces an entry; assigns a new revision; records a tombstone if the parent changed.
    async fn update_entry(&self, entry: Entry) -> Result<(Entry, Option<Tombstone>), StoreError>;
    /// Deletes an entry, recording a tombstone.
    async fn delete_entry(&self, id: &str) -> Result<(Entry, Tombstone), StoreError>;
    /// Every entry.
    async fn list_entries(&self) -> Result<Vec<Entry>, StoreError>;
    /// Every tombstone.
    async fn list_tombstones(&self) -> Result<Vec<Tombstone>, StoreError>;
    /// The current entry revision.
    async fn entry_revision(&self) -> Result<i64, StoreError>;
    /// Entries whose revision is in `(after, upto]`, by revision (the change feed's catch-up).
    async fn entries_between(&self, after: i64, upto: i64) -> Result<Vec<Entry>, StoreError>;
    /// Tombstones whose revision is in `(after, upto]`, by revision.
    async fn tombstones_between(&self, after: i64, upto: i64)
    -> Result<Vec<Tombstone>, StoreError>;
}

/// Attested agents (the registry's view; writes go through [`AuditStore::apply`]).
#[async_trait]
pub trait AgentStore: Send + Sync + std::fmt::Debug {
    /// One agent, read from the database (not a cache).
    async fn get_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>, StoreError>;
    /// Every agent.
    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
}

/// Join tokens (node attestation and the pruning task).
#[async_trait]
pub trait JoinTokenStore: Send + Sync + std::fmt::Debug {
    /// Stores a new join token.
    async fn create_join_token(&self, token: JoinToken) -> Result<(), StoreError>;
    /// Atomically removes and returns the token with this hash (at most one caller gets it).
    async fn take_join_token(&self, token_hash: &str) -> Result<Option<JoinToken>, StoreError>;
    /// Removes tokens that expired before `now`.
    async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError>;
}

/// The CA's journal of key metadata and the bundle sequence number.
#[async_trait]
pub trait CaStore: Send + Sync + std::fmt::Debug {
    /// Inserts or replaces CA key metadata.
    async fn put_ca_key(&self, key: &CaKeyRecord) -> Result<(), StoreError>;
    /// Deletes CA key metadata.
    async fn delete_ca_key(&self, key_id: &str) -> Result<(), StoreError>;
    /// Every CA key record.
    async fn list_ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError>;
    /// Increments and returns the bundle sequence number.
    async fn next_bundle_sequence(&self) -> Result<u64, StoreError>;
    /// The current bundle sequence number.
    async fn bundle_sequence(&self) -> Result<u64, StoreError>;
}

/// Engines, their keys, key versions (with encryption reservations), secrets and incarnations.
#[async_trait]
pub trait EngineStore: Send + Sync + std::fmt::Debug {
    /// Inserts or replaces an Engine.
    async fn put_engine(&self, engine: &Engine) -> Result<(), StoreError>;
    /// Every Engine.
    async fn list_engines(&self) -> Result<Vec<Engine>, StoreError>;
    /// Inserts or replaces an Engine key.
    async fn put_engine_key(&self, key: &EngineKey) -> Result<(), StoreError>;
    /// Every Engine key.
    async fn list_engine_keys(&self) -> Result<Vec<EngineKey>, StoreError>;
    /// Inserts or replaces a key version.
    async fn put_key_version(&self, version: &KeyVersion) -> Result<(), StoreError>;
    /// Every key version.
    async fn list_key_versions(&self) -> Result<Vec<KeyVersion>, StoreError>;
    /// Adds `block` to a key version's reserved encryption count (its AES-GCM nonce budget)
    /// and returns the new total; committed before any of the block is used.
    async fn reserve_encryptions(
        &self,
        engine: &str,
        key: &str,
        version: u32,
        block: u64,
    ) -> Result<u64, StoreError>;
    /// Inserts a secret version.
    async fn put_secret(&self, secret: &Secret) -> Result<(), StoreError>;
    /// Every secret version.
    async fn list_secrets(&self) -> Result<Vec<Secret>, StoreError>;
    /// Records an incarnation, keeping its first_seen.
    async fn upsert_incarnation(&self, inc: &Incarnation) -> Result<(), StoreError>;
    /// Incarnations of an Engine, oldest first.
    async fn list_incarnations(&self, engine: &str) -> Result<Vec<Incarnation>, StoreError>;
    /// Every endorsement (continuity proof) of a key version.
    async fn list_endorsements(&self) -> Result<Vec<Endorsement>, StoreError>;
    /// The import job with this id, checked against its record MAC.
    async fn get_import_job(&self, id: &str) -> Result<Option<ImportJob>, StoreError>;
    /// Every intact import job, oldest first.
    async fn list_import_jobs(&self) -> Result<Vec<ImportJob>, StoreError>;
}

/// The last record of the audit log as the datastore holds it (seq 0 and an empty hash: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditHead {
    /// `seq` of the last appended record.
    pub seq: i64,
    /// Its hash.
    pub hash: String,
}

/// Numbers new audit records after the head and links them onto the chain; called by the
/// datastore inside the append transaction, once the head is read and locked.
pub trait AuditLinker: Send + Sync {
    /// Sets `seq`, `prev_hash` and `hash` of each of `records`, in order, after `head`.
    fn link(&self, head: &AuditHead, records: &mut [AuditRecord]) -> Result<(), StoreError>;
}

/// The audit log and the audited transaction every state change goes through.
///
/// Sequence numbers come from the datastore: an append reads the head (seq, hash) in its own
/// write transaction (SQLite: the write lock is taken first; PostgreSQL: `SELECT … FOR UPDATE`
/// on the head row), links its records with the [`AuditLinker`] and writes them and the new
/// head before it commits, so several servers can share one log.
#[async_trait]
pub trait AuditStore: Send + Sync + std::fmt::Debug {
    /// Applies `writes` and appends `audit`, linked after the head by `link`, in one
    /// transaction: all or none. A failed audit append is [`StoreError::Audit`]. On success
    /// `audit` holds the records as written.
    async fn apply(
        &self,
        writes: &[Write],
        audit: &mut [AuditRecord],
        link: &dyn AuditLinker,
    ) -> Result<Vec<Applied>, StoreError>;
    /// Appends audit records, linked after the head by `link`, in one transaction.
    async fn append_audit_batch(
        &self,
        records: &mut [AuditRecord],
        link: &dyn AuditLinker,
    ) -> Result<(), StoreError>;
    /// The audit log in `seq` order.
    async fn list_audit(&self) -> Result<Vec<AuditRecord>, StoreError>;
    /// The head, kept apart from the log so a deleted tail shows.
    async fn audit_head(&self) -> Result<AuditHead, StoreError>;
}

/// What a full integrity check of the MACed tables found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntegrityReport {
    /// Rows checked.
    pub rows: u64,
    /// Rows that failed, ordered by table and key.
    pub bad: Vec<BadRow>,
}

/// Record MACs: the known bad rows, the full re-check, and what the upgrade sealed.
#[async_trait]
pub trait IntegrityStore: Send + Sync + std::fmt::Debug {
    /// The shared set of rows known to have failed their check.
    fn bad_rows(&self) -> std::sync::Arc<BadRows>;
    /// Re-reads every MACed table and checks every row (the set of known bad rows is
    /// replaced by what this finds).
    async fn verify_integrity(&self) -> Result<IntegrityReport, StoreError>;
    /// Rows sealed by the upgrade to record MACs when this store was opened (None: no
    /// upgrade happened now).
    fn upgraded_rows(&self) -> Option<u64>;
}

/// The trust bundles of other trust domains (federation).
#[async_trait]
pub trait ForeignBundleStore: Send + Sync + std::fmt::Debug {
    /// Every foreign bundle whose row is intact, by trust domain.
    async fn list_foreign_bundles(&self) -> Result<Vec<crate::trust_bundle::Bundle>, StoreError>;
}

/// What an agent last reported serving: the authorities that signed what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingReport {
    /// The agent's SPIFFE ID.
    pub agent_id: String,
    /// The bundle sequence the agent held when it reported.
    pub bundle_sequence: i64,
    /// Authority IDs (SKI hex) of the CAs that signed its X509-SVIDs, sorted, unique.
    pub x509_authorities: Vec<String>,
    /// kids of its cached JWT-SVIDs, sorted, unique.
    pub jwt_authorities: Vec<String>,
    /// When the report was first made in this form (Unix seconds).
    pub reported_at: i64,
}

/// The agents' serving reports (a revoke waits until no live agent serves the key).
#[async_trait]
pub trait ServingStore: Send + Sync + std::fmt::Debug {
    /// Inserts or replaces the report of its agent.
    async fn put_serving_report(&self, report: &ServingReport) -> Result<(), StoreError>;
    /// Every report whose row is intact.
    async fn list_serving_reports(&self) -> Result<Vec<ServingReport>, StoreError>;
}

/// Federation relationships (each foreign trust domain's bundle endpoint).
#[async_trait]
pub trait RelationshipStore: Send + Sync + std::fmt::Debug {
    /// Every relationship whose row is intact, by trust domain.
    async fn list_relationships(
        &self,
    ) -> Result<Vec<crate::trust_bundle::Relationship>, StoreError>;
}

/// Whether the datastore answers (the health endpoint's readiness).
#[async_trait]
pub trait StoreHealth: Send + Sync + std::fmt::Debug {
    /// Cheap liveness query.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// The whole persistence interface of the server: every narrow store at once. Code holding an
/// `Arc<dyn DataStore>` hands each consumer the narrow trait object it needs (trait upcasting).
pub trait DataStore:
    EntryStore
    + AgentStore
    + JoinTokenStore
    + CaStore
    + EngineStore
    + AuditStore
    + StoreHealth
    + IntegrityStore
    + ChangeFeed
    + LeaseStore
    + ForeignBundleStore
    + ServingStore
    + RelationshipStore
{
}

impl<T> DataStore for T where
    T: EntryStore
        + AgentStore
        + JoinTokenStore
        + CaStore
        + EngineStore
        + AuditStore
        + StoreHealth
        + IntegrityStore
        + ChangeFeed
        + LeaseStore
        + ForeignBundleStore
        + ServingStore
        + RelationshipStore
        + ?Sized
{
}
