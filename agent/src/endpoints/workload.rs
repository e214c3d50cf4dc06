//! The SPIFFE Workload API handler. Answers from the cache only; the caller is attested once
//! per connection and sees exactly the identities whose entry selectors it has.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use continuity_attestors::Selector;
use continuity_common::Clock;
use continuity_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use continuity_proto::workload::*;
use futures_util::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::WorkloadConnInfo;
use super::conns::StreamGuard;
use crate::attestor::WorkloadAttestor;
use crate::config::WorkloadApiConfig;
use crate::limits::{CallerKey, RateLimited, RateLimiter};
use crate::manager::JwtFetchError;
use crate::manager::cache::{Identity, Snapshot};

/// The metadata key every Workload API call must carry with value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Rejects calls without the security header (InvalidArgument), before any attestation.
pub fn check_security_header(req: Request<()>) -> Result<Request<()>, Status> {
    match req.metadata().get(SECURITY_HEADER).map(|v| v.as_bytes()) {
        Some(b"true") => Ok(req),
        _ => Err(Status::invalid_argument(
            "security header missing from request: workload.spiffe.io: true",
        )),
    }
}

/// What the handler needs from the cache manager.
#[tonic::async_trait]
pub trait IdentityCache: Send + Sync + 'static {
    /// Snapshots as they change.
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>>;
    /// A JWT-SVID for an identity; `admit` is asked before a call would reach the server.
    async fn jwt_svid(
        &self,
        entry_id: &str,
        audience: &[String],
        admit: &(dyn Fn() -> Result<(), RateLimited> + Send + Sync),
    ) -> Result<String, JwtFetchError>;
    /// Notes that a workload received an identity bound to an Engine.
    fn report_incarnation(
        &self,
        entry_id: &str,
        workload_id: &str,
        workload: &dyn Fn() -> continuity_proto::engine::Workload,
    );
}

#[tonic::async_trait]
impl IdentityCache for crate::manager::Manager {
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        crate::manager::Manager::subscribe(self)
    }
    async fn jwt_svid(
        &self,
        entry_id: &str,
        audience: &[String],
        admit: &(dyn Fn() -> Result<(), RateLimited> + Send + Sync),
    ) -> Result<String, JwtFetchError> {
        crate::manager::Manager::jwt_svid(self, entry_id, audience, admit).await
    }
    fn report_incarnation(
        &self,
        entry_id: &str,
        workload_id: &str,
        workload: &dyn Fn() -> continuity_proto::engine::Workload,
    ) {
        crate::manager::Manager::report_incarnation(self, entry_id, workload_id, workload)
    }
}

/// The attested caller of one request: its selectors and its process.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Selectors from attestation.
    pub selectors: Arc<HashSet<Selector>>,
    /// The process.
    pub peer: Arc<super::peer::Peer>,
    /// Stable id of the process (pid + start time).
    pub workload_id: Arc<str>,
    /// Keeps the connection counted busy while this call (or its response stream) lives.
    pub call: Option<Arc<StreamGuard>>,
}

impl Caller {
    /// The pod UID from the `k8s:pod-uid` selector, if the caller runs in a pod.
    fn pod_uid(&self) -> Option<&str> {
        self.selectors
            .iter()
            .find(|s| s.kind == "k8s" && s.value.starts_with("pod-uid:"))
            .map(|s| &s.value["pod-uid:".len()..])
    }

    /// Who the rate limits count this caller as: its pod if it has one, else its uid.
    pub fn rate_key(&self) -> CallerKey {
        match self.pod_uid() {
            Some(p) => CallerKey::Pod(p.to_string()),
            None => CallerKey::Uid(self.peer.uid),
        }
    }

    /// The workload description sent to the server (audit, incarnations).
    pub fn workload(&self) -> continuity_proto::engine::Workload {
        let mut selectors: Vec<_> = self.selectors.iter().cloned().collect();
        selectors.sort();
        continuity_proto::engine::Workload {
            // A pod is named by its UID (it is the runtime unit); other processes by pid + start.
            id: self
                .pod_uid()
                .map_or_else(|| self.workload_id.to_string(), |p| format!("pod:{p}")),
            pid: self.peer.pid,
            uid: self.peer.uid,
            selectors: selectors
                .into_iter()
                .map(|s| continuity_proto::types::Selector {
                    r#type: s.kind,
                    value: s.value,
                })
                .collect(),
        }
    }
}

