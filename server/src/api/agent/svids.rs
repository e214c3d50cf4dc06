//! Signing for attested agents: the agent's own SVID renewal (`RenewAgent`), batches of
//! workload X509-SVIDs (`BatchNewX509SVID`) and JWT-SVIDs (`NewJWTSVID`), each re-authorized
//! against the registry and rate-limited per agent.

use std::time::Duration;

use continuity_proto::agent::{
    BatchNewX509svidRequest, BatchNewX509svidResponse, BatchNewX509svidResult, NewJwtsvidRequest,
    NewJwtsvidResponse, RenewAgentRequest, RenewAgentResponse,
};
use continuity_proto::types;
use tonic::{Request, Response, Status};

use super::auth::authenticate_serial;
use super::{AgentService, MAX_BATCH};
use crate::api::{ca_status, registry_status};
use crate::datastore::AgentRecord;

/// The wire form of a freshly signed X509-SVID.
pub(super) fn x509_svid(spiffe_id: &str, svid: crate::ca::SignedSvid) -> types::X509svid {
    types::X509svid {
        spiffe_id: spiffe_id.to_string(),
        expires_at: svid.expires_at,
        cert_chain: svid.chain(),
    }
}

impl AgentService {
    /// Signs an agent SVID for `agent_id` from its CSR, off the async executor.
    pub(super) async fn sign_agent_svid(
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

    /// `RenewAgent`: a new agent SVID for the caller, recorded only if its record did not
    /// change meanwhile.
    pub(super) async fn renew(
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
        self.limits.sign(agent.spiffe_id.as_str(), 1)?;
        let id = agent.spiffe_id.clone();
        let svid = self
            .sign_agent_svid(id.as_str(), req.into_inner().csr)
            .await?;
        let serial =
            continuity_common::x509::serial_hex(&svid.cert_der).map_err(Status::internal)?;
        // A compare-and-set on the record read before signing: a ban or eviction that landed
        // meanwhile wins, and the new SVID is never handed out.
        self.registry
            .renew_agent(agent, &presented, &serial, svid.expires_at)
            .await
            .map_err(registry_status)?;
        Ok(Response::new(RenewAgentResponse {
            svid: Some(x509_svid(id.as_str(), svid)),
        }))
    }

    /// `BatchNewX509SVID`: at most [`MAX_BATCH`] CSRs, signed across blocking threads.
    pub(super) async fn batch_new_x509(
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
        self.limits.sign(agent.spiffe_id.as_str(), params.len())?;
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

    /// `NewJWTSVID`: one JWT-SVID for an entry authorized for the caller.
    pub(super) async fn new_jwt(
        &self,
        req: Request<NewJwtsvidRequest>,
    ) -> Result<Response<NewJwtsvidResponse>, Status> {
        let agent = self.authenticate(&req).await?;
        self.limits.sign(agent.spiffe_id.as_str(), 1)?;
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
            tokio::task::spawn_blocking(move || ca.sign_jwt_svid(sub.as_str(), &aud, ttl))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(ca_status)?;
        self.metrics.inc(&self.metrics.jwt_svids_signed);
        Ok(Response::new(NewJwtsvidResponse {
            spiffe_id: entry.spiffe_id.to_string(),
            token,
            issued_at: self.clock.unix(),
            expires_at,
        }))
    }

    /// Signs one part of a batch; each item gets its own status.
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
                    entry.spiffe_id.as_str(),
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
                        svid: Some(x509_svid(entry.spiffe_id.as_str(), svid)),
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
