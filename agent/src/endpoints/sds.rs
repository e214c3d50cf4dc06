//! Envoy's Secret Discovery Service (SDS v3) on the Workload API socket, as SPIRE's agent
//! serves it: StreamSecrets (state of the world), DeltaSecrets (incremental) and FetchSecrets.
//! The caller is attested exactly as a Workload API caller is; no security header is required
//! (Envoy sends none, and SPIRE asks for it on the Workload API only). What each resource name
//! means is in [`resources`]; the two stream protocols are in `stream` and `delta`.

use std::pin::Pin;
use std::sync::Arc;

use continuity_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use continuity_proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::workload::{IdentityCache, attest_caller};
use crate::attestor::WorkloadAttestor;

pub use self::resources::{ALL_BUNDLES, DEFAULT_SVID, ROOT_CA, SECRET_TYPE_URL, View};

mod delta;
pub mod resources;
mod stream;

/// Largest SDS request decoded (resource names and an Envoy node's metadata fit easily).
pub const MAX_SDS_MESSAGE: usize = 64 * 1024;
/// Most resource names one request or subscription may hold.
pub const MAX_RESOURCE_NAMES: usize = 256;
/// Most characters of a client's NACK message that are logged.
const MAX_LOGGED_ERROR: usize = 512;
/// Responses queued per stream before the stream task waits for the client to read.
const STREAM_QUEUE: usize = 4;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The SDS service: answers from the cache only.
pub struct SdsHandler {
    cache: Arc<dyn IdentityCache>,
    attestor: Arc<dyn WorkloadAttestor>,
}

impl SdsHandler {
    /// A handler over the cache and the workload attestor the Workload API uses.
    pub fn new(cache: Arc<dyn IdentityCache>, attestor: Arc<dyn WorkloadAttestor>) -> Self {
        Self { cache, attestor }
    }
}

/// Refuses a type URL other than the Secret's (an empty one means the Secret's).
fn check_type_url(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE_URL {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "type_url {type_url:?} is not served here; SDS serves {SECRET_TYPE_URL}"
    )))
}

/// Refuses more than [`MAX_RESOURCE_NAMES`] names.
fn check_names(n: usize) -> Result<(), Status> {
    if n > MAX_RESOURCE_NAMES {
        return Err(Status::invalid_argument(format!(
            "{n} resource names requested; at most {MAX_RESOURCE_NAMES}"
        )));
    }
    Ok(())
}

/// A client's NACK message, cut to a loggable length.
fn nack_message(status: &continuity_proto::google::rpc::Status) -> String {
    status.message.chars().take(MAX_LOGGED_ERROR).collect()
}

/// The state-of-the-world answer to `names` (empty: everything, as SPIRE): InvalidArgument
/// naming every name this workload has no resource for.
fn answer(view: &View, names: &[String], spiffe: bool) -> Result<Vec<prost_types::Any>, Status> {
    let wanted: Vec<String> = if names.iter().all(String::is_empty) {
        view.all_names()
    } else {
        let mut n: Vec<String> = names.iter().filter(|n| !n.is_empty()).cloned().collect();
        n.sort();
        n.dedup();
        n
    };
    let mut out = Vec::with_capacity(wanted.len());
    let mut missing = Vec::new();
    for name in &wanted {
        match view.resolve(name, spiffe)? {
            Some(s) => out.push(resources::to_any(&s)),
            None => missing.push(name.as_str()),
        }
    }
    if !missing.is_empty() {
        return Err(Status::invalid_argument(format!(
            "workload is not authorized for the requested identities {missing:?}"
        )));
    }
    Ok(out)
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsHandler {
    type DeltaSecretsStream = ResponseStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let caller = attest_caller(&req, &self.attestor).await?;
        let rx = self.cache.subscribe();
        let (tx, out) = mpsc::channel(STREAM_QUEUE);
        tokio::spawn(stream::run(caller, rx, req.into_inner(), tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn delta_secrets(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let caller = attest_caller(&req, &self.attestor).await?;
        let rx = self.cache.subscribe();
        let (tx, out) = mpsc::channel(STREAM_QUEUE);
        tokio::spawn(delta::run(caller, rx, req.into_inner(), tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let caller = attest_caller(&req, &self.attestor).await?;
        let r = req.into_inner();
        check_type_url(&r.type_url)?;
        check_names(r.resource_names.len())?;
        let snap = self.cache.subscribe().borrow().clone();
        let view = View::new(&snap, &caller.selectors);
        let spiffe = resources::use_spiffe_validator(r.node.as_ref());
        let resources = answer(&view, &r.resource_names, spiffe)?;
        // A fetch is not versioned (as SPIRE): no version and no nonce.
        Ok(Response::new(DiscoveryResponse {
            version_info: String::new(),
            resources,
            canary: false,
            type_url: SECRET_TYPE_URL.to_string(),
            nonce: String::new(),
        }))
    }
}

#[cfg(test)]
mod tests;
