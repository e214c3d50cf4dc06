//! The cache manager: keeps entries, SVIDs and the bundle in step with the server, persists
//! them, and publishes snapshots to the Workload API.
//!
//! One loop does everything (SPIRE's manager/sync split, in one task): it wakes at the sync
//! interval (with jitter) or when an SVID is due for rotation, pulls entry changes since its
//! revision, asks for SVIDs in batches of at most 500 CSRs, renews the agent SVID at
//! half-life, and backs off exponentially while the server is unreachable — serving what it
//! holds in the meantime.

pub mod cache;

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use continuity_common::Clock;
use continuity_common::secret::SecretBytes;
use continuity_proto::agent::{
    BatchNewX509svidRequest, FetchBundleRequest, NewJwtsvidRequest, NewX509svidParams,
    RenewAgentRequest, SyncAuthorizedEntriesRequest,
};
use tokio::sync::watch;

use self::cache::{Entry, PersistedState, Snapshot, Svid};
use crate::client::{ClientError, ServerClient};
use crate::limits::RateLimited;
use crate::storage::Storage;
use continuity_common::lru::Lru;

/// The Agent API client on the authenticated channel.
type AgentApi =
    continuity_proto::agent::agent_api_client::AgentApiClient<tonic::transport::Channel>;
/// The Engine broker client on the authenticated channel.
type Broker =
    continuity_proto::engine::engine_broker_client::EngineBrokerClient<tonic::transport::Channel>;

/// Longest a JWT-SVID fetch from the server may take (connecting included).
pub const JWT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Most CSRs sent in one batch (the server's limit).
pub const MAX_BATCH: usize = 500;

/// A fresh P-256 key (PKCS#8, held as a secret from the start) and a CSR for it.
pub fn new_key_and_csr() -> Result<(SecretBytes, Vec<u8>), String> {
    let kp = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&kp).map_err(|e| e.to_string())?;
    Ok((SecretBytes::new(kp.serialize_der()), csr.der().to_vec()))
}

fn now_unix() -> i64 {
    continuity_common::clock::unix_seconds(std::time::SystemTime::now())
}

/// A random fraction in [0, 1) (spreads rotations; not a secret).
fn jitter() -> f64 {
    continuity_common::rand::jitter_fraction()
}

/// When to rotate an SVID valid from `issued` to `expires`: at half-life, minus up to 10% of
/// the lifetime of jitter so a node's SVIDs do not all renew in the same instant.
/// `expires` comes from the server: the arithmetic saturates instead of overflowing.
pub fn rotate_at(issued: i64, expires: i64) -> i64 {
    let life = expires.saturating_sub(issued).max(1) as f64;
    issued.saturating_add((life * (0.5 - 0.1 * jitter())) as i64)
}

/// Why an X509-SVID from the server is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// The certificate chain is empty.
    #[error("the server sent an X509-SVID with no certificate")]
    EmptyChain,
    /// The leaf certificate does not parse as X.509.
    #[error("the server sent an X509-SVID whose leaf is not a certificate: {0}")]
    BadLeaf(String),
}

/// Builds an [`Svid`] from the server's answer and the key we generated; refuses an answer
/// without a parsable leaf certificate (everything downstream takes the leaf as given).
pub fn svid_from_proto(
    s: continuity_proto::types::X509svid,
    key: SecretBytes,
) -> Result<Svid, SvidError> {
    let leaf = s.cert_chain.first().ok_or(SvidError::EmptyChain)?;
    x509_parser::parse_x509_certificate(leaf).map_err(|e| SvidError::BadLeaf(e.to_string()))?;
    let issued = now_unix();
    Ok(Svid {
        rotate_at: rotate_at(issued, s.expires_at),
        chain: s.cert_chain.into_iter().map(bytes::Bytes::from).collect(),
        key,
        expires_at: s.expires_at,
        issued_at: issued,
    })
}

/// Incarnations waiting to be reported, and when each workload was last reported.
#[derive(Debug, Default)]
struct IncarnationQueue {
    pending: Vec<continuity_proto::engine::Incarnation>,
    last: HashMap<(String, String), i64>,
}

/// A cached JWT-SVID (a bearer token: redacted in `Debug`).
#[derive(Clone)]
struct CachedJwt {
    token: String,
    issued_at: i64,
    expires_at: i64,
}

