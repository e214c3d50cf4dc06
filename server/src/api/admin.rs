//! The admin API on the server's Unix socket: entries, join tokens, agents, bundle.
//! Only the server's own user (or root) may call it; the socket's directory is 0700 as well.

use std::sync::Arc;

use continuity_attestors::Selector;
use continuity_common::{Clock, TrustDomain};
use continuity_proto::admin::agent_admin_server::AgentAdmin;
use continuity_proto::admin::bundle_admin_server::BundleAdmin;
use continuity_proto::admin::entry_admin_server::EntryAdmin;
use continuity_proto::admin::token_admin_server::TokenAdmin;
use continuity_proto::admin::*;
use continuity_proto::types;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::agent::token_hash;
use super::{agent_to_proto, bundle_to_proto, entry_to_proto, registry_status, to_completion};
use crate::audit::AuditEvent;
use crate::ca::CaManager;
use crate::datastore::{JoinToken, JoinTokenStore, Write};
use crate::entry::{Entry, EntryError, EntryFilter, EntryRequest, id_in_domain};
use crate::metrics::Metrics;
use crate::registry::Registry;

/// Default join token lifetime.
pub const DEFAULT_TOKEN_TTL: i64 = 600;
/// Longest join token lifetime.
pub const MAX_TOKEN_TTL: i64 = 3600;

/// The admin services (one value serves all four).
#[derive(Clone)]
pub struct AdminService {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Entries and agents.
    pub registry: Arc<Registry>,
    /// CA (bundle).
    pub ca: Arc<CaManager>,
    /// Join tokens (new tokens are written through the audited commit).
    pub store: Arc<dyn JoinTokenStore>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The uid the server runs as; callers must match it (or be root).
    pub owner_uid: u32,
    /// Engines (and the audit log).
    pub engines: Arc<crate::engines::Engines>,
    /// Rows known to have failed their record MAC (a lookup of one is DataLoss, not NotFound).
    pub bad_rows: Arc<crate::datastore::BadRows>,
    /// Foreign bundles: an entry may federate only with a trust domain whose bundle exists.
    pub federation: Arc<crate::federation::Federation>,
    /// What each agent reports serving (a revoke waits until none serves the key).
    pub serving: Arc<crate::serving::ServingReports>,
}

impl AdminService {
    /// The status for a `what` the index does not hold: DataLoss when its row in `table`
    /// failed its record MAC (it is held back, not gone), else NotFound.
    fn missing(&self, table: &str, what: &str, id: &str) -> Status {
        match self.bad_rows.reason(table, id) {
            Some(reason) => Status::data_loss(format!(
                "{what} {id} failed its integrity check ({reason}) and is not served; see `continuity-server integrity verify`"
            )),
            None => Status::not_found(format!("{what} {id} not found")),
        }
    }

    /// Checks the caller is the server's uid or root; returns the audit actor ("admin uid N").
    pub fn authorize<T>(&self, req: &Request<T>) -> Result<String, Status> {
        self.metrics.inc(&self.metrics.admin_calls);
        let uid = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|c| c.peer_cred)
            .map(|c| c.uid())
            .ok_or_else(|| {
                Status::permission_denied(
                    "admin calls are accepted only over the admin Unix socket",
                )
            })?;
        if uid != self.owner_uid && uid != 0 {
            return Err(Status::permission_denied(format!(
                "uid {uid} may not use the admin API (only uid {} or root)",
                self.owner_uid
            )));
        }
        Ok(format!("admin uid {uid}"))
    }

    /// Validates a wire entry into a stored one by the domain rules (id and revision are left
    /// for the registry).
    fn validate(&self, e: types::Entry) -> Result<Entry, Status> {
        let entry = entry_request(e)
            .validate(&self.trust_domain, |name| self.engines.engine(name).is_ok())
            .map_err(entry_status)?;
        // As SPIRE: federating with a trust domain needs its bundle first.
        for td in &entry.federates_with {
            let known = TrustDomain::new(td)
                .ok()
                .and_then(|t| self.federation.bundle(&t))
                .is_some();
            if !known {
                return Err(Status::invalid_argument(format!(
                    "federates_with: no bundle of trust domain {td} is known; add it with `bundle set --id` or a federation relationship first"
                )));
            }
        }
        Ok(entry)
    }
}