/// Attests the caller of `req` once per connection (Unavailable when attestation fails).
pub async fn attest_caller<T>(
    req: &Request<T>,
    attestor: &Arc<dyn WorkloadAttestor>,
) -> Result<Caller, Status> {
    let conn = req
        .extensions()
        .get::<WorkloadConnInfo>()
        .cloned()
        .ok_or_else(|| Status::unavailable("workload attestation failed: no peer information"))?;
    let call = Arc::new(conn.calls.open());
    let info = conn.info;
    let peer = info.peer.clone().ok_or_else(|| {
        Status::unavailable("workload attestation failed: peer credentials unavailable")
    })?;
    let attestor = attestor.clone();
    let p = peer.clone();
    let uid = peer.uid;
    let selectors = info
        .selectors
        .get_or_try_init(|| async move {
            let result = ATTEST_GATE.run(uid, move || attestor.attest(&p)).await?;
            match result {
                Ok(s) => Ok(s),
                Err(e) => {
                    tracing::info!(error = %e, "workload attestation failed");
                    Err(Status::unavailable(format!(
                        "workload attestation failed: {e}"
                    )))
                }
            }
        })
        .await?
        .clone();
    let workload_id = info.workload_id.clone();
    Ok(Caller {
        selectors,
        peer,
        workload_id,
        call: Some(call),
    })
}

/// Attestations running at once, in all.
pub const MAX_ATTESTATIONS: usize = 64;
/// Attestations running at once for one uid.
pub const MAX_ATTESTATIONS_PER_UID: usize = 8;
/// Longest an attestation may take, waiting for its turn included (then Unavailable).
pub const ATTESTATION_TIMEOUT: Duration = Duration::from_secs(10);

static ATTEST_GATE: std::sync::LazyLock<AttestGate> = std::sync::LazyLock::new(|| {
    AttestGate::new(
        MAX_ATTESTATIONS,
        MAX_ATTESTATIONS_PER_UID,
        ATTESTATION_TIMEOUT,
    )
});

/// Bounds blocking attestations: in all, per uid, and in time. A permit is held by the
/// blocking task itself, so one stuck past the timeout still counts until it returns.
/// Invariant: a uid's entry lives while `users` (counted under the lock) is above zero.
struct AttestGate {
    global: Arc<tokio::sync::Semaphore>,
    max: usize,
    per_uid: usize,
    timeout: Duration,
    uids: Arc<Mutex<UidSemaphores>>,
}

type UidSemaphores = HashMap<u32, (Arc<tokio::sync::Semaphore>, usize)>;

/// One caller's use of its uid's semaphore (held until its attestation returns); the last
/// one out removes the entry.
struct UidUse {
    uids: Arc<Mutex<UidSemaphores>>,
    uid: u32,
    sem: Arc<tokio::sync::Semaphore>,
}

impl Drop for UidUse {
    fn drop(&mut self) {
        let mut uids = self.uids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = uids.get_mut(&self.uid) {
            e.1 = e.1.saturating_sub(1);
            if e.1 == 0 {
                uids.remove(&self.uid);
            }
        }
    }
}

impl AttestGate {
    fn new(global: usize, per_uid: usize, timeout: Duration) -> Self {
        Self {
            global: Arc::new(tokio::sync::Semaphore::new(global)),
            max: global,
            per_uid,
            timeout,
            uids: Arc::default(),
        }
    }

    fn join(&self, uid: u32) -> UidUse {
        let mut uids = self.uids.lock().unwrap_or_else(|e| e.into_inner());
        let e = uids
            .entry(uid)
            .or_insert_with(|| (Arc::new(tokio::sync::Semaphore::new(self.per_uid)), 0));
        e.1 += 1;
        UidUse {
            uids: self.uids.clone(),
            uid,
            sem: e.0.clone(),
        }
    }

    /// Runs `f` on a blocking thread once both a uid and a global permit are free, or fails
    /// with Unavailable when that and `f` together take longer than the timeout.
    async fn run<T: Send + 'static>(
        &self,
        uid: u32,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        let busy = || {
            Status::unavailable(format!(
                "workload attestation timed out after {:?} (at most {} at once, {} per uid)",
                self.timeout, self.max, self.per_uid
            ))
        };
        let work = async {
            let u = self.join(uid);
            let mine = u.sem.clone().acquire_owned().await;
            let all = self.global.clone().acquire_owned().await;
            let (Ok(mine), Ok(all)) = (mine, all) else {
                return Err(Status::unavailable("workload attestation is shutting down"));
            };
            tokio::task::spawn_blocking(move || {
                let _held = (mine, all, u);
                f()
            })
            .await
            .map_err(|e| Status::unavailable(format!("workload attestation failed: {e}")))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| Err(busy()))
    }
}

/// The Workload API service.
pub struct WorkloadHandler {
    cache: Arc<dyn IdentityCache>,
    attestor: Arc<dyn WorkloadAttestor>,
    clock: Arc<dyn Clock>,
    limiter: Arc<RateLimiter>,
    max_audiences: usize,
    max_audience_length: usize,
}

