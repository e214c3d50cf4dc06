//! Engines at the API edge: the agent-facing `EngineBroker` (TLS, agent SVID, every request
//! re-authorized: the agent must host the entry, the entry must be bound to the Engine) and
//! the admin `EngineAdmin` / `AuditAdmin` services.

use std::sync::Arc;

use continuity_attestors::Selector;
use continuity_common::{Clock, TrustDomain};
use continuity_proto::admin::audit_admin_server::AuditAdmin;
use continuity_proto::admin::engine_admin_server::EngineAdmin;
use continuity_proto::admin::{self as pb_admin};
use continuity_proto::engine::engine_broker_server::EngineBroker;
use continuity_proto::engine::*;
use continuity_proto::types;
use tonic::{Request, Response, Status};

use super::admin::AdminService;
use super::agent::authenticate_agent;
use crate::engines::model::{
    Algorithm, Custody, Engine as EngineModel, EngineKey, Incarnation as IncarnationModel,
    KeyVersion, Purpose,
};
use crate::engines::{EngineError, Engines, VersionAction};
use crate::registry::Registry;

/// Maps Engine errors to gRPC statuses.
pub fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::NotFound(m) => Status::not_found(m),
        EngineError::AlreadyExists(m) => Status::already_exists(m),
        EngineError::Invalid(m) => Status::invalid_argument(m),
        EngineError::Denied(m) => Status::permission_denied(m),
        EngineError::Precondition(m) => Status::failed_precondition(m),
        EngineError::Store(e) => {
            tracing::error!(error = %e, "datastore failure");
            Status::unavailable(e.to_string())
        }
        EngineError::Key(e) => {
            tracing::error!(error = %e, "key manager failure");
            Status::internal(e.to_string())
        }
    }
}

/// PEM of a SubjectPublicKeyInfo.
pub fn public_key_pem(spki: &[u8]) -> String {
    continuity_common::x509::pem_encode("PUBLIC KEY", spki)
}

/// The agent-facing broker.
#[derive(Clone)]
pub struct BrokerService {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Entries and agents.
    pub registry: Arc<Registry>,
    /// Engines.
    pub engines: Arc<Engines>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Per-agent Engine-call rate limit.
    pub limits: Arc<super::limits::AgentRateLimits>,
}

/// Largest EngineBroker request decoded: a ReportIncarnations of the agent's up to 10,000
/// queued incarnations, or a Sign/Encrypt/Decrypt of a 64 KiB payload with its workload.
pub const MAX_BROKER_REQUEST: usize = 4 * 1024 * 1024;

/// Largest EngineBroker response encoded (a JWKS, a signature, a 64 KiB plaintext).
pub const MAX_BROKER_RESPONSE: usize = 4 * 1024 * 1024;

/// Who asks, for the audit log.
fn actor(agent: &str, spiffe_id: &str, w: Option<&Workload>) -> String {
    match w {
        Some(w) if !w.id.is_empty() => format!(
            "agent {agent} for {spiffe_id} (workload {}, uid {})",
            w.id, w.uid
        ),
        _ => format!("agent {agent} for {spiffe_id}"),
    }
}

impl BrokerService {
    /// Authenticates the agent, checks it hosts `entry_id` and that the entry is bound to an
    /// Engine (and to `requested` when given). Returns (engine, actor).
    async fn authorize<T>(
        &self,
        req: &Request<T>,
        entry_id: &str,
        requested: &str,
        w: Option<&Workload>,
    ) -> Result<(String, String), Status> {
        let agent =
            authenticate_agent(&self.trust_domain, &self.registry, self.clock.as_ref(), req)
                .await?;
        self.limits.engine_call(agent.spiffe_id.as_str())?;
        let entry = self
            .registry
            .authorized_entry(&agent, entry_id)
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "agent {} does not host entry {entry_id}",
                    agent.spiffe_id
                ))
            })?;
        let engine = entry.engine.clone().ok_or_else(|| {
            Status::permission_denied(format!("entry {entry_id} is not bound to an Engine"))
        })?;
        if !requested.is_empty() && requested != engine {
            return Err(Status::permission_denied(format!(
                "entry {entry_id} is bound to Engine {engine}, not {requested}"
            )));
        }
        Ok((
            engine,
            actor(agent.spiffe_id.as_str(), entry.spiffe_id.as_str(), w),
        ))
    }
}

