//! Node attestation (`AttestAgent`): one first message with attestation data and a CSR, a
//! join token or a Kubernetes projected service account token checked, and the agent's SVID
//! signed and recorded.

use continuity_attestors::join_token;
use continuity_common::SpiffeId;
use continuity_proto::agent::{
    AttestAgentRequest, AttestAgentResponse, attest_agent_request, attest_agent_response,
};
use tonic::{Request, Response, Status, Streaming};

use super::svids::x509_svid;
use super::{AgentService, ResponseStream};
use crate::api::{bundle_to_proto, ca_status, registry_status};
use crate::datastore::AgentRecord;

/// SHA-256 of a join token, hex: the only form in which tokens are stored.
pub fn token_hash(token: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        token.as_bytes(),
    ))
}

impl AgentService {
    /// `AttestAgent`: reads only the first message (within `first_message_timeout`),
    /// dispatches to the node attestor it names, and counts and logs the outcome.
    pub(super) async fn attest(
        &self,
        req: Request<Streaming<AttestAgentRequest>>,
    ) -> Result<Response<ResponseStream<AttestAgentResponse>>, Status> {
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

    /// A join token: used once (taken before the SVID is signed), unexpired.
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
        let response = self
            .issue_agent(
                &agent_id,
                join_token::ATTESTOR_TYPE,
                record.alias,
                vec![],
                csr,
            )
            .await?;
        tracing::info!(agent = %agent_id, "agent attested with a join token");
        Ok(response)
    }

    /// The common end of every node attestation: refuses banned agents, signs the agent SVID
    /// from the CSR, records (or refreshes) the agent, and answers with SVID and bundle.
    pub(super) async fn issue_agent(
        &self,
        agent_id: &SpiffeId,
        attestation_type: &str,
        alias: Option<SpiffeId>,
        selectors: Vec<continuity_attestors::Selector>,
        csr: Vec<u8>,
    ) -> Result<AttestAgentResponse, Status> {
        let existing = self.registry.agent(agent_id.as_str());
        if existing.as_ref().is_some_and(|a| a.banned) {
            return Err(Status::permission_denied(format!(
                "agent {agent_id} is banned"
            )));
        }
        let svid = self.sign_agent_svid(agent_id.as_str(), csr).await?;
        let now = self.clock.unix();
        let serial =
            continuity_common::x509::serial_hex(&svid.cert_der).map_err(Status::internal)?;
        // A compare-and-set on what was read above: a ban or eviction that landed while the
        // SVID was being signed wins, and the SVID is never handed out.
        self.registry
            .attest_agent(
                existing,
                AgentRecord {
                    spiffe_id: agent_id.clone(),
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
                    selectors,
                },
                self.x509_ttl,
            )
            .await
            .map_err(registry_status)?;
        Ok(AttestAgentResponse {
            step: Some(attest_agent_response::Step::Result(
                attest_agent_response::Result {
                    svid: Some(x509_svid(agent_id.as_str(), svid)),
                    bundle: Some(bundle_to_proto(&self.ca.bundle())),
                },
            )),
        })
    }

    /// A projected service account token of a configured cluster.
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
        let response = self
            .issue_agent(
                &agent_id,
                continuity_attestors::k8s_psat::ATTESTOR_TYPE,
                None,
                a.selectors(),
                csr,
            )
            .await?;
        let selectors: Vec<String> = a.selectors().iter().map(|s| s.to_string()).collect();
        tracing::info!(agent = %agent_id, ?selectors, "agent attested with k8s_psat");
        Ok(response)
    }
}