type Selectors = Arc<HashSet<Selector>>;
type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn no_identity() -> Status {
    Status::permission_denied("no identity issued: no registration entry matches this workload")
}

impl WorkloadHandler {
    /// A handler over a cache and an attestor; JWT-SVID cache misses go through `limiter`.
    pub fn new(
        cache: Arc<dyn IdentityCache>,
        attestor: Arc<dyn WorkloadAttestor>,
        clock: Arc<dyn Clock>,
        limiter: Arc<RateLimiter>,
        limits: &WorkloadApiConfig,
    ) -> Self {
        Self {
            cache,
            attestor,
            clock,
            limiter,
            max_audiences: limits.max_audiences,
            max_audience_length: limits.max_audience_length,
        }
    }

    /// Refuses too many or too long audiences (InvalidArgument naming the limit).
    fn check_audiences(&self, audience: &[String]) -> Result<(), Status> {
        if audience.len() > self.max_audiences {
            return Err(Status::invalid_argument(format!(
                "{} audiences requested; at most {} (workload_api.max_audiences)",
                audience.len(),
                self.max_audiences
            )));
        }
        if let Some(a) = audience.iter().find(|a| a.len() > self.max_audience_length) {
            return Err(Status::invalid_argument(format!(
                "an audience is {} bytes long; at most {} (workload_api.max_audience_length)",
                a.len(),
                self.max_audience_length
            )));
        }
        Ok(())
    }

    /// Attests the caller (once per connection) and reports Engine incarnations for the
    /// identities it is about to receive.
    async fn selectors<T>(&self, req: &Request<T>) -> Result<Selectors, Status> {
        Ok(attest_caller(req, &self.attestor).await?.selectors)
    }

    fn report(&self, caller: &Caller, ids: &[Arc<Identity>]) {
        for i in ids.iter().filter(|i| i.engine.is_some()) {
            self.cache
                .report_incarnation(&i.entry_id, &caller.workload_id, &|| caller.workload());
        }
    }

    fn x509_response(snap: &Snapshot, ids: &[Arc<Identity>]) -> X509svidResponse {
        X509svidResponse {
            svids: ids
                .iter()
                .map(|i| X509svid {
                    spiffe_id: i.spiffe_id.clone(),
                    // Shared with the cache (reference counts): nothing is copied per message.
                    x509_svid: i.x509_svid.clone(),
                    x509_svid_key: i.key.share(),
                    bundle: snap.bundle.x509.clone(),
                    hint: i.hint.clone(),
                })
                .collect(),
            crl: vec![],
            federated_bundles: HashMap::new(),
        }
    }

    fn x509_bundles_response(snap: &Snapshot) -> X509BundlesResponse {
        let b = &snap.bundle;
        X509BundlesResponse {
            crl: vec![],
            bundles: HashMap::from([(b.trust_domain_id.clone(), b.x509.clone())]),
        }
    }

    fn jwt_bundles_response(snap: &Snapshot) -> JwtBundlesResponse {
        let b = &snap.bundle;
        JwtBundlesResponse {
            bundles: HashMap::from([(b.trust_domain_id.clone(), b.jwks.clone())]),
        }
    }
}

