//! The agent's link to the server: TLS 1.3, the server authenticated by its SPIFFE ID against
//! the bundle (whichever address it answers on), the agent by its agent SVID. One channel to
//! the server in use ([`servers`]), replaced when the agent SVID renews or the agent moves to
//! another server after a failure ([`ServerClient::failed`]).

pub mod servers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use continuity_common::tls::TrustRoots;
use continuity_common::{SpiffeId, TrustDomain};
use continuity_proto::agent::agent_api_client::AgentApiClient;
use continuity_proto::agent::{
    AttestAgentRequest, AttestationData, attest_agent_request, attest_agent_response,
};
use continuity_proto::engine::engine_broker_client::EngineBrokerClient;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;

use self::servers::{Servers, SystemResolver};
use crate::config::ServerAddress;
use crate::state::{BundleState, Svid};

/// Longest a connection (TCP connect and TLS handshake) may take before the server counts as
/// unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Failures talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection could not be made (TCP, or the TLS handshake: a server that is not
    /// the trust domain's server fails here).
    #[error("cannot connect to the server at {addr}: {}", error_chain(source))]
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
    /// No configured server address resolved to anything.
    #[error("no server address resolved (server_address: {0})")]
    NoServer(String),
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

    /// Whether this is a status as the server would answer it: every status but those tonic
    /// makes on this side from a transport error it keeps as the source. (A refused
    /// connection also comes as a plain `Unavailable`; the next call of the round then fails
    /// too, so treating it as an answer costs nothing.)
    pub fn is_answer(&self) -> bool {
        matches!(self, Self::Status(s) if std::error::Error::source(s.as_ref()).is_none())
    }

    /// Whether the server in use is unreachable, not refusing: no connection, a failed TLS
    /// handshake, no answer in time, `Unavailable` or `DeadlineExceeded`, or a call cut by
    /// the transport. Such a failure moves the agent to the next server; a refusal does not.
    pub fn is_unreachable(&self) -> bool {
        use tonic::Code;
        match self {
            Self::Connect { .. } | Self::Timeout(_) | Self::NoServer(_) => true,
            Self::Status(s) => match s.code() {
                Code::Unavailable | Code::DeadlineExceeded => true,
                // Made on this side from a transport error (the server never sent these).
                Code::Unknown | Code::Cancelled | Code::Internal => {
                    std::error::Error::source(s.as_ref()).is_some()
                }
                _ => false,
            },
            Self::Tls(_) | Self::Protocol(_) | Self::Persist(_) => false,
        }
    }
}

/// An error and its sources, `: `-separated (tonic's transport error says only
/// "transport error" by itself).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The server API client.
#[derive(Debug)]
pub struct ServerClient {
    servers: Servers,
    /// `server_address` as configured, for messages.
    configured: String,
    server_id: SpiffeId,
    roots: TrustRoots,
    /// The channel, the server it goes to and the leaf certificate (DER) of the agent SVID it
    /// authenticates with. A plain mutex, never held across a connect: a caller that finds no
    /// channel for its SVID connects on its own, so a connect stalled by the server stalls
    /// only its own caller.
    conn: std::sync::Mutex<Option<Conn>>,
    /// The server of the last connection made (a change is logged).
    last_connected: std::sync::Mutex<Option<SocketAddr>>,
}

/// A channel to one server, authenticated with one agent SVID.
#[derive(Debug, Clone)]
struct Conn {
    leaf: bytes::Bytes,
    server: SocketAddr,
    channel: Channel,
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
    /// A client for the servers at `addresses` (resolved by the system resolver, starting at
    /// a random position) in `trust_domain`, trusting `roots`.
    pub fn new(
        addresses: Vec<ServerAddress>,
        trust_domain: &TrustDomain,
        roots: TrustRoots,
    ) -> Result<Self, ClientError> {
        // Not a secret: only where in the list this agent starts.
        let seed = continuity_common::rand::array::<8>()
            .map(u64::from_le_bytes)
            .unwrap_or_else(|_| (continuity_common::rand::jitter_fraction() * 1e15) as u64);
        Self::with_resolver(
            addresses,
            Arc::new(SystemResolver),
            seed,
            trust_domain,
            roots,
        )
    }

