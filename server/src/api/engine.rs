//! Engines at the API edge: the agent-facing `EngineBroker` (TLS, agent SVID, every request
//! re-authorized: the agent must host the entry, the entry must be bound to the Engine) and
//! the admin `EngineAdmin` / `AuditAdmin` services ([`admin`]).

mod admin;
mod envelope;

use std::sync::Arc;

use continuity_attestors::Selector;
use continuity_common::{Clock, TrustDomain};
use continuity_proto::engine::engine_broker_server::EngineBroker;
use continuity_proto::engine::*;
use tonic::{Request, Response, Status};

use super::agent::authenticate_agent;
use continuity_common::checksum::crc32c;

use self::envelope::{decrypt_checks, encrypt_checks, sign_checks};
use crate::engines::{EngineError, Engines, Sightings, message_or_digest};
use crate::model::engine::Incarnation as IncarnationModel;
use crate::registry::Registry;

/// Maps Engine errors to gRPC statuses.
pub fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::NotFound(m) => Status::not_found(m),
        EngineError::AlreadyExists(m) => Status::already_exists(m),
        EngineError::Invalid(m) => Status::invalid_argument(m),
        EngineError::Denied(m) => Status::permission_denied(m),
        EngineError::Precondition(m) => Status::failed_precondition(m),
        EngineError::Store(e) => super::store_status(&e),
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
    /// Incarnations recorded from the calls served here (off the hot path).
    pub sightings: Arc<Sightings>,
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

/// The operation inside a broker request (its `request` field), which must be present.
fn required<T>(request: &Option<T>) -> Result<&T, Status> {
    request
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("request is missing"))
}

/// The Engine model of a reported incarnation of an entry bound to `engine`, seen at `seen`.
fn incarnation(engine: String, agent_id: &str, inc: &Incarnation, seen: i64) -> IncarnationModel {
    let w = inc.workload.clone().unwrap_or_default();
    IncarnationModel {
        engine,
        entry_id: inc.entry_id.clone(),
        agent_id: agent_id.into(),
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
        // The server records the incarnation itself: it does not depend on the agent's report.
        if let Some(w) = w.filter(|w| !w.id.is_empty()) {
            let agent_id = agent.spiffe_id.as_str();
            let now = self.engines.sighting_time(0);
            self.sightings
                .note([&engine, entry_id, agent_id, &w.id], now, || {
                    let inc = Incarnation {
                        entry_id: entry_id.into(),
                        workload: Some(w.clone()),
                        seen_at: now,
                    };
                    incarnation(engine.clone(), agent_id, &inc, now)
                });
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
        let inner = required(&r.request)?;
        let (message_ok, digest_ok) = sign_checks(inner)?;
        let (engine, actor) = self
            .authorize(&req, &r.entry_id, &inner.engine, r.workload.as_ref())
            .await?;
        let (message, digest) =
            message_or_digest(&inner.message, &inner.digest).map_err(engine_status)?;
        let s = self
            .engines
            .sign(&engine, &inner.key, inner.version, message, digest, &actor)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(SignResponse {
            key: inner.key.clone(),
            version: s.version,
            signature_crc32c: crc32c(&s.signature),
            signature: s.signature,
            algorithm: s.algorithm.as_str().into(),
            kid: s.kid,
            verified_message_crc32c: message_ok,
            verified_digest_crc32c: digest_ok,
        }))
    }

    async fn encrypt(
        &self,
        req: Request<BrokerEncrypt>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let r = req.get_ref();
        let inner = required(&r.request)?;
        let (plaintext_ok, aad_ok) = encrypt_checks(inner)?;
        let (engine, actor) = self
            .authorize(&req, &r.entry_id, &inner.engine, r.workload.as_ref())
            .await?;
        let (version, ciphertext) = self
            .engines
            .encrypt(&engine, &inner.key, &inner.plaintext, &inner.aad, &actor)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(EncryptResponse {
            ciphertext_crc32c: crc32c(&ciphertext),
            ciphertext,
            version,
            verified_plaintext_crc32c: plaintext_ok,
            verified_aad_crc32c: aad_ok,
        }))
    }

    async fn decrypt(
        &self,
        req: Request<BrokerDecrypt>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let r = req.get_ref();
        let inner = required(&r.request)?;
        let (ciphertext_ok, aad_ok) = decrypt_checks(inner)?;
        let (engine, actor) = self
            .authorize(&req, &r.entry_id, &inner.engine, r.workload.as_ref())
            .await?;
        let (version, plaintext) = self
            .engines
            .decrypt(&engine, &inner.key, &inner.ciphertext, &inner.aad, &actor)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(DecryptResponse {
            plaintext_crc32c: crc32c(&plaintext),
            plaintext,
            version,
            verified_ciphertext_crc32c: ciphertext_ok,
            verified_aad_crc32c: aad_ok,
        }))
    }

    async fn generate_data_key(
        &self,
        req: Request<BrokerGenerateDataKey>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        self.data_key(req).await.map(Response::new)
    }

    async fn rewrap(&self, req: Request<BrokerRewrap>) -> Result<Response<RewrapResponse>, Status> {
        self.rewrap_call(req).await.map(Response::new)
    }

    async fn get_public_key(
        &self,
        req: Request<BrokerGetPublicKey>,
    ) -> Result<Response<GetPublicKeyResponse>, Status> {
        let r = req.get_ref();
        let inner = required(&r.request)?;
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
        let inner = required(&r.request)?;
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
            let seen = self.engines.sighting_time(inc.seen_at);
            self.engines
                .record_incarnation(incarnation(engine, agent.spiffe_id.as_str(), inc, seen))
                .await
                .map_err(engine_status)?;
        }
        Ok(Response::new(ReportIncarnationsResponse {}))
    }
}
