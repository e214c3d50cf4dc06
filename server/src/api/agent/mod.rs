//! `continuity.agent.v1.AgentAPI`: node attestation, agent SVID renewal, entry sync, and SVID
//! signing. After attestation every call is authenticated by the agent SVID presented in the
//! TLS handshake, and every request is re-authorized against the registry.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use continuity_attestors::join_token;
use continuity_common::{Clock, TrustDomain};
use continuity_proto::agent::agent_api_server::AgentApi;
use continuity_proto::agent::{
    AttestAgentRequest, AttestAgentResponse, BatchNewX509svidRequest, BatchNewX509svidResponse,
    BatchNewX509svidResult, FetchBundleRequest, FetchBundleResponse, NewJwtsvidRequest,
    NewJwtsvidResponse, RenewAgentRequest, RenewAgentResponse, SyncAuthorizedEntriesRequest,
    SyncAuthorizedEntriesResponse, attest_agent_request, attest_agent_response,
};
use continuity_proto::types;
use futures_util::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::tls::PeerCerts;
use super::{bundle_to_proto, ca_status, entry_to_proto, registry_status};
use crate::ca::CaManager;
use crate::datastore::{AgentRecord, DataStore};
use crate::metrics::Metrics;
use crate::registry::Registry;

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
    /// Datastore (join tokens).
    pub store: Arc<dyn DataStore>,
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
}

/// SHA-256 of a join token, hex: the only form in which tokens are stored.
pub fn token_hash(token: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        token.as_bytes(),
    ))
}

fn x509_svid(spiffe_id: &str, svid: crate::ca::SignedSvid) -> types::X509svid {
    types::X509svid {
        spiffe_id: spiffe_id.to_string(),
        cert_chain: vec![svid.cert_der],
        expires_at: svid.expires_at,
    }
}

/// Authenticates an agent-API caller by its agent SVID and returns its current record:
/// the SVID must be unexpired, of an attested, unbanned agent, and current (or the previous
/// one, briefly: see [`Registry::authenticate_agent`]; a superseded one flags a fork).
pub async fn authenticate_agent<T>(
    trust_domain: &TrustDomain,
    registry: &Registry,
    clock: &dyn Clock,
    req: &Request<T>,
) -> Result<AgentRecord, Status> {
    Ok(authenticate_serial(trust_domain, registry, clock, req)
        .await?
        .0)
}

/// [`authenticate_agent`], also returning the serial the caller presented.
async fn authenticate_serial<T>(
    trust_domain: &TrustDomain,
    registry: &Registry,
    clock: &dyn Clock,
    req: &Request<T>,
) -> Result<(AgentRecord, String), Status> {
    let leaf = req
        .extensions()
        .get::<PeerCerts>()
        .and_then(|p| p.0.first().cloned())
        .ok_or_else(|| Status::unauthenticated("this call needs an agent SVID; attest first"))?;
    let (id, not_after, serial) = continuity_common::x509::svid_facts(&leaf)
        .map_err(|e| Status::unauthenticated(format!("agent SVID: {e}")))?;
    if id.trust_domain() != *trust_domain || !id.path().starts_with("/continuity/agent/") {
        return Err(Status::permission_denied(format!(
            "{id} is not an agent of this trust domain"
        )));
    }
    // A long-lived connection can outlive the certificate it was opened with.
    if not_after <= clock.unix() {
        return Err(Status::unauthenticated(
            "agent SVID has expired; reconnect with a renewed SVID",
        ));
    }
    let (agent, _) = registry
        .authenticate_agent(id.as_str(), &serial)
        .await
        .map_err(registry_status)?;
    Ok((agent, serial))
}

impl AgentService {
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<AgentRecord, Status> {
        authenticate_agent(&self.trust_domain, &self.registry, self.clock.as_ref(), req).await
    }

    async fn sign_agent_svid(
        &self,
        agent_id: &str,
        csr: Vec<u8>,
    ) -> Result<crate::ca::SignedSvid, Status> {
        let (ca, id, ttl) = (self.ca.clone(), agent_id.to_string(), self.x509_ttl);
        tokio::task::spawn_blocking(move || ca.sign_x509_svid_from_csr(&id, &csr, ttl, &[]))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(ca_status)
    }

