//! The SPIFFE Workload API handler. Answers from the cache only; the caller is attested once
//! per connection and sees exactly the identities whose entry selectors it has.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use continuity_attestors::Selector;
use continuity_common::Clock;
use continuity_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use continuity_proto::workload::*;
use futures_util::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::conns::StreamGuard;
use crate::attestor::WorkloadAttestor;
use crate::config::WorkloadApiConfig;
use crate::limits::{RateLimited, RateLimiter};
use crate::manager::JwtFetchError;
use crate::manager::cache::{Identity, PublishedBundle, Snapshot};

pub use self::caller::{
    ATTESTATION_TIMEOUT, Caller, MAX_ATTESTATIONS, MAX_ATTESTATIONS_PER_UID, attest_caller,
};

mod caller;

/// The metadata key every Workload API call must carry with value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Rejects calls without exactly one security header `workload.spiffe.io: true`
/// (InvalidArgument), before any attestation.
pub fn check_security_header(req: Request<()>) -> Result<Request<()>, Status> {
    let mut values = req.metadata().get_all(SECURITY_HEADER).iter();
    match (values.next().map(|v| v.as_bytes()), values.next()) {
        (Some(b"true"), None) => Ok(req),
        (Some(_), Some(_)) => Err(Status::invalid_argument(
            "security header workload.spiffe.io appears more than once; send it exactly once",
        )),
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
            federated_bundles: federated(snap, ids, |b| b.x509.clone()).collect(),
        }
    }

    fn x509_bundles_response(snap: &Snapshot, ids: &[Arc<Identity>]) -> X509BundlesResponse {
        let b = &snap.bundle;
        let mut bundles: HashMap<_, _> = federated(snap, ids, |b| b.x509.clone()).collect();
        bundles.insert(b.trust_domain_id.clone(), b.x509.clone());
        X509BundlesResponse {
            crl: vec![],
            bundles,
        }
    }

    fn jwt_bundles_response(snap: &Snapshot, ids: &[Arc<Identity>]) -> JwtBundlesResponse {
        let b = &snap.bundle;
        let mut bundles: HashMap<_, _> = federated(snap, ids, |b| b.jwks.clone()).collect();
        bundles.insert(b.trust_domain_id.clone(), b.jwks.clone());
        JwtBundlesResponse { bundles }
    }
}

/// The foreign bundles (in the form `part` picks) of the trust domains `ids` federate with.
fn federated(
    snap: &Snapshot,
    ids: &[Arc<Identity>],
    part: impl Fn(&PublishedBundle) -> bytes::Bytes,
) -> impl Iterator<Item = (String, bytes::Bytes)> {
    snap.federated_for(ids)
        .into_iter()
        .map(move |(td, b)| (td, part(&b)))
}

/// Streams `first`, then a message built from each new snapshot whenever its content differs
/// from the last one sent (messages are deduplicated by content, not by sequence numbers);
/// ends with PermissionDenied if the caller loses every identity.
fn watch_stream<T, F>(
    rx: watch::Receiver<Arc<Snapshot>>,
    caller: &Caller,
    first: T,
    build: F,
) -> ResponseStream<T>
where
    T: Clone + PartialEq + Send + 'static,
    F: Fn(&Snapshot, &[Arc<Identity>]) -> T + Send + Sync + 'static,
{
    struct St<T> {
        rx: watch::Receiver<Arc<Snapshot>>,
        first: Option<T>,
        last: T,
        done: bool,
        _call: Option<Arc<StreamGuard>>,
    }
    let selectors = caller.selectors.clone();
    let build = Arc::new(build);
    let init = St {
        _call: caller.call.clone(),
        rx,
        last: first.clone(),
        first: Some(first),
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
                let ids = snap.served(&selectors);
                if ids.is_empty() {
                    st.done = true;
                    return Some((Err(no_identity()), st));
                }
                let msg = build(&snap, &ids);
                if msg != st.last {
                    st.last = msg.clone();
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
        let ids = snap.served(&selectors);
        if ids.is_empty() {
            return Err(no_identity());
        }
        self.report(&caller, &ids);
        let first = Self::x509_response(&snap, &ids);
        Ok(Response::new(watch_stream(
            rx,
            &caller,
            first,
            Self::x509_response,
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
        let ids = snap.served(&selectors);
        if ids.is_empty() {
            return Err(no_identity());
        }
        let build = |snap: &Snapshot, ids: &[Arc<Identity>]| Self::x509_bundles_response(snap, ids);
        let first = build(&snap, &ids);
        Ok(Response::new(watch_stream(rx, &caller, first, build)))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let r = req.get_ref();
        if r.audience.is_empty() || r.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        self.check_audiences(&r.audience)?;
        if !r.spiffe_id.is_empty() {
            continuity_common::SpiffeId::new(&r.spiffe_id).map_err(|e| {
                Status::invalid_argument(format!("requested SPIFFE ID is invalid: {e}"))
            })?;
        }
        let caller = attest_caller(&req, &self.attestor).await?;
        let selectors = caller.selectors.clone();
        let r = req.into_inner();
        let snap = self.cache.subscribe().borrow().clone();
        let ids: Vec<_> = snap
            .served(&selectors)
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
        let ids = snap.served(&selectors);
        if ids.is_empty() {
            return Err(no_identity());
        }
        let build = |snap: &Snapshot, ids: &[Arc<Identity>]| Self::jwt_bundles_response(snap, ids);
        let first = build(&snap, &ids);
        Ok(Response::new(watch_stream(rx, &caller, first, build)))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        // The arguments are checked before the caller is attested (as the spec and SPIRE do).
        let r = req.get_ref();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        self.check_audiences(std::slice::from_ref(&r.audience))?;
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let selectors = self.selectors(&req).await?;
        let r = req.into_inner();
        let snap = self.cache.subscribe().borrow().clone();
        // Our own bundle, and the foreign ones the caller's identities federate with.
        let mut bundles = snap.federated_for(&snap.served(&selectors));
        bundles.insert(snap.bundle.trust_domain_id.clone(), snap.bundle.clone());
        let v =
            continuity_common::jwt::validate(&r.svid, &r.audience, self.clock.unix(), |t, kid| {
                bundles
                    .get(&format!("spiffe://{t}"))?
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