impl std::fmt::Debug for CachedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedJwt")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Why a JWT-SVID could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JwtFetchError {
    /// The server refused, or could not be reached.
    #[error(transparent)]
    Server(Arc<ClientError>),
    /// No agent SVID to call the server with.
    #[error("the agent is not attested")]
    NotAttested,
    /// The caller's rate limit for calls reaching the server is used up.
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    /// The fetch task died (a bug); the next call tries again.
    #[error("the JWT-SVID fetch failed: {0}")]
    Failed(String),
}

/// The JWT-SVID cache key: entry id and sorted, deduplicated audiences.
type JwtKey = (String, Vec<String>);
/// The outcome of one JWT-SVID fetch, shared by every caller that waited on it.
type JwtResult = Result<CachedJwt, JwtFetchError>;
/// A spawned fetch any number of callers can await; none of them can cancel it.
type SharedFetch<T> = futures_util::future::Shared<futures_util::future::BoxFuture<'static, T>>;

/// Fetches in flight, by key: concurrent misses for one key share one spawned fetch. An entry
/// lives while someone waits on it. Invariant: an entry's `shares` is the number of live
/// [`FetchShare`]s made for it, counted and discounted only under the lock.
struct Fetches<K, T: Clone> {
    map: Mutex<FetchMap<K, T>>,
}

struct FetchMap<K, T: Clone> {
    next_id: u64,
    entries: HashMap<K, FetchEntry<T>>,
}

struct FetchEntry<T: Clone> {
    id: u64,
    shares: usize,
    fetch: SharedFetch<T>,
}

impl<K, T: Clone> Default for Fetches<K, T> {
    fn default() -> Self {
        Self {
            map: Mutex::new(FetchMap {
                next_id: 0,
                entries: HashMap::new(),
            }),
        }
    }
}

impl<K, T: Clone> std::fmt::Debug for Fetches<K, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetches").finish_non_exhaustive()
    }
}

/// A waiter's share of a fetch in flight; the last one out removes it.
struct FetchShare<'a, K: Hash + Eq, T: Clone> {
    fetches: &'a Fetches<K, T>,
    key: K,
    id: u64,
    fetch: SharedFetch<T>,
}

impl<K: Hash + Eq, T: Clone> FetchShare<'_, K, T> {
    /// The fetch's result (cancelling this wait leaves the fetch running for the others).
    async fn wait(&self) -> T {
        self.fetch.clone().await
    }
}

impl<K: Hash + Eq, T: Clone> Drop for FetchShare<'_, K, T> {
    fn drop(&mut self) {
        let mut map = self.fetches.lock();
        if let Some(e) = map.entries.get_mut(&self.key)
            && e.id == self.id
        {
            e.shares = e.shares.saturating_sub(1);
            if e.shares == 0 {
                map.entries.remove(&self.key);
            }
        }
    }
}