/// The domain's view of a wire entry: the same strings, not yet checked.
fn entry_request(e: types::Entry) -> EntryRequest {
    EntryRequest {
        id: e.id,
        spiffe_id: e.spiffe_id,
        parent_id: e.parent_id,
        selectors: e
            .selectors
            .into_iter()
            .map(|s| (s.r#type, s.value))
            .collect(),
        x509_svid_ttl: e.x509_svid_ttl,
        jwt_svid_ttl: e.jwt_svid_ttl,
        dns_names: e.dns_names,
        hint: e.hint,
        admin: e.admin,
        engine: e.engine,
        federates_with: e.federates_with,
    }
}

/// Maps a refused entry to its gRPC status: a missing Engine is NotFound, the rest
/// InvalidArgument.
fn entry_status(e: EntryError) -> Status {
    match e {
        EntryError::NoSuchEngine(_) => Status::not_found(e.to_string()),
        other => Status::invalid_argument(other.to_string()),
    }
}

#[tonic::async_trait]
impl EntryAdmin for AdminService {
    async fn create_entry(
        &self,
        req: Request<CreateEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let actor = self.authorize(&req)?;
        let e = req
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is missing"))?;
        let entry = self.validate(e)?;
        let registry = self.registry.clone();
        let stored = to_completion(async move {
            registry
                .create_entry(entry, &actor)
                .await
                .map_err(registry_status)
        })
        .await?;
        tracing::info!(entry = %stored.id, spiffe_id = %stored.spiffe_id, "entry created");
        Ok(Response::new(entry_to_proto(&stored)))
    }

    async fn get_entry(
        &self,
        req: Request<GetEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        self.authorize(&req)?;
        let id = &req.get_ref().id;
        let e = self
            .registry
            .entry(id)
            .ok_or_else(|| self.missing("entries", "entry", id))?;
        Ok(Response::new(entry_to_proto(&e)))
    }

    async fn list_entries(
        &self,
        req: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        self.authorize(&req)?;
        let f = req.into_inner();
        let filter = EntryFilter {
            selectors: f
                .selectors
                .iter()
                .map(|s| Selector::raw(&s.r#type, s.value.clone()))
                .collect(),
            spiffe_id: f.spiffe_id,
            parent_id: f.parent_id,
        };
        let entries = self.registry.entries(|e| filter.matches(e));
        Ok(Response::new(ListEntriesResponse {
            entries: entries.iter().map(|e| entry_to_proto(e)).collect(),
        }))
    }

    async fn update_entry(
        &self,
        req: Request<UpdateEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let actor = self.authorize(&req)?;
        let e = req
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is missing"))?;
        if e.id.is_empty() {
            return Err(Status::invalid_argument("entry id is required to update"));
        }
        let entry = self.validate(e)?;
        let registry = self.registry.clone();
        let stored = to_completion(async move {
            registry
                .update_entry(entry, &actor)
                .await
                .map_err(registry_status)
        })
        .await?;
        tracing::info!(entry = %stored.id, "entry updated");
        Ok(Response::new(entry_to_proto(&stored)))
    }

    async fn delete_entry(
        &self,
        req: Request<DeleteEntryRequest>,
    ) -> Result<Response<DeleteEntryResponse>, Status> {
        let actor = self.authorize(&req)?;
        let id = req.into_inner().id;
        let (registry, target) = (self.registry.clone(), id.clone());
        to_completion(async move {
            registry
                .delete_entry(&target, &actor)
                .await
                .map_err(registry_status)
        })
        .await?;
        tracing::info!(entry = %id, "entry deleted");
        Ok(Response::new(DeleteEntryResponse {}))
    }
}

#[tonic::async_trait]
impl TokenAdmin for AdminService {
    async fn generate_token(
        &self,
        req: Request<GenerateTokenRequest>,
    ) -> Result<Response<GenerateTokenResponse>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let ttl = match r.ttl {
            0 => DEFAULT_TOKEN_TTL,
            t if t < 0 => return Err(Status::invalid_argument("ttl must be positive")),
            t if t > MAX_TOKEN_TTL => {
                return Err(Status::invalid_argument(format!(
                    "ttl of {t}s exceeds the maximum of {MAX_TOKEN_TTL}s (1h); join tokens are short-lived by design"
                )));
            }
            t => t,
        };
        let alias = match r.spiffe_id.as_str() {
            "" => None,
            s => Some(id_in_domain(&self.trust_domain, "spiffe_id", s).map_err(entry_status)?),
        };
        let rng = |e: continuity_common::rand::RngError| Status::unavailable(e.to_string());
        let token = crate::registry::new_uuid().map_err(rng)?;
        let idb = continuity_common::rand::array::<8>().map_err(rng)?;
        let expires_at = self.clock.unix() + ttl;
        // The token and its audit record commit together, or neither does.
        self.engines
            .audit()
            .commit(
                &[Write::CreateJoinToken(JoinToken {
                    token_hash: token_hash(&token),
                    id: hex::encode(idb),
                    alias,
                    expires_at,
                })],
                &[AuditEvent::ok(&actor, "token.generate", "join_token")],
            )
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        tracing::info!(expires_at, "join token generated");
        Ok(Response::new(GenerateTokenResponse { token, expires_at }))
    }
}

#[tonic::async_trait]
impl AgentAdmin for AdminService {
    async fn list_agents(
        &self,
        req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(ListAgentsResponse {
            agents: self.registry.agents().iter().map(agent_to_proto).collect(),
        }))
    }

    async fn get_agent(
        &self,
        req: Request<GetAgentRequest>,
    ) -> Result<Response<types::Agent>, Status> {
        self.authorize(&req)?;
        let id = &req.get_ref().spiffe_id;
        let a = self
            .registry
            .agent(id)
            .ok_or_else(|| self.missing("agents", "agent", id))?;
        Ok(Response::new(agent_to_proto(&a)))
    }

    async fn evict_agent(
        &self,
        req: Request<EvictAgentRequest>,
    ) -> Result<Response<EvictAgentResponse>, Status> {
        let actor = self.authorize(&req)?;
        let id = req.into_inner().spiffe_id;
        let (registry, target) = (self.registry.clone(), id.clone());
        to_completion(async move {
            registry
                .evict_agent(&target, &actor)
                .await
                .map_err(registry_status)
        })
        .await?;
        tracing::info!(agent = %id, "agent evicted");
        Ok(Response::new(EvictAgentResponse {}))
    }

    async fn ban_agent(
        &self,
        req: Request<BanAgentRequest>,
    ) -> Result<Response<BanAgentResponse>, Status> {
        let actor = self.authorize(&req)?;
        let id = req.into_inner().spiffe_id;
        let (registry, target) = (self.registry.clone(), id.clone());
        to_completion(async move {
            registry
                .ban_agent(&target, &actor)
                .await
                .map_err(registry_status)
        })
        .await?;
        tracing::info!(agent = %id, "agent banned");
        Ok(Response::new(BanAgentResponse {}))
    }
}

#[tonic::async_trait]
impl BundleAdmin for AdminService {
    async fn get_bundle(
        &self,
        req: Request<GetBundleRequest>,
    ) -> Result<Response<types::Bundle>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(bundle_to_proto(&self.ca.bundle())))
    }
}
