//! The cache manager: keeps entries, SVIDs and the bundle in step with the server, persists
//! them, and publishes snapshots to the Workload API.
//!
//! One loop does everything (SPIRE's manager/sync split, in one task): it wakes at the sync
//! interval (with jitter) or when an SVID is due for rotation, pulls entry changes since its
//! revision, asks for SVIDs in batches of at most 500 CSRs, renews the agent SVID at
//! half-life, and backs off exponentially while the server is unreachable — serving what it
//! holds in the meantime.
//!
//! One module per concern: `sync` (the loop and one round), `renewal` (agent and workload
//! SVIDs), `engines` (Engine JWKS), `incarnations` (reports), `jwt` (the JWT-SVID cache) over
//! `fetches` (single-flight), and [`cache`] (the published snapshot). The state lock is held
//! only to read or apply, never across a server call.

pub mod cache;
mod engines;
mod fetches;
mod incarnations;
mod jwt;
mod renewal;
mod sync;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use continuity_common::Clock;
use continuity_common::lru::Lru;
use tokio::sync::watch;

use self::cache::Snapshot;
use self::fetches::Fetches;
use self::incarnations::IncarnationQueue;
use self::jwt::{CachedJwt, JwtKey, JwtResult};
use crate::client::{ClientError, ServerClient};
use crate::state::{PersistedState, Svid};
use crate::storage::Storage;

pub use self::jwt::{JWT_FETCH_TIMEOUT, JwtFetchError};
pub use self::renewal::MAX_BATCH;
/// The SVID helpers, where they were before they moved to [`crate::svid`].
pub use crate::svid::{SvidError, issued_by_bundle, new_key_and_csr, rotate_at, svid_from_proto};

/// The Agent API client on the authenticated channel.
type AgentApi =
    continuity_proto::agent::agent_api_client::AgentApiClient<tonic::transport::Channel>;
/// The Engine broker client on the authenticated channel.
type Broker =
    continuity_proto::engine::engine_broker_client::EngineBrokerClient<tonic::transport::Channel>;

/// The cache manager.
pub struct Manager {
    client: Arc<ServerClient>,
    storage: Storage,
    clock: Arc<dyn Clock>,
    sync_interval: Duration,
    /// What the agent holds. Locked only briefly, never across a server call.
    state: Mutex<PersistedState>,
    /// Serializes sync rounds; held across server calls, so nothing else may wait on it.
    sync_round: tokio::sync::Mutex<()>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// JWT-SVIDs by (entry, audiences), least recently used dropped first.
    jwts: Arc<Mutex<Lru<JwtKey, CachedJwt>>>,
    /// JWT-SVID fetches in flight (concurrent misses for one key share one).
    jwt_fetches: Fetches<JwtKey, JwtResult>,
    /// The current agent SVID, readable without waiting for a sync in progress.
    agent_svid: std::sync::RwLock<Option<Svid>>,
    /// Incarnations not yet reported, and when each was last reported.
    incarnations: Mutex<IncarnationQueue>,
    /// Whether the last contact with the server succeeded.
    connected: std::sync::atomic::AtomicBool,
    /// Unix seconds of the last successful sync (the manager's creation before the first).
    last_sync: std::sync::atomic::AtomicI64,
    /// Back-off of agent SVID renewals the server could not make.
    renew_retry: Mutex<renewal::RenewalRetry>,
    /// The state changed since it was last published (set by each step that applies a change,
    /// cleared when published).
    unpublished: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

impl Manager {
    /// A manager serving `state` at once (persisted or fresh from attestation).
    pub fn new(
        client: Arc<ServerClient>,
        storage: Storage,
        clock: Arc<dyn Clock>,
        sync_interval: Duration,
        state: PersistedState,
        jwt_cache_size: usize,
    ) -> Arc<Self> {
        client
            .roots()
            .replace(state.bundle.x509_authorities.clone());
        let snap = Arc::new(Snapshot::build(&state, None));
        let (snapshot, _) = watch::channel(snap);
        let agent_svid = std::sync::RwLock::new(state.agent_svid.clone());
        let started = clock.unix();
        let incarnations = Mutex::new(IncarnationQueue::open(storage.path().parent()));
        Arc::new(Self {
            incarnations,
            agent_svid,
            client,
            storage,
            clock,
            sync_interval,
            state: Mutex::new(state),
            sync_round: tokio::sync::Mutex::new(()),
            snapshot,
            jwts: Arc::new(Mutex::new(Lru::new(jwt_cache_size))),
            jwt_fetches: Fetches::default(),
            connected: std::sync::atomic::AtomicBool::new(false),
            last_sync: std::sync::atomic::AtomicI64::new(started),
            renew_retry: Mutex::default(),
            unpublished: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Snapshots as they are published.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// The server in use (None before the addresses first resolved).
    pub fn server(&self) -> Option<std::net::SocketAddr> {
        self.client.server()
    }

    /// How many times the agent moved to another server.
    pub fn server_switches(&self) -> u64 {
        self.client.server_switches()
    }

    /// Whether the last sync reached the server.
    pub fn connected(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Seconds since the last successful sync (since start, before the first one).
    pub fn sync_lag(&self) -> i64 {
        let last = self.last_sync.load(std::sync::atomic::Ordering::Relaxed);
        (self.clock.unix() - last).max(0)
    }

    /// The clock the manager runs on.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The state, locked (poison is ignored: every writer leaves it consistent). Never held
    /// across an `.await`: a plain mutex makes a guard kept over a server call a compile error
    /// in the `Send` sync task.
    fn state(&self) -> std::sync::MutexGuard<'_, PersistedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, st: &PersistedState) {
        // Written in place (the state is borrowed, not copied) on this worker thread, which
        // tokio hands its other tasks to meanwhile.
        if let Err(e) = tokio::task::block_in_place(|| self.storage.save(st)) {
            tracing::error!(error = %e, "cannot persist agent state");
        }
    }

    fn publish(&self, st: &PersistedState) {
        let prev = self.snapshot.borrow().clone();
        self.snapshot
            .send_replace(Arc::new(Snapshot::build(st, Some(&prev))));
    }

    /// The Engine broker, authenticated with the current agent SVID.
    pub async fn broker(&self) -> Result<Broker, ClientError> {
        let svid = self
            .agent_svid
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| ClientError::Protocol("the agent is not attested".into()))?;
        self.client.broker(&svid).await
    }
}
