//! The agent's link to the server: TLS 1.3, the server authenticated by its SPIFFE ID against
//! the bundle, the agent by its agent SVID. One channel, replaced when the agent SVID renews.

use std::sync::Arc;

use continuity_common::tls::TrustRoots;
use continuity_common::{SpiffeId, TrustDomain};
use continuity_proto::agent::agent_api_client::AgentApiClient;
use continuity_proto::agent::{
    AttestAgentRequest, AttestationData, attest_agent_request, attest_agent_response,
};
use continuity_proto::engine::engine_broker_client::EngineBrokerClient;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;

use crate::state::{BundleState, Svid};

/// Failures talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection could not be made.
    #[error("cannot connect to the server at {addr}: {source}")]
    Connect {
        /// Server address.
        addr: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The server refused or failed a call.
    #[error("server: {:?}: {}", .0.code(), .0.message())]
    Status(Box<tonic::Status>),
    /// TLS configuration failed.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The server answered with something unusable.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// The server did not answer in time (it is counted as unreachable, not as a refusal).
    #[error("the server did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// A renewed agent SVID could not be saved in data_dir, so it is not used.
    #[error(
        "cannot save the renewed agent SVID ({0}); keeping the current one until data_dir is writable"
    )]
    Persist(String),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        Self::Status(Box::new(s))
    }
}

impl ClientError {
    /// The gRPC status, if the server answered.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Self::Status(s) => Some(s),
            _ => None,
        }
    }
}

/// The server API client.
#[derive(Debug)]
pub struct ServerClient {
    addr: String,
    server_id: SpiffeId,
    roots: TrustRoots,
    /// The channel and the leaf certificate (DER) of the agent SVID it authenticates with.
    /// A plain mutex, never held across a connect: a caller that finds no channel for its SVID
    /// connects on its own, so a connect stalled by the server stalls only its own caller.
    conn: std::sync::Mutex<Option<(bytes::Bytes, Channel)>>,
}

/// The result of a node attestation.
#[derive(Debug)]
pub struct Attested {
    /// The agent's SPIFFE ID.
    pub agent_id: String,
    /// Agent SVID.
    pub svid: Svid,
    /// The bundle.
    pub bundle: BundleState,
}

impl ServerClient {
    /// A client for the server at `addr` in `trust_domain`, trusting `roots`.
    pub fn new(
        addr: String,
        trust_domain: &TrustDomain,
        roots: TrustRoots,
    ) -> Result<Self, ClientError> {
        let server_id = trust_domain
            .id("/continuity/server")
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(Self {
            addr,
            server_id,
            roots,
            conn: std::sync::Mutex::new(None),
        })
    }

    /// The roots used to authenticate the server (replace them when the bundle changes).
    pub fn roots(&self) -> &TrustRoots {
        &self.roots
    }

    async fn channel(&self, cfg: rustls::ClientConfig) -> Result<Channel, ClientError> {
        continuity_common::grpc::tls_channel(self.addr.clone(), Arc::new(cfg))
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr.clone(),
                source,
            })
    }

    /// An authenticated client for the given agent SVID (reused while the SVID is the same).
    pub async fn api(&self, svid: &Svid) -> Result<AgentApiClient<Channel>, ClientError> {
        Ok(AgentApiClient::new(self.authenticated(svid).await?))
    }

    /// The Engine broker over the same authenticated connection.
    pub async fn broker(&self, svid: &Svid) -> Result<EngineBrokerClient<Channel>, ClientError> {
        Ok(EngineBrokerClient::new(self.authenticated(svid).await?))
    }

    async fn authenticated(&self, svid: &Svid) -> Result<Channel, ClientError> {
        // The SVID may come from the state file: an empty chain is an error, not a panic.
        let leaf = svid
            .chain
            .first()
            .ok_or_else(|| ClientError::Protocol("the agent SVID has no certificate".into()))?
            .clone();
        if let Some((s, c)) = self.conn().as_ref()
            && *s == leaf
        {
            return Ok(c.clone());
        }
        let chain = svid
            .chain
            .iter()
            .map(|c| CertificateDer::from(c.to_vec()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key.expose().to_vec()));
        let cfg = continuity_common::tls::client_config(
            self.roots.clone(),
            self.server_id.clone(),
            Some((chain, key)),
        )?;
        let channel = self.channel(cfg).await?;
        // Concurrent connects for one SVID: the last one stays; the others serve their caller.
        *self.conn() = Some((leaf, channel.clone()));
        Ok(channel)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Option<(bytes::Bytes, Channel)>> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the current connection (after a transport failure or an agent SVID change).
    pub fn reset(&self) {
        *self.conn() = None;
    }

    /// Attests with the node attestor `kind` and its `payload` (a join token, a k8s_psat
    /// JSON document). With `insecure`, the server is not authenticated (first start with
    /// `insecure_bootstrap` only).
    pub async fn attest(
        &self,
        kind: &str,
        payload: Vec<u8>,
        insecure: bool,
    ) -> Result<Attested, ClientError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = if insecure {
            let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(
                    continuity_common::tls::danger::AcceptAnyServerCert::new(),
                )
                .with_no_client_auth();
            c.alpn_protocols = vec![b"h2".to_vec()];
            c
        } else {
            continuity_common::tls::client_config(self.roots.clone(), self.server_id.clone(), None)?
        };
        let mut client = AgentApiClient::new(self.channel(cfg).await?);
        let (key, csr) = crate::svid::new_key_and_csr().map_err(ClientError::Protocol)?;
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
        let mut stream = client
            .attest_agent(tokio_stream::once(req))
            .await?
            .into_inner();
        let msg = stream
            .message()
            .await?
            .ok_or_else(|| ClientError::Protocol("attestation stream ended early".into()))?;
        let Some(attest_agent_response::Step::Result(result)) = msg.step else {
            return Err(ClientError::Protocol(
                "the server asked for a challenge the join_token attestor cannot answer".into(),
            ));
        };
        let svid = result
            .svid
            .ok_or_else(|| ClientError::Protocol("no agent SVID in the result".into()))?;
        let bundle = result
            .bundle
            .ok_or_else(|| ClientError::Protocol("no bundle in the result".into()))?;
        Ok(Attested {
            agent_id: svid.spiffe_id.clone(),
            svid: crate::svid::svid_from_proto(svid, key)
                .map_err(|e| ClientError::Protocol(e.to_string()))?,
            bundle: bundle.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_agent_svid_without_certificates_is_an_error_not_a_panic() {
        let td = TrustDomain::new("example.org").unwrap();
        let client = ServerClient::new("127.0.0.1:1".into(), &td, TrustRoots::default()).unwrap();
        let svid = Svid {
            chain: vec![],
            key: continuity_common::secret::SecretBytes::new(b"k".to_vec()),
            expires_at: 10,
            issued_at: 0,
            rotate_at: 5,
        };
        assert!(matches!(
            client.api(&svid).await,
            Err(ClientError::Protocol(_))
        ));
    }
}
