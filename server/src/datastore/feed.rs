//! What several servers sharing one datastore need from it: a change feed (every write
//! appends a numbered change in its own transaction, so another server can tell what to read
//! again) and leases (one server at a time does the clock-driven work: CA rotation, Engine key
//! lifecycle).
//!
//! A change row only says *what* to read again (a kind and a key); it carries no data. The
//! server then reads the row itself, which is checked with its record MAC like every read, so
//! a forged or edited change row can at worst cause a harmless re-read.

use async_trait::async_trait;

use super::StoreError;

/// What a change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// A registration entry (the key is its id): read entries and tombstones by revision.
    Entry,
    /// An agent record (the key is its SPIFFE ID): read the agent again.
    Agent,
    /// An Engine, key, version or secret (the key is the Engine's name).
    Engine,
    /// The CA journal or the bundle sequence (the key is the CA key id, or `bundle`).
    Ca,
    /// A foreign trust bundle (the key is its trust domain).
    ForeignBundle,
}

impl ChangeKind {
    /// The spelling stored in the `changes` table.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Entry => "entry",
            Self::Agent => "agent",
            Self::Engine => "engine",
            Self::Ca => "ca",
            Self::ForeignBundle => "foreign_bundle",
        }
    }

    /// Parses the stored spelling; `None` for anything else (a row from a newer server, or
    /// written by someone else: skipped, never trusted).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "entry" => Self::Entry,
            "agent" => Self::Agent,
            "engine" => Self::Engine,
            "ca" => Self::Ca,
            "foreign_bundle" => Self::ForeignBundle,
            _ => return None,
        })
    }
}

/// One numbered change: `seq` is 1, 2, 3, ... in commit order, without gaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Position in the feed.
    pub seq: i64,
    /// What changed (None: a kind this server does not know).
    pub kind: Option<ChangeKind>,
    /// Which one.
    pub key: String,
    /// The [`ChangeFeed::origin`] of the server that wrote it.
    pub origin: String,
}

/// The change feed: numbered changes appended by every write, read by the other servers.
#[async_trait]
pub trait ChangeFeed: Send + Sync + std::fmt::Debug {
    /// This process's origin tag, written with each of its changes (so it can skip its own).
    fn origin(&self) -> &str;
    /// The number of the last change committed (0: none yet).
    async fn change_head(&self) -> Result<i64, StoreError>;
    /// Up to `limit` changes after `seq`, in order. One small indexed query: an unchanged
    /// datastore answers nothing.
    async fn changes_since(&self, seq: i64, limit: i64) -> Result<Vec<Change>, StoreError>;
    /// Removes changes numbered below `seq`; returns how many.
    async fn prune_changes(&self, seq: i64) -> Result<u64, StoreError>;
    /// A stream of wake-ups sent when another server commits a change (PostgreSQL
    /// LISTEN/NOTIFY), or `None` where the datastore has no such thing (SQLite): the poll then
    /// does all the work. A wake-up is only a hint; the poll catches a missed one.
    async fn wake_ups(&self) -> Result<Option<tokio::sync::mpsc::Receiver<()>>, StoreError>;
}

/// Leases: a named row held by one holder until it expires, taken with a compare-and-set.
#[async_trait]
pub trait LeaseStore: Send + Sync + std::fmt::Debug {
    /// Takes or renews the lease `name` for `holder` until `now + ttl_secs` if it is free,
    /// expired, or already `holder`'s; returns whether `holder` now holds it.
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        ttl_secs: i64,
    ) -> Result<bool, StoreError>;
    /// Gives the lease up if `holder` holds it (a clean shutdown hands over at once).
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;
}
