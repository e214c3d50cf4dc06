//! The two gRPC listeners: the agent API (AgentApi and EngineBroker over TLS 1.3) on
//! `bind_address`, and the admin API with gRPC health on the private Unix socket.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use continuity_common::fsperm::FsPermError;
use continuity_common::tls::TrustRoots;
use continuity_proto::admin::agent_admin_server::AgentAdminServer;
use continuity_proto::admin::audit_admin_server::AuditAdminServer;
use continuity_proto::admin::bundle_admin_server::BundleAdminServer;
use continuity_proto::admin::engine_admin_server::EngineAdminServer;
use continuity_proto::admin::entry_admin_server::EntryAdminServer;
use continuity_proto::admin::integrity_admin_server::IntegrityAdminServer;
use continuity_proto::admin::token_admin_server::TokenAdminServer;
use continuity_proto::agent::agent_api_server::AgentApiServer;
use continuity_proto::engine::engine_broker_server::EngineBrokerServer;
use tokio::net::{TcpListener, UnixListener};
use tonic::transport::Server;

use super::{Core, RunError, own_uid, private_dir};
use crate::api::admin::AdminService;
use crate::api::agent::{AgentService, MAX_AGENT_API_REQUEST, MAX_AGENT_API_RESPONSE};
use crate::api::engine::{BrokerService, MAX_BROKER_REQUEST, MAX_BROKER_RESPONSE};
use crate::api::limits::AgentRateLimits;
use crate::api::tls::{self, ServerIdentity};
use crate::api::uds;
use crate::config::Config;
use crate::integrity;

/// Largest HTTP/2 frame accepted (the protocol's minimum maximum).
const MAX_FRAME_SIZE: u32 = 16 * 1024;
/// Largest HTTP/2 header list accepted (a gRPC call's headers are a few hundred bytes).
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Streams a peer may make us reset for its errors before its connection is closed.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// The HTTP/2 bounds both gRPC listeners share: streams per connection, frame and header
/// sizes, and how many error resets a peer may cause (tonic's default is unlimited).
fn h2_limits(b: Server, max_streams: u32) -> Server {
    b.max_concurrent_streams(max_streams)
        .max_frame_size(MAX_FRAME_SIZE)
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
}

/// A gRPC server, running until shutdown is signalled.
pub(super) type Serving =
    std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