impl<K, T: Clone> Fetches<K, T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, FetchMap<K, T>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K: Hash + Eq + Clone, T: Clone + Send + Sync + 'static> Fetches<K, T> {
    /// Joins the fetch in flight for `key`, or, if `admit` allows, spawns `start()` as a new
    /// one (a finished fetch counts as none: its result is in the cache or was an error).
    fn join<E, F>(
        &self,
        key: &K,
        admit: impl FnOnce() -> Result<(), E>,
        start: impl FnOnce() -> F,
        panicked: fn(tokio::task::JoinError) -> T,
    ) -> Result<FetchShare<'_, K, T>, E>
    where
        F: std::future::Future<Output = T> + Send + 'static,
    {
        use futures_util::FutureExt;
        let mut map = self.lock();
        if let Some(e) = map.entries.get_mut(key)
            && e.fetch.peek().is_none()
        {
            e.shares += 1;
            return Ok(FetchShare {
                fetches: self,
                key: key.clone(),
                id: e.id,
                fetch: e.fetch.clone(),
            });
        }
        admit()?;
        let task = tokio::spawn(start());
        let fetch = async move { task.await.unwrap_or_else(panicked) }
            .boxed()
            .shared();
        let id = map.next_id;
        map.next_id += 1;
        map.entries.insert(
            key.clone(),
            FetchEntry {
                id,
                shares: 1,
                fetch: fetch.clone(),
            },
        );
        Ok(FetchShare {
            fetches: self,
            key: key.clone(),
            id,
            fetch,
        })
    }

    /// Keys with a fetch in flight or waited on.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

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
        Arc::new(Self {
            incarnations: Mutex::default(),
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

    /// Whether the last sync reached the server.
    pub fn connected(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs the sync loop forever.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let wait = match self.sync_once().await {
                Ok(()) => {
                    self.connected
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    backoff = Duration::from_millis(500);
                    self.next_wake()
                }
                Err(e) => {
                    self.connected
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    if e.status().is_none() {
                        self.client.reset();
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "sync with the server failed; serving from cache");
                    let wait = backoff.mul_f64(0.75 + 0.5 * jitter());
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    wait.min(self.next_wake())
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// The state, locked (poison is ignored: every writer leaves it consistent). Never held
    /// across an `.await`: a plain mutex makes a guard kept over a server call a compile error
    /// in the `Send` sync task.
    fn state(&self) -> std::sync::MutexGuard<'_, PersistedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Time until the next sync or rotation is due.
    fn next_wake(&self) -> Duration {
        let now_ms = self
            .clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let interval = self.sync_interval.mul_f64(0.9 + 0.2 * jitter());
        let next_rotation = {
            let st = self.state();
            st.svids
                .values()
                .chain(st.agent_svid.iter())
                .map(|s| s.rotate_at)
                .min()
        };
        match next_rotation {
            Some(at) => {
                // `at` may come from the state file: saturate, never overflow.
                let until = Duration::from_millis(
                    at.saturating_mul(1000).saturating_sub(now_ms).max(50) as u64,
                );
                interval.min(until)
            }
            None => interval,
        }
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

    /// One round with the server. Each step reads what it needs under a short lock, calls the
    /// server with the lock released, and applies the answer under a short lock; rounds are
    /// serialized by their own mutex, which nothing on the Workload API path takes.
    pub async fn sync_once(&self) -> Result<(), ClientError> {
        let _round = self.sync_round.lock().await;
        let agent_svid = self
            .state()
            .agent_svid
            .clone()
            .ok_or_else(|| ClientError::Protocol("no agent SVID".into()))?;
        let mut api = self.client.api(&agent_svid).await?;
        let now = self.clock.unix();
        let current = if now >= agent_svid.rotate_at {
            let svid = self.renew_agent(&mut api).await?;
            api = self.client.api(&svid).await?;
            svid
        } else {
            agent_svid
        };
        let mut changed = self.sync_bundle(&mut api).await?;
        changed |= self.sync_entries(&mut api).await?;
        let bundle_changed = changed;
        changed |= self.refresh_svids(&mut api, now, bundle_changed).await?;
        // Engine JWKS and incarnation reports: a failure here must not lose the SVIDs above.
        changed |= self.sync_engines(&current).await;
        if changed {
            let st = self.state();
            self.publish(&st);
            self.save(&st);
        }
        Ok(())
    }

    /// Renews the agent SVID, persists it, and returns it.
    async fn renew_agent(&self, api: &mut AgentApi) -> Result<Svid, ClientError> {
        let (key, csr) = tokio::task::spawn_blocking(new_key_and_csr)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .map_err(ClientError::Protocol)?;
        let r = api
            .renew_agent(RenewAgentRequest { csr })
            .await?
            .into_inner();
        let svid = r
            .svid
            .ok_or_else(|| ClientError::Protocol("no SVID in RenewAgent".into()))?;
        let svid = svid_from_proto(svid, key).map_err(|e| ClientError::Protocol(e.to_string()))?;
        *self.agent_svid.write().unwrap_or_else(|e| e.into_inner()) = Some(svid.clone());
        {
            let mut st = self.state();
            st.agent_svid = Some(svid.clone());
            self.save(&st);
        }
        tracing::info!("agent SVID renewed");
        Ok(svid)
    }

    /// Fetches the bundle; true if it changed.
    async fn sync_bundle(&self, api: &mut AgentApi) -> Result<bool, ClientError> {
        let bundle = api
            .fetch_bundle(FetchBundleRequest {})
            .await?
            .into_inner()
            .bundle;
        let Some(b) = bundle else {
            return Ok(false);
        };
        let mut st = self.state();
        if b.sequence_number == st.bundle.sequence {
            return Ok(false);
        }
        st.bundle = b.into();
        self.client
            .roots()
            .replace(st.bundle.x509_authorities.clone());
        tracing::info!(sequence = st.bundle.sequence, "bundle updated");
        Ok(true)
    }

    /// Pulls entry changes since the revision held; true if the entries changed.
    async fn sync_entries(&self, api: &mut AgentApi) -> Result<bool, ClientError> {
        let since_revision = self.state().revision;
        let sync = api
            .sync_authorized_entries(SyncAuthorizedEntriesRequest { since_revision })
            .await?
            .into_inner();
        let mut st = self.state();
        let mut changed = false;
        if sync.full {
            let keep: std::collections::HashSet<&str> =
                sync.entries.iter().map(|e| e.id.as_str()).collect();
            let before = st.entries.len();
            st.entries.retain(|id, _| keep.contains(id.as_str()));
            changed |= st.entries.len() != before;
        }
        for id in &sync.removed_entry_ids {
            changed |= st.entries.remove(id).is_some();
        }
        for e in sync.entries {
            let e = Entry::from(e);
            if st.entries.get(&e.id) != Some(&e) {
                // A changed entry (new SPIFFE ID, TTL...) needs a new SVID.
                st.svids.remove(&e.id);
                st.entries.insert(e.id.clone(), e);
                changed = true;
            }
        }
        st.revision = sync.revision;
        let st = &mut *st;
        let before = st.svids.len();
        st.svids.retain(|id, _| st.entries.contains_key(id));
        changed |= st.svids.len() != before;
        Ok(changed)
    }

    /// Entries without an SVID, due for rotation, or signed by a CA that left the bundle.
    fn due_svids(&self, now: i64, bundle_changed: bool) -> Vec<String> {
        let st = self.state();
        st.entries
            .keys()
            .filter(|id| match st.svids.get(*id) {
                None => true,
                Some(s) => {
                    now >= s.rotate_at
                        || (bundle_changed
                            && !issued_by_bundle(&s.chain, &st.bundle.x509_authorities))
                }
            })
            .cloned()
            .collect()
    }

    /// Signs new SVIDs for the entries that are due; true if any arrived.
    async fn refresh_svids(
        &self,
        api: &mut AgentApi,
        now: i64,
        bundle_changed: bool,
    ) -> Result<bool, ClientError> {
        let due = self.due_svids(now, bundle_changed);
        let mut changed = false;
        for chunk in due.chunks(MAX_BATCH) {
            let ids = chunk.to_vec();
            let keys = tokio::task::spawn_blocking(move || {
                ids.into_iter()
                    .map(|id| new_key_and_csr().map(|(k, c)| (id, k, c)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .map_err(ClientError::Protocol)?;
            let params = keys
                .iter()
                .map(|(id, _, csr)| NewX509svidParams {
                    entry_id: id.clone(),
                    csr: csr.clone(),
                })
                .collect();
            let resp = api
                .batch_new_x509svid(BatchNewX509svidRequest { params })
                .await?
                .into_inner();
            let keys = keys.into_iter().map(|(id, k, _)| (id, k)).collect();
            changed |= self.apply_svids(resp.results, keys);
        }
        Ok(changed)
    }

    /// Stores the SVIDs the server signed (for entries still held); true if any was stored.
    fn apply_svids(
        &self,
        results: Vec<continuity_proto::agent::BatchNewX509svidResult>,
        mut keys: HashMap<String, SecretBytes>,
    ) -> bool {
        let mut st = self.state();
        let mut changed = false;
        for r in results {
            match (r.status.as_ref().map(|s| s.code), r.svid) {
                (Some(0), Some(svid)) => {
                    let Some(key) = keys.remove(&r.entry_id) else {
                        continue;
                    };
                    match svid_from_proto(svid, key) {
                        Ok(svid) if st.entries.contains_key(&r.entry_id) => {
                            st.svids.insert(r.entry_id.clone(), svid);
                            changed = true;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(entry = %r.entry_id, error = %e, "unusable SVID from the server")
                        }
                    }
                }
                (_, _) => {
                    let msg = r.status.map(|s| s.message).unwrap_or_default();
                    tracing::warn!(entry = %r.entry_id, reason = %msg, "server did not sign an SVID");
                }
            }
        }
        changed
    }

    /// Refreshes Engine JWKS and reports incarnations (failures are logged, never fatal);
    /// true if the JWKS changed.
    async fn sync_engines(&self, agent_svid: &Svid) -> bool {
        let mut broker = match self.client.broker(agent_svid).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "Engine broker unavailable");
                return false;
            }
        };
        let changed = match self.refresh_engine_jwks(&mut broker).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "refreshing Engine JWKS failed; keeping the cached ones");
                false
            }
        };
        if let Err(e) = self.flush_incarnations(&mut broker).await {
            tracing::warn!(error = %e, "reporting incarnations failed; will retry");
        }
        changed
    }

    /// Fetches the JWKS of every Engine this node's entries are bound to.
    async fn refresh_engine_jwks(&self, broker: &mut Broker) -> Result<bool, ClientError> {
        let mut by_engine: std::collections::BTreeMap<String, String> = Default::default();
        for e in self
            .state()
            .entries
            .values()
            .filter(|e| !e.engine.is_empty())
        {
            by_engine
                .entry(e.engine.clone())
                .or_insert_with(|| e.id.clone());
        }
        let mut fresh = std::collections::BTreeMap::new();
        for (engine, entry_id) in by_engine {
            let r = broker
                .get_engine_jwks(continuity_proto::engine::BrokerJwks { entry_id })
                .await?
                .into_inner();
            let jwks = cache::EngineJwks {
                jwks: String::from_utf8_lossy(&r.jwks).into_owned(),
                keys: r
                    .keys
                    .into_iter()
                    .map(|k| cache::EnginePublicKey {
                        key: k.key,
                        version: k.version,
                        kid: k.kid,
                        algorithm: k.algorithm,
                        spki: k.public_key,
                    })
                    .collect(),
            };
            fresh.insert(engine, jwks);
        }
        let mut st = self.state();
        if fresh != st.engine_jwks {
            st.engine_jwks = fresh;
            return Ok(true);
        }
        Ok(false)
    }

    /// Notes that a workload received an identity bound to an Engine; reported to the server
    /// on the next sync (again at most once a minute per workload, to refresh last_seen).
    /// `workload` is only called when a report is due (the hot path skips building it).
    pub fn report_incarnation(
        &self,
        entry_id: &str,
        workload_id: &str,
        workload: &dyn Fn() -> continuity_proto::engine::Workload,
    ) {
        let now = self.clock.unix();
        let mut guard = self.incarnations.lock().unwrap_or_else(|e| e.into_inner());
        let IncarnationQueue { pending, last } = &mut *guard;
        if let Some(t) = last.get_mut(&(entry_id.to_string(), workload_id.to_string())) {
            if now - *t < 60 {
                return;
            }
            *t = now;
        } else {
            if last.len() >= 100_000 {
                last.retain(|_, t| now - *t < 60);
            }
            last.insert((entry_id.to_string(), workload_id.to_string()), now);
        }
        if pending.len() < 10_000 {
            pending.push(continuity_proto::engine::Incarnation {
                entry_id: entry_id.into(),
                workload: Some(workload()),
                seen_at: now,
            });
        }
    }

    async fn flush_incarnations(
        &self,
        broker: &mut continuity_proto::engine::engine_broker_client::EngineBrokerClient<
            tonic::transport::Channel,
        >,
    ) -> Result<(), ClientError> {
        let batch = std::mem::take(
            &mut self
                .incarnations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pending,
        );
        if batch.is_empty() {
            return Ok(());
        }
        let req = continuity_proto::engine::ReportIncarnationsRequest {
            incarnations: batch.clone(),
        };
        if let Err(e) = broker.report_incarnations(req).await {
            // Keep them for the next round.
            self.incarnations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pending
                .extend(batch);
            return Err(e.into());
        }
        Ok(())
    }

    /// The Engine broker, authenticated with the current agent SVID.
    pub async fn broker(
        &self,
    ) -> Result<
        continuity_proto::engine::engine_broker_client::EngineBrokerClient<
            tonic::transport::Channel,
        >,
        ClientError,
    > {
        let svid = self
            .agent_svid
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| ClientError::Protocol("the agent is not attested".into()))?;
        self.client.broker(&svid).await
    }

    /// A JWT-SVID for `identity` and `audience`: from the cache until half-life, else from the
    /// server; while the server is unreachable (or the caller's rate limit is used up) a
    /// cached token is served until it expires. `admit` is asked before a call would reach the
    /// server; concurrent misses for one key wait on one call (and only the first is asked).
    pub async fn jwt_svid(
        &self,
        entry_id: &str,
        audience: &[String],
        admit: &(dyn Fn() -> Result<(), RateLimited> + Send + Sync),
    ) -> Result<String, JwtFetchError> {
        let mut aud = audience.to_vec();
        aud.sort();
        aud.dedup();
        let key: JwtKey = (entry_id.to_string(), aud);
        let now = self.clock.unix();
        let cached = {
            let mut jwts = self.jwts.lock().unwrap_or_else(|e| e.into_inner());
            let c = jwts.get(&key).cloned();
            if c.as_ref().is_some_and(|c| now >= c.expires_at) {
                jwts.remove(&key);
            }
            c.filter(|c| now < c.expires_at)
        };
        if let Some(c) = &cached
            && now
                < c.issued_at
                    .saturating_add(c.expires_at.saturating_sub(c.issued_at) / 2)
        {
            return Ok(c.token.clone());
        }
        let start = || {
            let agent_svid = self
                .agent_svid
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            fetch_jwt(
                self.client.clone(),
                agent_svid,
                self.jwts.clone(),
                key.clone(),
                now,
            )
        };
        let share = match self.jwt_fetches.join(&key, admit, start, |e| {
            Err(JwtFetchError::Failed(e.to_string()))
        }) {
            Ok(s) => s,
            Err(e) => return cached.map(|c| c.token).ok_or(e.into()),
        };
        match share.wait().await {
            Ok(c) => Ok(c.token),
            // Unreachable (not refused): serve the cached token while it lasts.
            Err(JwtFetchError::Server(e)) if e.status().is_none() => {
                cached.map(|c| c.token).ok_or(JwtFetchError::Server(e))
            }
            Err(e) => Err(e),
        }
    }
}

/// Asks the server for a JWT-SVID and caches it (runs as its own task: no caller cancels it).
async fn fetch_jwt(
    client: Arc<ServerClient>,
    agent_svid: Option<Svid>,
    jwts: Arc<Mutex<Lru<JwtKey, CachedJwt>>>,
    key: JwtKey,
    now: i64,
) -> JwtResult {
    let agent_svid = agent_svid.ok_or(JwtFetchError::NotAttested)?;
    let server = |e: ClientError| JwtFetchError::Server(Arc::new(e));
    let call = async {
        let mut api = client.api(&agent_svid).await?;
        let req = NewJwtsvidRequest {
            entry_id: key.0.clone(),
            audience: key.1.clone(),
        };
        Ok::<_, ClientError>(api.new_jwtsvid(req).await?.into_inner())
    };
    // A stalled server fails this fetch (as unreachable: a cached token is served) instead of
    // holding every caller of this key.
    let r = tokio::time::timeout(JWT_FETCH_TIMEOUT, call)
        .await
        .map_err(|_| server(ClientError::Timeout(JWT_FETCH_TIMEOUT)))?
        .map_err(server)?;
    let c = CachedJwt {
        token: r.token,
        issued_at: now,
        expires_at: r.expires_at,
    };
    jwts.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, c.clone());
    Ok(c)
}

/// Whether the leaf of `chain` names (by issuer) one of the bundle's CAs (false for an empty
/// chain or unparsable certificates: both come from the server or the state file).
pub fn issued_by_bundle(chain: &[bytes::Bytes], roots: &[Vec<u8>]) -> bool {
    let Some(leaf) = chain.first() else {
        return false;
    };
    let Ok((_, leaf)) = x509_parser::parse_x509_certificate(leaf) else {
        return false;
    };
    roots.iter().any(|r| {
        x509_parser::parse_x509_certificate(r)
            .map(|(_, ca)| ca.subject().as_raw() == leaf.issuer().as_raw())
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_svid_answer_without_a_certificate_is_refused() {
        let empty = continuity_proto::types::X509svid {
            spiffe_id: "spiffe://example.org/w".into(),
            cert_chain: vec![],
            expires_at: 100,
        };
        assert_eq!(
            svid_from_proto(empty, SecretBytes::new(vec![1])).unwrap_err(),
            SvidError::EmptyChain
        );
        let garbage = continuity_proto::types::X509svid {
            spiffe_id: "spiffe://example.org/w".into(),
            cert_chain: vec![vec![0x30, 0x03, 0x02, 0x01]],
            expires_at: 100,
        };
        assert!(matches!(
            svid_from_proto(garbage, SecretBytes::new(vec![1])),
            Err(SvidError::BadLeaf(_))
        ));
        assert!(!issued_by_bundle(&[], &[vec![0x30]]));
    }

    #[test]
    fn rotation_time_saturates_on_extreme_expiry() {
        for (issued, expires) in [
            (0, i64::MAX),
            (0, i64::MIN),
            (i64::MAX, i64::MIN),
            (i64::MIN, i64::MAX),
            (i64::MAX, i64::MAX),
        ] {
            let at = rotate_at(issued, expires);
            assert!(
                at >= issued.min(expires) || at == issued,
                "{issued} {expires} -> {at}"
            );
        }
        assert_eq!(rotate_at(100, 50), 100);
    }

    use std::sync::atomic::{AtomicUsize, Ordering};

    type F = Fetches<u32, u32>;

    fn lost(_: tokio::task::JoinError) -> u32 {
        u32::MAX
    }

    /// A caller waiting on the fetch for `key`, counting admissions and fetches started.
    async fn call(
        f: &F,
        key: u32,
        admits: &AtomicUsize,
        started: &AtomicUsize,
        gate: Arc<tokio::sync::Notify>,
    ) -> Result<u32, ()> {
        let share = f.join(
            &key,
            || {
                admits.fetch_add(1, Ordering::SeqCst);
                Ok::<(), ()>(())
            },
            || {
                started.fetch_add(1, Ordering::SeqCst);
                async move {
                    gate.notified().await;
                    key * 10
                }
            },
            lost,
        )?;
        Ok(share.wait().await)
    }

    #[tokio::test]
    async fn a_cancelled_first_caller_neither_cancels_the_fetch_nor_frees_a_token() {
        let f = Arc::new(F::default());
        let (admits, started) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let gate = Arc::new(tokio::sync::Notify::new());
        let spawn_caller = || {
            let (f, a, s, g) = (f.clone(), admits.clone(), started.clone(), gate.clone());
            tokio::spawn(async move { call(&f, 7, &a, &s, g).await })
        };
        let first = spawn_caller();
        tokio::task::yield_now().await;
        let waiters: Vec<_> = (0..4).map(|_| spawn_caller()).collect();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // The attack: reset the stream that started the fetch, again and again.
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for w in waiters {
            assert_eq!(w.await.unwrap(), Ok(70));
        }
        assert_eq!(admits.load(Ordering::SeqCst), 1, "only one token taken");
        assert_eq!(started.load(Ordering::SeqCst), 1, "only one server call");
        assert_eq!(f.len(), 0, "the last waiter removed the entry");
    }

    #[test]
    fn shares_finishing_together_always_remove_the_entry() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let _guard = rt.enter();
        let f = F::default();
        for i in 0..2000 {
            let join = || {
                f.join(&1, || Ok::<_, ()>(()), || async move { i }, lost)
                    .unwrap()
            };
            let (a, b) = (join(), join());
            let barrier = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                s.spawn(|| {
                    barrier.wait();
                    drop(a);
                });
                barrier.wait();
                drop(b);
            });
            assert_eq!(
                f.len(),
                0,
                "iteration {i}: a finished fetch stayed in the map"
            );
        }
    }

    #[tokio::test]
    async fn a_finished_fetch_is_not_joined() {
        let f = F::default();
        let first = f
            .join(&1, || Ok::<_, ()>(()), || async { 1 }, lost)
            .unwrap();
        assert_eq!(first.wait().await, 1);
        // Still held (its caller has not finished), but done: a new call fetches afresh.
        let mut admitted = false;
        let second = f
            .join(
                &1,
                || {
                    admitted = true;
                    Ok::<_, ()>(())
                },
                || async { 2 },
                lost,
            )
            .unwrap();
        assert!(admitted);
        assert_eq!(second.wait().await, 2);
        drop(first);
        assert_eq!(f.len(), 1, "the old share does not remove the new entry");
        drop(second);
        assert_eq!(f.len(), 0);
    }
}