    async fn attest_join_token(
        &self,
        token: &[u8],
        csr: Vec<u8>,
    ) -> Result<AttestAgentResponse, Status> {
        let token = std::str::from_utf8(token)
            .map_err(|_| Status::invalid_argument("join token is not UTF-8"))?;
        // Validate the CSR before consuming the token, so a malformed request does not burn it.
        crate::ca::profile::csr_public_key(&csr).map_err(ca_status)?;
        let record = self
            .store
            .take_join_token(&token_hash(token))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| {
                Status::permission_denied("join token does not exist or has already been used")
            })?;
        let now = self.clock.unix();
        if record.expires_at < now {
            return Err(Status::permission_denied(format!(
                "join token expired {}s ago; generate a new one",
                now - record.expires_at
            )));
        }
        let agent_id = self
            .trust_domain
            .id(&join_token::agent_path(&record.id))
            .map_err(|e| Status::internal(e.to_string()))?;
        let agent_id = agent_id.to_string();
        let response = self
            .issue_agent(&agent_id, join_token::ATTESTOR_TYPE, record.alias, csr)
            .await?;
        tracing::info!(agent = %agent_id, "agent attested with a join token");
        Ok(response)
    }

    /// The common end of every node attestation: refuses banned agents, signs the agent SVID
    /// from the CSR, records (or refreshes) the agent, and answers with SVID and bundle.
    async fn issue_agent(
        &self,
        agent_id: &str,
        attestation_type: &str,
        alias: Option<String>,
        csr: Vec<u8>,
    ) -> Result<AttestAgentResponse, Status> {
        let existing = self.registry.agent(agent_id);
        if existing.as_ref().is_some_and(|a| a.banned) {
            return Err(Status::permission_denied(format!(
                "agent {agent_id} is banned"
            )));
        }
        let svid = self.sign_agent_svid(agent_id, csr).await?;
        let now = self.clock.unix();
        let serial =
            continuity_common::x509::serial_hex(&svid.cert_der).map_err(Status::internal)?;
        // A compare-and-set on what was read above: a ban or eviction that landed while the
        // SVID was being signed wins, and the SVID is never handed out.
        self.registry
            .attest_agent(
                existing,
                AgentRecord {
                    spiffe_id: agent_id.to_string(),
                    attestation_type: attestation_type.into(),
                    serial,
                    previous_serial: String::new(),
                    expires_at: svid.expires_at,
                    banned: false,
                    alias,
                    created_at: now,
                    last_seen: now,
                    revision: 0,
                    serial_first_used: 0,
                    forked: false,
                    forked_at: 0,
                },
                self.x509_ttl,
            )
            .await
            .map_err(registry_status)?;
        Ok(AttestAgentResponse {
            step: Some(attest_agent_response::Step::Result(
                attest_agent_response::Result {
                    svid: Some(x509_svid(agent_id, svid)),
                    bundle: Some(bundle_to_proto(&self.ca.bundle())),
                },
            )),
        })
    }

    async fn attest_psat(
        &self,
        payload: Vec<u8>,
        csr: Vec<u8>,
    ) -> Result<AttestAgentResponse, Status> {
        crate::ca::profile::csr_public_key(&csr).map_err(ca_status)?;
        let (validator, now) = (self.psat_clusters.clone(), self.clock.unix());
        let a = tokio::task::spawn_blocking(move || validator.validate(&payload, now))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| match e {
                continuity_attestors::k8s_psat::PsatError::Validator(_) => {
                    Status::unavailable(e.to_string())
                }
                other => Status::permission_denied(other.to_string()),
            })?;
        let agent_id = self
            .trust_domain
            .id(&a.agent_path())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let agent_id = agent_id.to_string();
        let response = self
            .issue_agent(
                &agent_id,
                continuity_attestors::k8s_psat::ATTESTOR_TYPE,
                None,
                csr,
            )
            .await?;
        let selectors: Vec<String> = a.selectors().iter().map(|s| s.to_string()).collect();
        tracing::info!(agent = %agent_id, ?selectors, "agent attested with k8s_psat");
        Ok(response)
    }

    fn sign_batch(
        &self,
        agent: &AgentRecord,
        params: Vec<continuity_proto::agent::NewX509svidParams>,
    ) -> Vec<BatchNewX509svidResult> {
        params
            .into_iter()
            .map(|p| {
                let fail = |code: tonic::Code, message: String| BatchNewX509svidResult {
                    entry_id: p.entry_id.clone(),
                    status: Some(continuity_proto::agent::Status {
                        code: code as i32,
                        message,
                    }),
                    svid: None,
                };
                let Some(entry) = self.registry.authorized_entry(agent, &p.entry_id) else {
                    return fail(
                        tonic::Code::PermissionDenied,
                        format!(
                            "entry {} is not authorized for agent {}",
                            p.entry_id, agent.spiffe_id
                        ),
                    );
                };
                let ttl = match entry.x509_svid_ttl {
                    t if t > 0 => Duration::from_secs(t as u64),
                    _ => self.x509_ttl,
                };
                match self.ca.sign_x509_svid_from_csr(
                    &entry.spiffe_id,
                    &p.csr,
                    ttl,
                    &entry.dns_names,
                ) {
                    Ok(svid) => BatchNewX509svidResult {
                        entry_id: p.entry_id.clone(),
                        status: Some(continuity_proto::agent::Status {
                            code: 0,
                            message: String::new(),
                        }),
                        svid: Some(x509_svid(&entry.spiffe_id, svid)),
                    },
                    Err(e @ crate::ca::CaError::Csr(_)) => {
                        fail(tonic::Code::InvalidArgument, e.to_string())
                    }
                    Err(e) => fail(tonic::Code::Internal, e.to_string()),
                }
            })
            .collect()
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentApi for AgentService {
    type AttestAgentStream = ResponseStream<AttestAgentResponse>;

    async fn attest_agent(
        &self,
        req: Request<Streaming<AttestAgentRequest>>,
    ) -> Result<Response<Self::AttestAgentStream>, Status> {
        // Only the first message is ever read (its size bounded by the service's decoding
        // limit); a client that never sends it is cut off at the deadline.
        let mut stream = req.into_inner();
        let wait = self.first_message_timeout;
        let first = tokio::time::timeout(wait, stream.message())
            .await
            .map_err(|_| {
                self.metrics.inc(&self.metrics.attestations_failed);
                tracing::info!("agent attestation refused: no first message in time");
                Status::deadline_exceeded(format!(
                    "no AttestAgent params within {} (agent_api.first_message_timeout)",
                    continuity_common::duration::format(wait)
                ))
            })??
            .ok_or_else(|| {
                Status::invalid_argument("AttestAgent needs a first message with params")
            })?;
        drop(stream);
        let Some(attest_agent_request::Step::Params(params)) = first.step else {
            return Err(Status::invalid_argument(
                "the first AttestAgent message must carry params",
            ));
        };
        let data = params
            .data
            .ok_or_else(|| Status::invalid_argument("params.data (attestation data) is missing"))?;
        let result = match data.r#type.as_str() {
            join_token::ATTESTOR_TYPE => self.attest_join_token(&data.payload, params.csr).await,
            continuity_attestors::k8s_psat::ATTESTOR_TYPE if !self.psat_clusters.is_empty() => {
                self.attest_psat(data.payload, params.csr).await
            }
            other => Err(Status::invalid_argument(format!(
                "unknown or unconfigured node attestor {other:?} (this server accepts: join_token{})",
                if self.psat_clusters.is_empty() {
                    ""
                } else {
                    ", k8s_psat"
                }
            ))),
        };
        match &result {
            Ok(_) => self.metrics.inc(&self.metrics.attestations_ok),
            Err(s) => {
                self.metrics.inc(&self.metrics.attestations_failed);
                tracing::info!(reason = s.message(), "agent attestation refused");
            }
        }
        let msg = result?;
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(msg)))))
    }

    async fn renew_agent(
        &self,
        req: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        let (agent, presented) = authenticate_serial(
            &self.trust_domain,
            &self.registry,
            self.clock.as_ref(),
            &req,
        )
        .await?;
        self.limits.sign(&agent.spiffe_id, 1)?;
        let id = agent.spiffe_id.clone();
        let svid = self.sign_agent_svid(&id, req.into_inner().csr).await?;
        let serial =
            continuity_common::x509::serial_hex(&svid.cert_der).map_err(Status::internal)?;
        // A compare-and-set on the record read before signing: a ban or eviction that landed
        // meanwhile wins, and the new SVID is never handed out.
        self.registry
            .renew_agent(agent, &presented, &serial, svid.expires_at)
            .await
            .map_err(registry_status)?;
        Ok(Response::new(RenewAgentResponse {
            svid: Some(x509_svid(&id, svid)),
        }))
    }

    async fn sync_authorized_entries(
        &self,
        req: Request<SyncAuthorizedEntriesRequest>,
    ) -> Result<Response<SyncAuthorizedEntriesResponse>, Status> {
        let agent = self.authenticate(&req).await?;
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
        let agent = self.authenticate(&req).await?;
        let params = req.into_inner().params;
        if params.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} CSRs in one call; at most {MAX_BATCH} are accepted",
                params.len()
            )));
        }
        self.limits.sign(&agent.spiffe_id, params.len())?;
        // Signing may touch an HSM and is CPU-bound: split the batch across blocking threads.
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(params.len().div_ceil(16))
            .max(1);
        let chunk = params.len().div_ceil(workers).max(1);
        let mut tasks = Vec::with_capacity(workers);
        let mut params = params.into_iter();
        loop {
            let part: Vec<_> = params.by_ref().take(chunk).collect();
            if part.is_empty() {
                break;
            }
            let (me, agent) = (self.clone(), agent.clone());
            tasks.push(tokio::task::spawn_blocking(move || {
                me.sign_batch(&agent, part)
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.extend(t.await.map_err(|e| Status::internal(e.to_string()))?);
        }
        let signed = results.iter().filter(|r| r.svid.is_some()).count() as u64;
        self.metrics.add(&self.metrics.x509_svids_signed, signed);
        Ok(Response::new(BatchNewX509svidResponse { results }))
    }

    async fn new_jwtsvid(
        &self,
        req: Request<NewJwtsvidRequest>,
    ) -> Result<Response<NewJwtsvidResponse>, Status> {
        let agent = self.authenticate(&req).await?;
        self.limits.sign(&agent.spiffe_id, 1)?;
        let r = req.into_inner();
        if r.audience.is_empty() || r.audience.iter().any(|a| a.is_empty()) {
            return Err(Status::invalid_argument(
                "at least one non-empty audience is required",
            ));
        }
        let entry = self
            .registry
            .authorized_entry(&agent, &r.entry_id)
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "entry {} is not authorized for agent {}",
                    r.entry_id, agent.spiffe_id
                ))
            })?;
        let ttl = match entry.jwt_svid_ttl {
            t if t > 0 => Duration::from_secs(t as u64),
            _ => self.jwt_ttl,
        };
        let (ca, sub, aud) = (self.ca.clone(), entry.spiffe_id.clone(), r.audience);
        let (token, expires_at) =
            tokio::task::spawn_blocking(move || ca.sign_jwt_svid(&sub, &aud, ttl))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(ca_status)?;
        self.metrics.inc(&self.metrics.jwt_svids_signed);
        Ok(Response::new(NewJwtsvidResponse {
            spiffe_id: entry.spiffe_id.clone(),
            token,
            issued_at: self.clock.unix(),
            expires_at,
        }))
    }

    async fn fetch_bundle(
        &self,
        req: Request<FetchBundleRequest>,
    ) -> Result<Response<FetchBundleResponse>, Status> {
        self.authenticate(&req).await?;
        Ok(Response::new(FetchBundleResponse {
            bundle: Some(bundle_to_proto(&self.ca.bundle())),
        }))
    }
}