async fn bind_admin_socket(path: &Path) -> Result<UnixListener, RunError> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(RunError::Path(format!(
            "admin_socket: {} must name a socket file in a directory",
            path.display()
        )));
    };
    let dir = private_dir(dir, "admin_socket", "admin socket directory")?;
    let fs = |e: FsPermError| RunError::Path(format!("admin_socket: {e}"));
    if dir.socket_exists(name).map_err(fs)? {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(RunError::Path(format!(
                "admin_socket: {} is in use: another server is running",
                path.display()
            )));
        }
        dir.remove_socket(name).map_err(fs)?;
    }
    // `dir` was verified writable only by us (parents only by us or root): binding by path
    // inside it cannot be redirected.
    UnixListener::bind(path).map_err(|source| RunError::Bind {
        what: format!("admin_socket {}", path.display()),
        source,
    })
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// The agent API (AgentApi and EngineBroker over TLS 1.3): binds `bind_address` and returns
/// the server future.
pub(super) async fn agent_api(
    cfg: &Config,
    core: &Core,
    identity: &Arc<ServerIdentity>,
    roots: TrustRoots,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Serving, RunError> {
    let acceptor = identity.acceptor(roots)?;
    let tcp = TcpListener::bind(cfg.bind_address)
        .await
        .map_err(|source| RunError::Bind {
            what: format!("bind_address {}", cfg.bind_address),
            source,
        })?;
    let (agent, broker) = agent_services(cfg, core);
    // Floods and slow peers (see [agent_api] in the README): connections are capped and must
    // finish TLS in time (tls::incoming); each connection has a bounded number of streams,
    // bounded headers and frames, and is dropped when it stops answering PINGs; each call has
    // a deadline and a size limit.
    let api = &cfg.agent_api;
    let incoming = tls::incoming(
        tcp,
        acceptor,
        tls::AcceptLimits {
            max_connections: api.max_connections,
            max_per_ip: api.max_connections_per_ip,
            handshake_timeout: api.handshake_timeout,
            tcp_keepalive: api.keepalive_interval,
            // Attestation only: the handshake, the first message, and the call itself.
            anonymous_lifetime: api.handshake_timeout
                + api.first_message_timeout
                + api.request_timeout,
        },
        core.metrics.clone(),
    );
    let serving = h2_limits(Server::builder(), api.max_concurrent_streams)
        .timeout(api.request_timeout)
        .http2_keepalive_interval(Some(api.keepalive_interval))
        .http2_keepalive_timeout(Some(api.keepalive_timeout))
        // Per-RPC counts and latencies for `/metrics`.
        .layer(continuity_common::metrics::RpcMetricsLayer::new(
            core.metrics.rpc.clone(),
        ))
        .add_service(
            AgentApiServer::new(agent)
                .max_decoding_message_size(MAX_AGENT_API_REQUEST)
                .max_encoding_message_size(MAX_AGENT_API_RESPONSE),
        )
        .add_service(
            EngineBrokerServer::new(broker)
                .max_decoding_message_size(MAX_BROKER_REQUEST)
                .max_encoding_message_size(MAX_BROKER_RESPONSE),
        )
        .serve_with_incoming_shutdown(incoming, stopped(stop));
    Ok(Box::pin(serving))
}

/// The two services of the agent API, sharing one set of per-agent rate limits.
fn agent_services(cfg: &Config, core: &Core) -> (AgentService, BrokerService) {
    let limits = Arc::new(AgentRateLimits::new(&cfg.agent_api, core.metrics.clone()));
    let agent = AgentService {
        trust_domain: cfg.trust_domain.clone(),
        ca: core.ca.clone(),
        registry: core.registry.clone(),
        store: core.store.clone(),
        clock: core.clock.clone(),
        x509_ttl: cfg.default_x509_svid_ttl,
        jwt_ttl: cfg.default_jwt_svid_ttl,
        metrics: core.metrics.clone(),
        psat_clusters: Arc::new(continuity_attestors::k8s_psat::Validator::new(
            cfg.psat_clusters.clone(),
        )),
        limits: limits.clone(),
        first_message_timeout: cfg.agent_api.first_message_timeout,
        federation: core.federation.clone(),
        serving: core.serving.clone(),
    };
    let broker = BrokerService {
        trust_domain: cfg.trust_domain.clone(),
        registry: core.registry.clone(),
        engines: core.engines.clone(),
        clock: core.clock.clone(),
        limits,
        sightings: crate::engines::Sightings::start(core.engines.clone()),
    };
    (agent, broker)
}

/// The admin services' shared handle: the caller check and the subsystems.
fn admin_service(cfg: &Config, core: &Core) -> AdminService {
    AdminService {
        engines: core.engines.clone(),
        trust_domain: cfg.trust_domain.clone(),
        registry: core.registry.clone(),
        ca: core.ca.clone(),
        store: core.store.clone(),
        clock: core.clock.clone(),
        metrics: core.metrics.clone(),
        owner_uid: own_uid(),
        bad_rows: core.store.bad_rows(),
        federation: core.federation.clone(),
        serving: core.serving.clone(),
    }
}

/// The admin API and gRPC health on the private Unix socket: binds `admin_socket` and returns
/// the server future.
pub(super) async fn admin_api(
    cfg: &Config,
    core: &Core,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Serving, RunError> {
    let admin = admin_service(cfg, core);
    let uds = bind_admin_socket(&cfg.admin_socket).await?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let m = uds::MAX_ADMIN_REQUEST;
    let serving = h2_limits(Server::builder(), uds::MAX_ADMIN_STREAMS)
        .timeout(uds::ADMIN_REQUEST_TIMEOUT)
        .add_service(health_service.max_decoding_message_size(m))
        .add_service(EntryAdminServer::new(admin.clone()).max_decoding_message_size(m))
        .add_service(TokenAdminServer::new(admin.clone()).max_decoding_message_size(m))
        .add_service(AgentAdminServer::new(admin.clone()).max_decoding_message_size(m))
        .add_service(BundleAdminServer::new(admin.clone()).max_decoding_message_size(m))
        .add_service(
            continuity_proto::admin::authority_admin_server::AuthorityAdminServer::new(
                admin.clone(),
            )
            .max_decoding_message_size(m),
        )
        .add_service(EngineAdminServer::new(admin.clone()).max_decoding_message_size(m))
        .add_service(AuditAdminServer::new(admin.clone()).max_decoding_message_size(m))
        .add_service(
            crate::api::federation::FederatedBundleService {
                admin: admin.clone(),
                federation: core.federation.clone(),
            }
            .server()
            .max_decoding_message_size(m),
        )
        .add_service(
            crate::api::federation_relationships::FederationService {
                admin: admin.clone(),
                federation: core.federation.clone(),
                refresher: core.refresher.clone(),
            }
            .server()
            .max_decoding_message_size(m),
        )
        .add_service(IntegrityAdminServer::new(integrity::IntegrityService {
            admin: admin.clone(),
            store: core.store.clone(),
        }))
        .add_service(
            crate::backup::BackupService::server(cfg, admin, core.sealer.clone())
                .max_decoding_message_size(m),
        )
        .serve_with_incoming_shutdown(
            uds::incoming(uds, uds::MAX_ADMIN_CONNECTIONS),
            stopped(stop),
        );
    Ok(Box::pin(serving))
}