#[tonic::async_trait]
impl EngineBroker for BrokerService {
    async fn sign(&self, req: Request<BrokerSign>) -> Result<Response<SignResponse>, Status> {
        let r = req.get_ref();
        let inner = r
            .request
            .clone()
            .ok_or_else(|| Status::invalid_argument("request is missing"))?;
        let (engine, actor) = self
            .authorize(&req, &r.entry_id, &inner.engine, r.workload.as_ref())
            .await?;
        let (message, digest) = match (inner.message.is_empty(), inner.digest.is_empty()) {
            (false, true) => (Some(inner.message.as_slice()), None),
            (true, false) => (None, Some(inner.digest.as_slice())),
            _ => {
                return Err(Status::invalid_argument(
                    "give exactly one of message and digest",
                ));
            }
        };
        let s = self
            .engines
            .sign(&engine, &inner.key, inner.version, message, digest, &actor)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(SignResponse {
            key: inner.key,
            version: s.version,
            signature: s.signature,
            algorithm: s.algorithm.as_str().into(),
            kid: s.kid,
        }))
    }

    async fn encrypt(
        &self,
        req: Request<BrokerEncrypt>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let r = req.get_ref();
        let inner = r
            .request
            .clone()
            .ok_or_else(|| Status::invalid_argument("request is missing"))?;
        let (engine, actor) = self
            .authorize(&req, &r.entry_id, &inner.engine, r.workload.as_ref())
            .await?;
        let (version, ciphertext) = self
            .engines
            .encrypt(&engine, &inner.key, &inner.plaintext, &inner.aad, &actor)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(EncryptResponse {
            ciphertext,
            version,
        }))
    }

    async fn decrypt(
        &self,
        req: Request<BrokerDecrypt>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let r = req.get_ref();
        let inner = r
            .request
            .clone()
            .ok_or_else(|| Status::invalid_argument("request is missing"))?;
        let (engine, actor) = self
            .authorize(&req, &r.entry_id, &inner.engine, r.workload.as_ref())
            .await?;
        let (version, plaintext) = self
            .engines
            .decrypt(&engine, &inner.key, &inner.ciphertext, &inner.aad, &actor)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(DecryptResponse { plaintext, version }))
    }

    async fn get_public_key(
        &self,
        req: Request<BrokerGetPublicKey>,
    ) -> Result<Response<GetPublicKeyResponse>, Status> {
        let r = req.get_ref();
        let inner = r
            .request
            .clone()
            .ok_or_else(|| Status::invalid_argument("request is missing"))?;
        let (engine, _) = self
            .authorize(&req, &r.entry_id, &inner.engine, None)
            .await?;
        let pk = self
            .engines
            .public_key(&engine, &inner.key, inner.version)
            .map_err(engine_status)?;
        Ok(Response::new(GetPublicKeyResponse {
            pem: public_key_pem(&pk.spki),
            version: pk.version,
            algorithm: pk.algorithm.as_str().into(),
            kid: pk.kid,
        }))
    }

    async fn fetch_secret(
        &self,
        req: Request<BrokerFetchSecret>,
    ) -> Result<Response<FetchSecretResponse>, Status> {
        let r = req.get_ref();
        let inner = r
            .request
            .clone()
            .ok_or_else(|| Status::invalid_argument("request is missing"))?;
        let (engine, actor) = self
            .authorize(&req, &r.entry_id, &inner.engine, r.workload.as_ref())
            .await?;
        let (version, value) = self
            .engines
            .fetch_secret(&engine, &inner.name, &actor)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(FetchSecretResponse { value, version }))
    }

    async fn get_engine_jwks(
        &self,
        req: Request<BrokerJwks>,
    ) -> Result<Response<EngineJwks>, Status> {
        let (engine, _) = self
            .authorize(&req, &req.get_ref().entry_id, "", None)
            .await?;
        let jwks = self.engines.jwks(&engine).map_err(engine_status)?;
        let keys = self
            .engines
            .public_keys(&engine)
            .map_err(engine_status)?
            .into_iter()
            .map(|k| EnginePublicKey {
                key: k.key,
                version: k.version,
                kid: k.kid,
                algorithm: k.algorithm.as_str().into(),
                public_key: k.spki,
            })
            .collect();
        Ok(Response::new(EngineJwks {
            engine,
            jwks: jwks.to_string().into_bytes(),
            keys,
        }))
    }

    async fn report_incarnations(
        &self,
        req: Request<ReportIncarnationsRequest>,
    ) -> Result<Response<ReportIncarnationsResponse>, Status> {
        let agent = authenticate_agent(
            &self.trust_domain,
            &self.registry,
            self.clock.as_ref(),
            &req,
        )
        .await?;
        self.limits.engine_call(agent.spiffe_id.as_str())?;
        for inc in &req.get_ref().incarnations {
            // Only entries this agent hosts, bound to an Engine, count.
            let Some(entry) = self.registry.authorized_entry(&agent, &inc.entry_id) else {
                continue;
            };
            let Some(engine) = entry.engine.clone() else {
                continue;
            };
            let w = inc.workload.clone().unwrap_or_default();
            let seen = if inc.seen_at > 0 {
                inc.seen_at.min(self.clock.unix())
            } else {
                self.clock.unix()
            };
            self.engines
                .record_incarnation(IncarnationModel {
                    engine,
                    entry_id: inc.entry_id.clone(),
                    agent_id: agent.spiffe_id.to_string(),
                    workload_id: w.id,
                    pid: w.pid,
                    uid: w.uid,
                    selectors: w
                        .selectors
                        .iter()
                        .map(|s| Selector::raw(&s.r#type, s.value.clone()))
                        .collect(),
                    first_seen: seen,
                    last_seen: seen,
                })
                .await
                .map_err(engine_status)?;
        }
        Ok(Response::new(ReportIncarnationsResponse {}))
    }
}

fn engine_pb(e: &EngineModel) -> pb_admin::Engine {
    pb_admin::Engine {
        name: e.name.clone(),
        spiffe_id: e.spiffe_id.clone(),
        tier: e.tier,
        custody: e.custody.as_str().into(),
        exposure_override: e.exposure_override,
        created_at: e.created_at,
    }
}

fn key_pb(k: &EngineKey, versions: &[KeyVersion]) -> pb_admin::EngineKey {
    pb_admin::EngineKey {
        engine: k.engine.clone(),
        name: k.name.clone(),
        purpose: k.algorithm.purpose().as_str().into(),
        algorithm: k.algorithm.as_str().into(),
        custody: k.custody.as_str().into(),
        primary_version: k.primary_version,
        rotation_period: k.rotation_period,
        destroy_grace: k.destroy_grace,
        versions: versions
            .iter()
            .map(|v| pb_admin::KeyVersion {
                version: v.version,
                state: v.state.as_str().into(),
                kid: v.kid.clone(),
                created_at: v.created_at,
                destroy_at: v.destroy_at,
                encryptions: v.encryptions,
            })
            .collect(),
    }
}

fn parse<T: std::str::FromStr<Err = String>>(s: &str) -> Result<T, Status> {
    s.parse().map_err(Status::invalid_argument)
}

#[tonic::async_trait]
impl EngineAdmin for AdminService {
    async fn create_engine(
        &self,
        req: Request<pb_admin::CreateEngineRequest>,
    ) -> Result<Response<pb_admin::Engine>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let custody = match r.custody.as_str() {
            "" => None,
            c => Some(parse::<Custody>(c)?),
        };
        let spiffe_id = Some(r.spiffe_id.as_str()).filter(|s| !s.is_empty());
        let e = self
            .engines
            .create_engine(
                &r.name,
                r.tier,
                custody,
                spiffe_id,
                r.allow_exposure,
                &actor,
            )
            .await
            .map_err(engine_status)?;
        Ok(Response::new(engine_pb(&e)))
    }

    async fn get_engine(
        &self,
        req: Request<pb_admin::GetEngineRequest>,
    ) -> Result<Response<pb_admin::Engine>, Status> {
        self.authorize(&req)?;
        let e = self
            .engines
            .engine(&req.get_ref().name)
            .map_err(engine_status)?;
        Ok(Response::new(engine_pb(&e)))
    }

    async fn list_engines(
        &self,
        req: Request<pb_admin::ListEnginesRequest>,
    ) -> Result<Response<pb_admin::ListEnginesResponse>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(pb_admin::ListEnginesResponse {
            engines: self.engines.engines().iter().map(engine_pb).collect(),
        }))
    }

    async fn list_incarnations(
        &self,
        req: Request<pb_admin::ListIncarnationsRequest>,
    ) -> Result<Response<pb_admin::ListIncarnationsResponse>, Status> {
        self.authorize(&req)?;
        let list = self
            .engines
            .incarnations(&req.get_ref().engine)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(pb_admin::ListIncarnationsResponse {
            incarnations: list
                .into_iter()
                .map(|i| pb_admin::IncarnationRecord {
                    engine: i.engine,
                    entry_id: i.entry_id,
                    agent_id: i.agent_id,
                    workload_id: i.workload_id,
                    pid: i.pid,
                    uid: i.uid,
                    selectors: i
                        .selectors
                        .into_iter()
                        .map(|s| types::Selector {
                            r#type: s.kind,
                            value: s.value,
                        })
                        .collect(),
                    first_seen: i.first_seen,
                    last_seen: i.last_seen,
                })
                .collect(),
        }))
    }

    async fn create_key(
        &self,
        req: Request<pb_admin::CreateKeyRequest>,
    ) -> Result<Response<pb_admin::EngineKey>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let purpose = parse::<Purpose>(&r.purpose)?;
        let algorithm = match r.algorithm.as_str() {
            "" => None,
            a => Some(parse::<Algorithm>(a)?),
        };
        let k = self
            .engines
            .create_key(
                &r.engine,
                &r.name,
                purpose,
                algorithm,
                r.rotation_period,
                r.destroy_grace,
                &actor,
            )
            .await
            .map_err(engine_status)?;
        let (k, v) = self
            .engines
            .key(&k.engine, &k.name)
            .map_err(engine_status)?;
        Ok(Response::new(key_pb(&k, &v)))
    }

    async fn list_keys(
        &self,
        req: Request<pb_admin::ListKeysRequest>,
    ) -> Result<Response<pb_admin::ListKeysResponse>, Status> {
        self.authorize(&req)?;
        let keys = self
            .engines
            .keys(&req.get_ref().engine)
            .map_err(engine_status)?;
        Ok(Response::new(pb_admin::ListKeysResponse {
            keys: keys.iter().map(|(k, v)| key_pb(k, v)).collect(),
        }))
    }

    async fn rotate_key(
        &self,
        req: Request<pb_admin::RotateKeyRequest>,
    ) -> Result<Response<pb_admin::EngineKey>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        self.engines
            .rotate(&r.engine, &r.name, &actor)
            .await
            .map_err(engine_status)?;
        let (k, v) = self
            .engines
            .key(&r.engine, &r.name)
            .map_err(engine_status)?;
        Ok(Response::new(key_pb(&k, &v)))
    }

    async fn set_key_version_state(
        &self,
        req: Request<pb_admin::SetKeyVersionStateRequest>,
    ) -> Result<Response<pb_admin::EngineKey>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let action = parse::<VersionAction>(&r.action)?;
        self.engines
            .set_state(&r.engine, &r.name, r.version, action, &actor)
            .await
            .map_err(engine_status)?;
        let (k, v) = self
            .engines
            .key(&r.engine, &r.name)
            .map_err(engine_status)?;
        Ok(Response::new(key_pb(&k, &v)))
    }

    async fn put_secret(
        &self,
        req: Request<pb_admin::PutSecretRequest>,
    ) -> Result<Response<pb_admin::PutSecretResponse>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let version = self
            .engines
            .put_secret(&r.engine, &r.name, &r.value, &actor)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(pb_admin::PutSecretResponse { version }))
    }
}

#[tonic::async_trait]
impl AuditAdmin for AdminService {
    async fn show_audit(
        &self,
        req: Request<pb_admin::ShowAuditRequest>,
    ) -> Result<Response<pb_admin::ShowAuditResponse>, Status> {
        self.authorize(&req)?;
        let records = self
            .engines
            .audit()
            .records(req.get_ref().limit)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb_admin::ShowAuditResponse {
            records: records
                .into_iter()
                .map(|r| pb_admin::AuditRecord {
                    seq: r.seq,
                    time: r.time,
                    actor: r.actor,
                    action: r.action,
                    target: r.target,
                    key_version: r.key_version,
                    result: r.result,
                    hash: r.hash,
                })
                .collect(),
        }))
    }

    async fn verify_audit(
        &self,
        req: Request<pb_admin::VerifyAuditRequest>,
    ) -> Result<Response<pb_admin::VerifyAuditResponse>, Status> {
        self.authorize(&req)?;
        let v = self
            .engines
            .audit()
            .verify()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let (bad_seq, reason) = v.problem.clone().unwrap_or_default();
        Ok(Response::new(pb_admin::VerifyAuditResponse {
            ok: v.problem.is_none(),
            records: v.records,
            bad_seq,
            reason,
        }))
    }
}