#[cfg(test)]
mod tests {
    //! The renewal race: a RenewAgent whose signing blocks while the operator bans or evicts
    //! the agent must not write its stale record back (real SQLite, in process).

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::SystemTime;

    use async_trait::async_trait;
    use continuity_common::ManualClock;
    use rustls_pki_types::CertificateDer;

    use super::*;
    use crate::audit::Audit;
    use crate::ca::CaConfig;
    use crate::datastore::SqlDataStore;
    use crate::keys::{Kek, KeyError, KeyHandle, KeyManager, KeyType, MemoryKeyManager};

    /// Makes the next signature wait at `entered`, then at `release`.
    #[derive(Debug)]
    struct Gate {
        armed: AtomicBool,
        entered: Barrier,
        release: Barrier,
    }

    impl Gate {
        fn pass(&self) {
            if self.armed.swap(false, Ordering::SeqCst) {
                self.entered.wait();
                self.release.wait();
            }
        }
    }

    #[derive(Debug)]
    struct GatedKey(Arc<dyn KeyHandle>, Arc<Gate>);

    impl KeyHandle for GatedKey {
        fn id(&self) -> &str {
            self.0.id()
        }
        fn key_type(&self) -> KeyType {
            self.0.key_type()
        }
        fn public_key_raw(&self) -> &[u8] {
            self.0.public_key_raw()
        }
        fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
            self.1.pass();
            self.0.sign(msg)
        }
        fn sign_digest(&self, digest: &[u8]) -> Result<Vec<u8>, KeyError> {
            self.1.pass();
            self.0.sign_digest(digest)
        }
    }

    /// A memory key manager whose keys sign through the gate.
    #[derive(Debug)]
    struct GatedKeys(MemoryKeyManager, Arc<Gate>);

    #[async_trait]
    impl KeyManager for GatedKeys {
        fn kind(&self) -> &'static str {
            "memory"
        }
        async fn generate(&self, id: &str, kt: KeyType) -> Result<Arc<dyn KeyHandle>, KeyError> {
            let k = self.0.generate(id, kt).await?;
            Ok(Arc::new(GatedKey(k, self.1.clone())))
        }
        async fn get(&self, id: &str) -> Result<Option<Arc<dyn KeyHandle>>, KeyError> {
            Ok(self
                .0
                .get(id)
                .await?
                .map(|k| Arc::new(GatedKey(k, self.1.clone())) as Arc<dyn KeyHandle>))
        }
        async fn delete(&self, id: &str) -> Result<(), KeyError> {
            self.0.delete(id).await
        }
        async fn kek(&self, id: &str) -> Result<Arc<dyn Kek>, KeyError> {
            self.0.kek(id).await
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    struct Fixture {
        dir: std::path::PathBuf,
        url: String,
        svc: AgentService,
        gate: Arc<Gate>,
        clock: Arc<ManualClock>,
    }

    async fn fixture() -> Fixture {
        let (dir, url, store) = crate::datastore::scratch_sqlite("agentrace").await;
        let store: Arc<dyn DataStore> = Arc::new(store);
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let gate = Arc::new(Gate {
            armed: AtomicBool::new(false),
            entered: Barrier::new(2),
            release: Barrier::new(2),
        });
        let td = TrustDomain::new("example.org").unwrap();
        let ca = CaManager::start(
            CaConfig {
                trust_domain: td.clone(),
                x509_key_type: KeyType::EcP256,
                jwt_key_type: KeyType::EcP256,
                ttl: Duration::from_secs(24 * 3600),
                jwt_issuer: None,
            },
            Arc::new(GatedKeys(MemoryKeyManager::default(), gate.clone())),
            store.clone(),
            clock.clone(),
        )
        .await
        .unwrap();
        let audit = Audit::load(store.clone(), clock.clone()).await.unwrap();
        let metrics = Arc::new(Metrics::default());
        let registry = Arc::new(
            Registry::load(store.clone(), clock.clone(), audit, metrics.clone())
                .await
                .unwrap(),
        );
        let svc = AgentService {
            trust_domain: td,
            ca,
            registry,
            store,
            clock: clock.clone(),
            x509_ttl: Duration::from_secs(3600),
            jwt_ttl: Duration::from_secs(300),
            metrics: metrics.clone(),
            psat_clusters: Arc::new(continuity_attestors::k8s_psat::Validator::new(vec![])),
            limits: Arc::new(crate::api::limits::AgentRateLimits::new(
                &crate::config::AgentApiConfig::default(),
                metrics,
            )),
            first_message_timeout: Duration::from_secs(10),
        };
        Fixture {
            dir,
            url,
            svc,
            gate,
            clock,
        }
    }

    fn csr() -> Vec<u8> {
        let kp = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&kp)
            .unwrap()
            .der()
            .to_vec()
    }

    /// Attests an agent; returns its ID and agent SVID (leaf DER).
    async fn attested(svc: &AgentService) -> (String, Vec<u8>) {
        let id = "spiffe://example.org/continuity/agent/join_token/race";
        let r = svc
            .issue_agent(id, join_token::ATTESTOR_TYPE, None, csr())
            .await
            .unwrap();
        let Some(attest_agent_response::Step::Result(r)) = r.step else {
            panic!("no result");
        };
        (id.to_string(), r.svid.unwrap().cert_chain[0].clone())
    }

    fn renew_request(leaf: &[u8]) -> Request<RenewAgentRequest> {
        let mut req = Request::new(RenewAgentRequest { csr: csr() });
        req.extensions_mut()
            .insert(PeerCerts(Arc::new(vec![CertificateDer::from(
                leaf.to_vec(),
            )])));
        req
    }

    /// Starts a renewal, waits until it is signing, runs `land`, releases the signer, and
    /// returns the renewal's outcome.
    async fn race<F: std::future::Future<Output = ()>>(
        f: &Fixture,
        leaf: &[u8],
        land: F,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        f.gate.armed.store(true, Ordering::SeqCst);
        let svc = f.svc.clone();
        let req = renew_request(leaf);
        let renewal = tokio::spawn(async move { svc.renew_agent(req).await });
        let gate = f.gate.clone();
        tokio::task::spawn_blocking(move || gate.entered.wait())
            .await
            .unwrap();
        land.await;
        let gate = f.gate.clone();
        tokio::task::spawn_blocking(move || gate.release.wait())
            .await
            .unwrap();
        renewal.await.unwrap()
    }

    async fn reloaded(f: &Fixture, id: &str) -> Option<AgentRecord> {
        let store = SqlDataStore::connect(&f.url).await.unwrap();
        store.get_agent(id).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ban_landing_during_renewal_stands() {
        let f = fixture().await;
        let (id, leaf) = attested(&f.svc).await;
        let registry = f.svc.registry.clone();
        let target = id.clone();
        let out = race(&f, &leaf, async move {
            registry.ban_agent(&target, "admin uid 0").await.unwrap();
        })
        .await;
        let err = out.expect_err("the renewal must fail once the ban landed");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("banned"), "{}", err.message());
        assert!(f.svc.registry.agent(&id).unwrap().banned, "index");
        assert!(reloaded(&f, &id).await.unwrap().banned, "database");
        // And it stays refused.
        let again = f.svc.renew_agent(renew_request(&leaf)).await.unwrap_err();
        assert!(again.message().contains("banned"), "{}", again.message());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_eviction_landing_during_renewal_stands() {
        let f = fixture().await;
        let (id, leaf) = attested(&f.svc).await;
        let registry = f.svc.registry.clone();
        let target = id.clone();
        let out = race(&f, &leaf, async move {
            registry.evict_agent(&target, "admin uid 0").await.unwrap();
        })
        .await;
        let err = out.expect_err("the renewal must fail once the eviction landed");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(
            err.message().contains("not attested (evicted?)"),
            "{}",
            err.message()
        );
        assert!(f.svc.registry.agent(&id).is_none(), "index");
        assert!(reloaded(&f, &id).await.is_none(), "database");
    }

    #[tokio::test]
    async fn re_attesting_over_a_live_agent_is_audited_as_a_takeover() {
        let f = fixture().await;
        let (id, _) = attested(&f.svc).await;
        let audit = f.svc.store.list_audit().await.unwrap();
        assert!(!audit.iter().any(|r| r.action == "agent.takeover"));
        attested(&f.svc).await;
        let audit = f.svc.store.list_audit().await.unwrap();
        let t = audit
            .iter()
            .find(|r| r.action == "agent.takeover")
            .expect("takeover audited");
        assert_eq!(
            (t.actor.as_str(), t.target.as_str()),
            ("server", id.as_str())
        );
        // A node whose agent is long gone (its SVID expired) is not a takeover.
        f.clock.advance(Duration::from_secs(2 * 3600));
        attested(&f.svc).await;
        let n = f
            .svc
            .store
            .list_audit()
            .await
            .unwrap()
            .iter()
            .filter(|r| r.action == "agent.takeover")
            .count();
        assert_eq!(n, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ban_landing_during_re_attestation_stands() {
        let f = fixture().await;
        let (id, _) = attested(&f.svc).await;
        f.gate.armed.store(true, Ordering::SeqCst);
        let svc = f.svc.clone();
        let target = id.clone();
        let attest = tokio::spawn(async move {
            svc.issue_agent(&target, join_token::ATTESTOR_TYPE, None, csr())
                .await
        });
        let gate = f.gate.clone();
        tokio::task::spawn_blocking(move || gate.entered.wait())
            .await
            .unwrap();
        f.svc.registry.ban_agent(&id, "admin uid 0").await.unwrap();
        let gate = f.gate.clone();
        tokio::task::spawn_blocking(move || gate.release.wait())
            .await
            .unwrap();
        let err = attest.await.unwrap().expect_err("re-attestation refused");
        assert!(err.message().contains("banned"), "{}", err.message());
        assert!(reloaded(&f, &id).await.unwrap().banned, "database");
    }
}
