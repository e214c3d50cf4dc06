//! A hand-built agent: speaks the agent API with nothing but the proto crate and rustls, so
//! tests can do what a real (or hostile) agent could.

use std::sync::Arc;

use continuity_common::tls::{TrustRoots, client_config};
use continuity_common::{SpiffeId, TrustDomain};
use continuity_proto::agent::agent_api_client::AgentApiClient;
use continuity_proto::agent::{
    AttestAgentRequest, AttestationData, attest_agent_request, attest_agent_response,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;

use crate::server::TRUST_DOMAIN;

/// A key pair and a CSR for it.
pub fn key_and_csr() -> (rcgen::KeyPair, Vec<u8>) {
    let kp = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&kp)
        .unwrap();
    let der = csr.der().to_vec();
    (kp, der)
}

/// The server's expected SPIFFE ID.
pub fn server_id() -> SpiffeId {
    TrustDomain::new(TRUST_DOMAIN)
        .unwrap()
        .id("/continuity/server")
        .unwrap()
}

/// A client without an agent SVID (before attestation).
pub async fn anonymous(addr: &str, bundle: Vec<Vec<u8>>) -> AgentApiClient<Channel> {
    let cfg = client_config(TrustRoots::new(bundle), server_id(), None).unwrap();
    let ch = continuity_common::grpc::tls_channel(addr.to_string(), Arc::new(cfg))
        .await
        .unwrap();
    AgentApiClient::new(ch)
}

/// An attested agent: its SVID, key and an authenticated client.
pub struct Agent {
    /// The agent's SPIFFE ID.
    pub id: String,
    /// Agent SVID chain, DER.
    pub chain: Vec<Vec<u8>>,
    /// Agent SVID key, PKCS#8.
    pub key: Vec<u8>,
    /// Authenticated client.
    pub client: AgentApiClient<Channel>,
}

/// Runs AttestAgent with a join token; returns the agent or the refusal.
pub async fn attest(addr: &str, bundle: Vec<Vec<u8>>, token: &str) -> Result<Agent, tonic::Status> {
    attest_with(addr, bundle, "join_token", token.as_bytes().to_vec()).await
}

/// Runs AttestAgent with any node attestor type and payload.
pub async fn attest_with(
    addr: &str,
    bundle: Vec<Vec<u8>>,
    kind: &str,
    payload: Vec<u8>,
) -> Result<Agent, tonic::Status> {
    let mut client = anonymous(addr, bundle.clone()).await;
    let (kp, csr) = key_and_csr();
    let req = AttestAgentRequest {
        step: Some(attest_agent_request::Step::Params(
            attest_agent_request::Params {
                data: Some(AttestationData {
                    r#type: kind.into(),
                    payload,
                }),
                csr,
            },
        )),
    };
    let mut resp = client
        .attest_agent(tokio_stream::once(req))
        .await?
        .into_inner();
    let msg = resp
        .message()
        .await?
        .ok_or_else(|| tonic::Status::internal("no attestation result"))?;
    let Some(attest_agent_response::Step::Result(result)) = msg.step else {
        return Err(tonic::Status::internal("expected a result"));
    };
    let svid = result.svid.unwrap();
    let key = kp.serialize_der();
    let client = authenticated(addr, bundle, &svid.cert_chain, &key).await;
    Ok(Agent {
        id: svid.spiffe_id,
        chain: svid.cert_chain,
        key,
        client,
    })
}

/// A channel presenting an agent SVID (for any agent-facing service).
pub async fn channel_for(
    addr: &str,
    bundle: Vec<Vec<u8>>,
    chain: &[Vec<u8>],
    key: &[u8],
) -> Channel {
    let certs = chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec()));
    let cfg = client_config(TrustRoots::new(bundle), server_id(), Some((certs, key))).unwrap();
    continuity_common::grpc::tls_channel(addr.to_string(), Arc::new(cfg))
        .await
        .unwrap()
}

/// A client presenting an agent SVID.
pub async fn authenticated(
    addr: &str,
    bundle: Vec<Vec<u8>>,
    chain: &[Vec<u8>],
    key: &[u8],
) -> AgentApiClient<Channel> {
    let certs = chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec()));
    let cfg = client_config(TrustRoots::new(bundle), server_id(), Some((certs, key))).unwrap();
    let ch = continuity_common::grpc::tls_channel(addr.to_string(), Arc::new(cfg))
        .await
        .unwrap();
    AgentApiClient::new(ch)
}
