//! The admin API on the server's Unix socket: entries, join tokens, agents, bundle.
//! Only the server's own user (or root) may call it; the socket's directory is 0700 as well.

use std::sync::Arc;

use continuity_attestors::Selector;
use continuity_common::{Clock, SpiffeId, TrustDomain};
use continuity_proto::admin::agent_admin_server::AgentAdmin;
use continuity_proto::admin::bundle_admin_server::BundleAdmin;
use continuity_proto::admin::entry_admin_server::EntryAdmin;
use continuity_proto::admin::token_admin_server::TokenAdmin;
use continuity_proto::admin::*;
use continuity_proto::types;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::agent::token_hash;
use super::{agent_to_proto, bundle_to_proto, entry_to_proto, registry_status};
use crate::audit::AuditEvent;
use crate::ca::CaManager;
use crate::datastore::{Entry, JoinToken, JoinTokenStore, Write};
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
}

impl AdminService {
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

    fn id_in_domain(&self, field: &str, value: &str) -> Result<SpiffeId, Status> {
        let id =
            SpiffeId::new(value).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
        if id.trust_domain() != self.trust_domain {
            return Err(Status::invalid_argument(format!(
                "{field}: {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        Ok(id)
    }

    /// Validates a wire entry into a stored one (id and revision are left for the registry).
    fn validate(&self, e: types::Entry) -> Result<Entry, Status> {
        let spiffe_id = self.id_in_domain("spiffe_id", &e.spiffe_id)?;
        if spiffe_id.path().is_empty() {
            return Err(Status::invalid_argument(
                "spiffe_id: a workload ID needs a path",
            ));
        }
        if spiffe_id.path().starts_with("/continuity/") {
            return Err(Status::invalid_argument(format!(
                "spiffe_id: {spiffe_id} is under /continuity/, which is reserved for agents and the server"
            )));
        }
        let parent_id = self.id_in_domain("parent_id", &e.parent_id)?;
        if e.selectors.is_empty() {
            return Err(Status::invalid_argument(
                "at least one selector is required (e.g. unix:uid:1000)",
            ));
        }
        let selectors = e
            .selectors
            .iter()
            .map(|s| {
                Selector::new(&s.r#type, &s.value)
                    .map_err(|err| Status::invalid_argument(err.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if e.x509_svid_ttl < 0 || e.jwt_svid_ttl < 0 {
            return Err(Status::invalid_argument("SVID TTLs must not be negative"));
        }
        for d in &e.dns_names {
            let ok = !d.is_empty()
                && d.len() <= 253
                && d.split('.').enumerate().all(|(i, l)| {
                    (i == 0 && l == "*")
                        || (!l.is_empty()
                            && l.len() <= 63
                            && !l.starts_with('-')
                            && !l.ends_with('-')
                            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
                });
            if !ok {
                return Err(Status::invalid_argument(format!(
                    "dns_name {d:?} is not a valid DNS name"
                )));
            }
        }
        for td in &e.federates_with {
            TrustDomain::new(td)
                .map_err(|err| Status::invalid_argument(format!("federates_with: {err}")))?;
        }
        let engine = match e.engine.as_str() {
            "" => None,
            name => {
                self.engines.engine(name).map_err(|_| {
                    Status::not_found(format!(
                        "engine {name:?} does not exist; create it with `engine create`"
                    ))
                })?;
                Some(name.to_string())
            }
        };
        Ok(Entry {
            id: e.id,
            spiffe_id: spiffe_id.to_string(),
            parent_id: parent_id.to_string(),
            selectors,
            x509_svid_ttl: e.x509_svid_ttl,
            jwt_svid_ttl: e.jwt_svid_ttl,
            dns_names: e.dns_names,
            hint: e.hint,
            admin: e.admin,
            engine,
            federates_with: e.federates_with,
            revision: 0,
            created_at: 0,
        })
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
        let stored = self
            .registry
            .create_entry(entry, &actor)
            .await
            .map_err(registry_status)?;
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
            .ok_or_else(|| Status::not_found(format!("entry {id} not found")))?;
        Ok(Response::new(entry_to_proto(&e)))
    }

    async fn list_entries(
        &self,
        req: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        self.authorize(&req)?;
        let f = req.into_inner();
        let selectors: Vec<Selector> = f
            .selectors
            .iter()
            .map(|s| Selector::raw(&s.r#type, s.value.clone()))
            .collect();
        let entries = self.registry.entries(|e| {
            (f.spiffe_id.is_empty() || e.spiffe_id == f.spiffe_id)
                && (f.parent_id.is_empty() || e.parent_id == f.parent_id)
                && continuity_common::selector::subset(&selectors, &e.selectors)
        });
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
        let stored = self
            .registry
            .update_entry(entry, &actor)
            .await
            .map_err(registry_status)?;
        tracing::info!(entry = %stored.id, "entry updated");
        Ok(Response::new(entry_to_proto(&stored)))
    }

    async fn delete_entry(
        &self,
        req: Request<DeleteEntryRequest>,
    ) -> Result<Response<DeleteEntryResponse>, Status> {
        let actor = self.authorize(&req)?;
        let id = req.into_inner().id;
        self.registry
            .delete_entry(&id, &actor)
            .await
            .map_err(registry_status)?;
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
            s => Some(self.id_in_domain("spiffe_id", s)?.to_string()),
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
            .ok_or_else(|| Status::not_found(format!("agent {id} not found")))?;
        Ok(Response::new(agent_to_proto(&a)))
    }

    async fn evict_agent(
        &self,
        req: Request<EvictAgentRequest>,
    ) -> Result<Response<EvictAgentResponse>, Status> {
        let actor = self.authorize(&req)?;
        let id = req.into_inner().spiffe_id;
        self.registry
            .evict_agent(&id, &actor)
            .await
            .map_err(registry_status)?;
        tracing::info!(agent = %id, "agent evicted");
        Ok(Response::new(EvictAgentResponse {}))
    }

    async fn ban_agent(
        &self,
        req: Request<BanAgentRequest>,
    ) -> Result<Response<BanAgentResponse>, Status> {
        let actor = self.authorize(&req)?;
        let id = req.into_inner().spiffe_id;
        self.registry
            .ban_agent(&id, &actor)
            .await
            .map_err(registry_status)?;
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