    /// A client for the servers at `addresses`, resolved by `resolver`, starting at position
    /// `seed` of the resolved list.
    pub fn with_resolver(
        addresses: Vec<ServerAddress>,
        resolver: Arc<dyn servers::Resolve>,
        seed: u64,
        trust_domain: &TrustDomain,
        roots: TrustRoots,
    ) -> Result<Self, ClientError> {
        let server_id = trust_domain
            .id("/continuity/server")
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let configured = addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Self {
            servers: Servers::new(addresses, resolver, seed),
            configured,
            server_id,
            roots,
            conn: std::sync::Mutex::new(None),
            last_connected: std::sync::Mutex::new(None),
        })
    }

    /// The server in use (None before the addresses first resolved).
    pub fn server(&self) -> Option<SocketAddr> {
        self.servers.peek()
    }

    /// How many times the agent moved to another server.
    pub fn server_switches(&self) -> u64 {
        self.servers.switches()
    }

    /// Reports a failed call made while `server` was in use (as [`ServerClient::server`] said
    /// before the call; None: whatever is in use now). If it shows the server unreachable
    /// ([`ClientError::is_unreachable`]) the connection is dropped and the agent moves to the
    /// next server; true then. Callers wait (with back-off) before their next attempt.
    pub fn failed(&self, server: Option<SocketAddr>, e: &ClientError) -> bool {
        if !e.is_unreachable() {
            return false;
        }
        let Some(from) = server.or_else(|| self.servers.peek()) else {
            return true;
        };
        {
            let mut conn = self.conn();
            if conn.as_ref().is_some_and(|c| c.server == from) {
                *conn = None;
            }
        }
        self.servers.fail_over(from);
        true
    }

    /// The roots used to authenticate the server (replace them when the bundle changes).
    pub fn roots(&self) -> &TrustRoots {
        &self.roots
    }

    /// The server to use now (resolving the addresses first if due).
    async fn target(&self) -> Result<SocketAddr, ClientError> {
        self.servers
            .current()
            .await
            .ok_or_else(|| ClientError::NoServer(self.configured.clone()))
    }

    /// Connects to `server` (TCP and TLS within [`CONNECT_TIMEOUT`]).
    async fn channel(
        &self,
        server: SocketAddr,
        cfg: rustls::ClientConfig,
    ) -> Result<Channel, ClientError> {
        let connect = continuity_common::grpc::tls_channel(server.to_string(), Arc::new(cfg));
        let channel = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| ClientError::Timeout(CONNECT_TIMEOUT))?
            .map_err(|source| ClientError::Connect {
                addr: server.to_string(),
                source,
            })?;
        let mut last = self
            .last_connected
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *last != Some(server) {
            tracing::info!(server = %server, "connected to server");
            *last = Some(server);
        }
        Ok(channel)
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
        let server = self.target().await?;
        if let Some(c) = self.conn().as_ref()
            && c.leaf == leaf
            && c.server == server
        {
            return Ok(c.channel.clone());
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
        let channel = self.channel(server, cfg).await?;
        // Concurrent connects for one SVID: the last one stays; the others serve their caller.
        *self.conn() = Some(Conn {
            leaf,
            server,
            channel: channel.clone(),
        });
        Ok(channel)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Option<Conn>> {
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
        let server = self.target().await?;
        let mut client = AgentApiClient::new(self.channel(server, cfg).await?);
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
        let addr = ServerAddress::parse("127.0.0.1:1").unwrap();
        let client = ServerClient::new(vec![addr], &td, TrustRoots::default()).unwrap();
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
