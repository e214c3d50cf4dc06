//! `continuity.agent.v1.AgentAPI`: node attestation, agent SVID renewal, entry sync, and SVID
//! signing. After attestation every call is authenticated by the agent SVID presented in the
//! TLS handshake, and every request is re-authorized against the registry.

//!
//! [`attestation`] (AttestAgent), [`svids`] (agent SVID renewal, X509- and JWT-SVID signing),
//! [`auth`] (who is calling); entry sync and the bundle are answered here.

mod attestation;
mod auth;
mod svids;
#[cfg(test)]
mod tests;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use continuity_common::{Clock, TrustDomain};
use continuity_proto::agent::agent_api_server::AgentApi;
use continuity_proto::agent::{
    AttestAgentRequest, AttestAgentResponse, BatchNewX509svidRequest, BatchNewX509svidResponse,
    FetchBundleRequest, FetchBundleResponse, NewJwtsvidRequest, NewJwtsvidResponse,
    RenewAgentRequest, RenewAgentResponse, SyncAuthorizedEntriesRequest,
    SyncAuthorizedEntriesResponse,
};
use futures_util::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::{bundle_to_proto, entry_to_proto};
use crate::ca::CaManager;
use crate::datastore::JoinTokenStore;
use crate::metrics::Metrics;
use crate::registry::Registry;

pub use attestation::token_hash;
pub use auth::authenticate_agent;

/// Most CSRs accepted in one `BatchNewX509SVID` call.
pub const MAX_BATCH: usize = 500;

/// Room budgeted for one CSR in a batch: an RSA-4096 CSR is about 1.2 KiB, a P-256 one about
/// 250 bytes; 4 KiB leaves room for requested extensions.
pub const CSR_BUDGET: usize = 4096;

/// Room budgeted for one batch item's entry ID and protobuf framing.
pub const ITEM_OVERHEAD: usize = 144;

/// Largest AgentAPI request decoded: a full batch of [`MAX_BATCH`] CSRs of [`CSR_BUDGET`]
/// bytes with their entry IDs (500 × 4240 = 2,120,000 bytes, about 2 MiB). Every other
/// request (an AttestAgent message: a CSR and a join token or PSAT; a JWT-SVID request) is far
/// smaller. A larger one is refused with ResourceExhausted before any handler runs.
pub const MAX_AGENT_API_REQUEST: usize = MAX_BATCH * (CSR_BUDGET + ITEM_OVERHEAD);

/// Largest AgentAPI response encoded: the agent decodes at most tonic's default of 4 MiB, so
/// a larger response would fail there anyway (a full batch of 500 SVIDs is about 1 MiB).
pub const MAX_AGENT_API_RESPONSE: usize = 4 * 1024 * 1024;

/// The agent-facing service.
#[derive(Clone)]
pub struct AgentService {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// CA.
    pub ca: Arc<CaManager>,
    /// Entries and agents.
    pub registry: Arc<Registry>,
    /// Join tokens.
    pub store: Arc<dyn JoinTokenStore>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Default X509-SVID TTL (also the agent SVID TTL).
    pub x509_ttl: Duration,
    /// Default JWT-SVID TTL.
    pub jwt_ttl: Duration,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// k8s_psat clusters and their key caches, kept for the server's lifetime (empty: the
    /// attestor is off).
    pub psat_clusters: Arc<continuity_attestors::k8s_psat::Validator>,
    /// Per-agent signing and Engine-call rate limits.
    pub limits: Arc<super::limits::AgentRateLimits>,
    /// How long AttestAgent waits for its first message (`agent_api.first_message_timeout`).
    pub first_message_timeout: Duration,
    /// Foreign bundles, sent to the agents whose entries federate with them.
    pub federation: Arc<crate::federation::Federation>,
    /// What each agent reports serving, for revokes.
    pub serving: Arc<crate::serving::ServingReports>,
}

/// A server-streaming response.
type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentApi for AgentService {
    type AttestAgentStream = ResponseStream<AttestAgentResponse>;

    async fn attest_agent(
        &self,
        req: Request<Streaming<AttestAgentRequest>>,
    ) -> Result<Response<Self::AttestAgentStream>, Status> {
        self.attest(req).await
    }

    async fn renew_agent(
        &self,
        req: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        self.renew(req).await
    }

    async fn sync_authorized_entries(
        &self,
        req: Request<SyncAuthorizedEntriesRequest>,
    ) -> Result<Response<SyncAuthorizedEntriesResponse>, Status> {
        let agent = self.authenticate(&req).await?;
        if let Some(report) = &req.get_ref().serving {
            crate::serving::check_report(report).map_err(Status::invalid_argument)?;
            if let Err(e) = self
                .serving
                .record(agent.spiffe_id.as_str(), report, self.clock.unix())
                .await
            {
                // The sync itself is served from memory; only a revoke waits on the report.
                tracing::warn!(agent = %agent.spiffe_id, error = %e, "serving report not stored");
            }
        }
        let r = self.registry.sync(&agent, req.get_ref().since_revision);
        Ok(Response::new(SyncAuthorizedEntriesResponse {
            entries: r.entries.iter().map(|e| entry_to_proto(e)).collect(),
            removed_entry_ids: r.removed,
            revision: r.revision,
            full: r.full,
        }))
    }

    async fn batch_new_x509svid(
        &self,
        req: Request<BatchNewX509svidRequest>,
    ) -> Result<Response<BatchNewX509svidResponse>, Status> {
        self.batch_new_x509(req).await
    }

    async fn new_jwtsvid(
        &self,
        req: Request<NewJwtsvidRequest>,
    ) -> Result<Response<NewJwtsvidResponse>, Status> {
        self.new_jwt(req).await
    }

    async fn fetch_bundle(
        &self,
        req: Request<FetchBundleRequest>,
    ) -> Result<Response<FetchBundleResponse>, Status> {
        let agent = self.authenticate(&req).await?;
        let federated_bundles = self
            .registry
            .federated_trust_domains(&agent)
            .iter()
            .filter_map(|td| TrustDomain::new(td).ok())
            .collect::<std::collections::BTreeSet<_>>()
            .iter()
            .filter_map(|td| self.federation.bundle(td))
            .map(|b| bundle_to_proto(&b))
            .collect();
        Ok(Response::new(FetchBundleResponse {
            bundle: Some(bundle_to_proto(&self.ca.bundle())),
            federated_bundles,
        }))
    }
}
