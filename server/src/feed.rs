//! The change feed's follower: what other servers on the same datastore write reaches this
//! server's in-memory state (entries and agents, Engines and their keys, the CA) within one
//! poll interval.
//!
//! The follower polls the datastore's numbered changes after the last one it applied (one
//! small indexed query, jittered around `[cluster] poll_interval`; an unchanged datastore costs
//! nothing more) and, on PostgreSQL, also wakes on `LISTEN continuity_changes` (the poll
//! catches a missed notification). Each change only names what to read again; the rows are
//! read through the datastore's checked reads, so one whose record MAC fails is reported and
//! never applied. Its own changes are skipped (its writes already updated its memory). A gap
//! in the numbers (changes pruned before this server read them) makes it read everything
//! again.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::ca::CaManager;
use crate::datastore::{ChangeFeed, ChangeKind, StoreError};
use crate::engines::Engines;
use crate::registry::{Registry, RegistryError};

/// Changes read per query; more are read at once after.
const BATCH: i64 = 1000;

/// Changes kept in the datastore behind the newest: a server further behind reads everything.
const RETAINED: i64 = 10_000;

/// How often a follower prunes old changes.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Why applying a batch of changes failed (it is retried at the next poll).
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The entry and agent index could not follow.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Engines could not be read again.
    #[error(transparent)]
    Engines(#[from] crate::engines::EngineError),
    /// The CA could not be read again.
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
}

/// What a batch of changes asks to read again.
#[derive(Debug, Default)]
struct Pending {
    entries: bool,
    agents: BTreeSet<String>,
    engines: bool,
    ca: bool,
    bundles: bool,
}

/// The in-memory state the feed keeps up to date.
#[derive(Clone)]
pub struct Followers {
    /// Entries and agents.
    pub registry: Arc<Registry>,
    /// Engines, keys and versions.
    pub engines: Arc<Engines>,
    /// The CA's signers and bundle.
    pub ca: Arc<CaManager>,
    /// Foreign trust bundles.
    pub federation: Arc<crate::federation::Federation>,
}

/// The follower of the change feed.
pub struct Feed {
    store: Arc<dyn ChangeFeed>,
    follow: Followers,
    poll: Duration,
    cursor: i64,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("poll", &self.poll)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

impl Feed {
    /// A follower of `store` from change `cursor` (read before the state in `follow` was
    /// loaded, so nothing committed meanwhile is missed), polling every `poll`.
    pub fn new(store: Arc<dyn ChangeFeed>, follow: Followers, poll: Duration, cursor: i64) -> Self {
        Self {
            store,
            follow,
            poll,
            cursor,
        }
    }

    /// Runs the follower for as long as the returned task lives.
    pub fn spawn(mut self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut wake = match self.store.wake_ups().await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "change feed: LISTEN is unavailable; polling only");
                    None
                }
            };
            let mut pruned = tokio::time::Instant::now();
            loop {
                let pause = crate::scheduler::jittered(
                    self.poll,
                    0.2,
                    continuity_common::rand::jitter_fraction(),
                );
                match &mut wake {
                    Some(rx) => {
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            got = rx.recv() => if got.is_none() { wake = None },
                        }
                    }
                    None => tokio::time::sleep(pause).await,
                }
                if let Err(e) = self.step().await {
                    tracing::warn!(error = %e, "change feed: could not apply other servers' changes; retrying");
                }
                if pruned.elapsed() >= PRUNE_EVERY {
                    pruned = tokio::time::Instant::now();
                    if let Err(e) = self.store.prune_changes(self.cursor - RETAINED).await {
                        tracing::warn!(error = %e, "change feed: pruning old changes failed");
                    }
                }
            }
        })
    }

    /// Reads and applies every change after the cursor; returns how many were read.
    pub async fn step(&mut self) -> Result<usize, FeedError> {
        let mut total = 0;
        loop {
            let changes = self.store.changes_since(self.cursor, BATCH).await?;
            let Some(last) = changes.last().map(|c| c.seq) else {
                return Ok(total);
            };
            total += changes.len();
            if changes[0].seq != self.cursor + 1 {
                tracing::warn!(
                    from = self.cursor,
                    to = changes[0].seq,
                    "change feed: changes were pruned before this server read them; reading everything again"
                );
                self.reload_all().await?;
            } else {
                let mut p = Pending::default();
                let own = self.store.origin().to_string();
                for c in changes.iter().filter(|c| c.origin != own) {
                    match c.kind {
                        Some(ChangeKind::Entry) => p.entries = true,
                        Some(ChangeKind::Agent) => {
                            p.agents.insert(c.key.clone());
                        }
                        Some(ChangeKind::Engine) => p.engines = true,
                        Some(ChangeKind::Ca) => p.ca = true,
                        Some(ChangeKind::ForeignBundle) => p.bundles = true,
                        None => {}
                    }
                }
                self.apply(p).await?;
            }
            self.cursor = last;
            if changes.len() < BATCH as usize {
                return Ok(total);
            }
        }
    }

    async fn apply(&self, p: Pending) -> Result<(), FeedError> {
        let f = &self.follow;
        if p.entries {
            f.registry.catch_up_entries().await?;
        }
        for a in &p.agents {
            match f.registry.reload_agent(a).await {
                // Reported by the datastore; reading it again cannot help.
                Err(RegistryError::Store(StoreError::Integrity { table, key })) => {
                    tracing::error!(%table, %key, "change feed: a changed row failed its integrity check; not applied");
                }
                r => r?,
            }
        }
        if p.engines {
            f.engines.reload().await?;
        }
        if p.ca && f.ca.reload().await? {
            tracing::info!("CA bundle changed through another server");
        }
        if p.bundles && f.federation.reload().await? {
            tracing::info!("foreign bundles changed through another server");
        }
        Ok(())
    }

    async fn reload_all(&self) -> Result<(), FeedError> {
        let f = &self.follow;
        f.registry.reload_all().await?;
        f.engines.reload().await?;
        f.ca.reload().await?;
        f.federation.reload().await?;
        Ok(())
    }
}