/// Streams `first`, then a message built from each new snapshot whenever its key changes;
/// ends with PermissionDenied if the caller loses every identity.
fn watch_stream<T, K, F>(
    rx: watch::Receiver<Arc<Snapshot>>,
    caller: &Caller,
    first: T,
    first_key: K,
    build: F,
) -> ResponseStream<T>
where
    T: Send + 'static,
    K: PartialEq + Send + 'static,
    F: Fn(&Snapshot, &[Arc<Identity>]) -> (K, T) + Send + Sync + 'static,
{
    struct St<T, K> {
        rx: watch::Receiver<Arc<Snapshot>>,
        first: Option<T>,
        last: K,
        done: bool,
        _call: Option<Arc<StreamGuard>>,
    }
    let selectors = caller.selectors.clone();
    let build = Arc::new(build);
    let init = St {
        _call: caller.call.clone(),
        rx,
        first: Some(first),
        last: first_key,
        done: false,
    };
    Box::pin(futures_util::stream::unfold(init, move |mut st| {
        let (build, selectors) = (build.clone(), selectors.clone());
        async move {
            if let Some(msg) = st.first.take() {
                return Some((Ok(msg), st));
            }
            if st.done {
                return None;
            }
            loop {
                st.rx.changed().await.ok()?;
                let snap = st.rx.borrow_and_update().clone();
                let ids = snap.matching(&selectors);
                if ids.is_empty() {
                    st.done = true;
                    return Some((Err(no_identity()), st));
                }
                let (key, msg) = build(&snap, &ids);
                if key != st.last {
                    st.last = key;
                    return Some((Ok(msg), st));
                }
            }
        }
    }))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadHandler {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;
    type FetchWITSVIDStream = ResponseStream<WitsvidResponse>;
    type FetchWITBundlesStream = ResponseStream<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let caller = attest_caller(&req, &self.attestor).await?;
        let selectors = caller.selectors.clone();
        let mut rx = self.cache.subscribe();
        let snap = rx.borrow_and_update().clone();
        let ids = snap.matching(&selectors);
        if ids.is_empty() {
            return Err(no_identity());
        }
        self.report(&caller, &ids);
        let key = |snap: &Snapshot, ids: &[Arc<Identity>]| {
            (
                snap.bundle.sequence,
                ids.iter().map(|i| i.generation).collect::<Vec<_>>(),
            )
        };
        let first = Self::x509_response(&snap, &ids);
        let first_key = key(&snap, &ids);
        Ok(Response::new(watch_stream(
            rx,
            &caller,
            first,
            first_key,
            move |snap, ids| (key(snap, ids), Self::x509_response(snap, ids)),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let caller = attest_caller(&req, &self.attestor).await?;
        let selectors = caller.selectors.clone();
        let mut rx = self.cache.subscribe();
        let snap = rx.borrow_and_update().clone();
        if snap.matching(&selectors).is_empty() {
            return Err(no_identity());
        }
        let build = |snap: &Snapshot, _: &[Arc<Identity>]| {
            (snap.bundle.sequence, Self::x509_bundles_response(snap))
        };
        let (k, first) = build(&snap, &[]);
        Ok(Response::new(watch_stream(rx, &caller, first, k, build)))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let caller = attest_caller(&req, &self.attestor).await?;
        let selectors = caller.selectors.clone();
        let r = req.into_inner();
        if r.audience.is_empty() || r.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        self.check_audiences(&r.audience)?;
        let snap = self.cache.subscribe().borrow().clone();
        let ids: Vec<_> = snap
            .matching(&selectors)
            .into_iter()
            .filter(|i| r.spiffe_id.is_empty() || i.spiffe_id == r.spiffe_id)
            .collect();
        if ids.is_empty() {
            return Err(no_identity());
        }
        self.report(&caller, &ids);
        let mut svids = Vec::with_capacity(ids.len());
        let who = caller.rate_key();
        let admit = || self.limiter.admit(&who);
        for i in ids {
            let token = self
                .cache
                .jwt_svid(&i.entry_id, &r.audience, &admit)
                .await
                .map_err(|e| match e {
                    JwtFetchError::RateLimited(e) => {
                        tracing::debug!(caller = %who, "JWT-SVID refused: rate limit");
                        Status::resource_exhausted(format!("no JWT-SVID for {}: {e}", i.spiffe_id))
                    }
                    e => Status::unavailable(format!(
                        "could not obtain a JWT-SVID for {}: {e}",
                        i.spiffe_id
                    )),
                })?;
            svids.push(Jwtsvid {
                spiffe_id: i.spiffe_id.clone(),
                svid: token,
                hint: i.hint.clone(),
            });
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let caller = attest_caller(&req, &self.attestor).await?;
        let selectors = caller.selectors.clone();
        let mut rx = self.cache.subscribe();
        let snap = rx.borrow_and_update().clone();
        if snap.matching(&selectors).is_empty() {
            return Err(no_identity());
        }
        let build = |snap: &Snapshot, _: &[Arc<Identity>]| {
            (snap.bundle.sequence, Self::jwt_bundles_response(snap))
        };
        let (k, first) = build(&snap, &[]);
        Ok(Response::new(watch_stream(rx, &caller, first, k, build)))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.selectors(&req).await?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        self.check_audiences(std::slice::from_ref(&r.audience))?;
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let snap = self.cache.subscribe().borrow().clone();
        let bundle = snap.bundle.clone();
        let td = bundle
            .trust_domain_id
            .trim_start_matches("spiffe://")
            .to_string();
        let v =
            continuity_common::jwt::validate(&r.svid, &r.audience, self.clock.unix(), |t, kid| {
                if t != td {
                    return None;
                }
                bundle
                    .jwt_keys
                    .iter()
                    .find(|(k, _)| k == kid)
                    .map(|(_, spki)| spki.as_slice())
            })
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(to_struct(v.claims)),
        }))
    }

    async fn fetch_witsvid(
        &self,
        _: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("WIT-SVIDs are not supported"))
    }

    async fn fetch_wit_bundles(
        &self,
        _: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("WIT-SVIDs are not supported"))
    }
}

/// JSON claims as a protobuf Struct.
fn to_struct(m: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests;
