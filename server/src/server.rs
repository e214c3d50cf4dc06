//! Wiring: datastore, key manager, CA, registry, Engines, the periodic jobs, the two gRPC
//! listeners, and the health, metrics and JWKS HTTP listeners.
//!
//! Each subsystem is built by its own function that returns its handle (and, for listeners,
//! the future that serves it), so [`run`] reads as the list of them.

use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use continuity_common::fsperm::{FsPermError, SecureDir, secure_dir};
use continuity_common::tls::TrustRoots;
use continuity_common::{Clock, SystemClock};
use continuity_proto::admin::agent_admin_server::AgentAdminServer;
use continuity_proto::admin::bundle_admin_server::BundleAdminServer;
use continuity_proto::admin::entry_admin_server::EntryAdminServer;
use continuity_proto::admin::integrity_admin_server::IntegrityAdminServer;
use continuity_proto::admin::token_admin_server::TokenAdminServer;
use continuity_proto::agent::agent_api_server::AgentApiServer;
use tokio::net::{TcpListener, UnixListener};
use tonic::transport::Server;

use crate::api::admin::AdminService;
use crate::api::agent::{AgentService, MAX_AGENT_API_REQUEST, MAX_AGENT_API_RESPONSE};
use crate::api::engine::{BrokerService, MAX_BROKER_REQUEST, MAX_BROKER_RESPONSE};
use crate::api::limits::AgentRateLimits;
use crate::api::tls::{self, ServerIdentity};
use crate::api::uds;
use crate::ca::upstream::UpstreamAuthority;
use crate::ca::{CaConfig, CaManager, SharedAuthority};
use crate::config::Config;
use crate::datastore::{DataStore, SqlDataStore};
use crate::engines::Engines;
use crate::integrity;
use crate::keys::{self, KeyManager, KeyType};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::scheduler::{FailureLevel, Job, Scheduler};

mod bundle_endpoint;
mod cluster;
mod http;
mod oidc;
use continuity_proto::admin::audit_admin_server::AuditAdminServer;
use continuity_proto::admin::engine_admin_server::EngineAdminServer;
use continuity_proto::engine::engine_broker_server::EngineBrokerServer;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A filesystem path could not be prepared.
    #[error("{0}")]
    Path(String),
    /// The datastore could not be opened.
    #[error(transparent)]
    Store(#[from] crate::datastore::StoreError),
    /// The key manager could not be opened.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// The CA could not start.
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    /// Engines could not load.
    #[error(transparent)]
    Engines(#[from] crate::engines::EngineError),
    /// The registration controller could not start.
    #[error(transparent)]
    Controller(#[from] crate::controller::ControllerError),
    /// The registry could not load.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// The audit log's checkpoints could not be set up.
    #[error(transparent)]
    Checkpoint(#[from] crate::audit::CheckpointError),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A listener could not bind.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// Which listener.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Opens (creating with 0700) a directory only this server can use, refusing one another user
/// could have made or changed (see [`continuity_common::fsperm`]).
fn private_dir(dir: &Path, key: &str, what: &str) -> Result<SecureDir, RunError> {
    secure_dir(dir, 0o700, what).map_err(|e| RunError::Path(format!("{key}: {e}")))
}

/// The uid this process runs as (read from /proc, no unsafe needed).
pub fn own_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

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

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

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

/// The subsystems every API serves from: built once at start, shared by handle.
struct Core {
    clock: Arc<dyn Clock>,
    store: Arc<dyn DataStore>,
    key_manager: Arc<dyn KeyManager>,
    /// Record MACs (the backup snapshot opens the datastore with it).
    sealer: crate::datastore::RecordSealer,
    ca: Arc<CaManager>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    engines: Arc<Engines>,
    /// Foreign trust bundles.
    federation: Arc<crate::federation::Federation>,
    /// What the agents report serving (revokes wait on it).
    serving: Arc<crate::serving::ServingReports>,
    /// Fetches the federation relationships' bundle endpoints.
    refresher: Arc<crate::federation::refresher::Refresher>,
    /// The change feed position read before the state above was loaded.
    feed_cursor: i64,
    /// This server's name in the leader leases (kept in `data_dir/server-id`).
    holder: String,
}

/// A gRPC server, running until shutdown is signalled.
type Serving = std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// Runs the server until SIGINT/SIGTERM.
pub async fn run(cfg: Config) -> Result<(), RunError> {
    let core = core(&cfg, Arc::new(SystemClock)).await?;
    let roots = TrustRoots::default();
    let identity = ServerIdentity::start(
        core.ca.clone(),
        roots.clone(),
        cfg.default_x509_svid_ttl,
        core.clock.clone(),
    )
    .await?;
    let mut jobs = scheduler(
        &core,
        &identity,
        cfg.audit.checkpoint_interval,
        cfg.cluster.lease_ttl,
    );
    jobs.add(integrity::job(
        core.store.clone(),
        cfg.integrity_verify_interval,
    ));
    let _jobs = jobs.spawn();
    let _feed = cluster::follow(&core, cfg.cluster.poll_interval);
    let _refresher = core.refresher.clone().spawn(
        core.store.clone(),
        core.holder.clone(),
        cfg.cluster.lease_ttl,
        core.clock.clone(),
    );
    cluster::controller(&cfg, &core)?;
    let _bundle_publisher = cfg
        .k8s_bundle
        .clone()
        .map(|k| crate::k8s_bundle::spawn(k, core.ca.subscribe()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agent_api = agent_api(&cfg, &core, &identity, roots, stop_rx.clone()).await?;
    let admin_api = admin_api(&cfg, &core, stop_rx).await?;
    http::http_listeners(&cfg, &core).await?;
    bundle_endpoint(&cfg, &core, &identity).await?;
    tracing::info!(
        trust_domain = %cfg.trust_domain,
        bind_address = %cfg.bind_address,
        admin_socket = %cfg.admin_socket.display(),
        key_manager = core.key_manager.kind(),
        "server ready"
    );
    let signal = async {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    };
    let (a, b, ()) = tokio::join!(agent_api, admin_api, signal);
    let _ = std::fs::remove_file(&cfg.admin_socket);
    cluster::release_leases(&core, &cfg).await;
    a?;
    b?;
    Ok(())
}

/// The data directory, datastore, key manager and CA, audit log, registry and Engines.
async fn core(cfg: &Config, clock: Arc<dyn Clock>) -> Result<Core, RunError> {
    let data_dir = private_dir(&cfg.data_dir, "data_dir", "data_dir")?;
    let holder = cluster::server_id(&data_dir)?;
    let key_manager = keys::from_config(&cfg.key_manager)?;
    let sealer = integrity::sealer(&*key_manager).await?;
    let store: Arc<dyn DataStore> =
        Arc::new(SqlDataStore::connect(&cfg.datastore_url, sealer.clone()).await?);
    // Read before anything is loaded: whatever commits meanwhile is applied by the feed.
    let feed_cursor = store.change_head().await?;
    let metrics = Arc::new(Metrics::default());
    metrics.watch_bad_rows(store.bad_rows());
    let audit =
        crate::audit::Audit::open(&cfg.data_dir, &key_manager, store.clone(), clock.clone())
            .await?;
    integrity::audit_upgrade(&*store, &audit).await?;
    integrity::spawn_reporter(store.bad_rows(), audit.clone());
    let ca = authority(
        cfg,
        key_manager.clone(),
        store.clone(),
        clock.clone(),
        &holder,
    )
    .await?;
    metrics.watch_bundle(ca.subscribe());
    let registry = Arc::new(
        Registry::load(
            store.clone(),
            store.clone(),
            clock.clone(),
            audit.clone(),
            metrics.clone(),
        )
        .await?
        .with_previous_svid_grace(cfg.previous_svid_grace),
    );
    let engines = Engines::load(
        cfg.trust_domain.clone(),
        store.clone(),
        key_manager.clone(),
        clock.clone(),
        audit,
    )
    .await?;
    engines.set_max_encryptions_per_key_version(cfg.max_encryptions_per_key_version);
    let federation = federation(cfg, &store, &engines, &clock).await?;
    Ok(Core {
        refresher: cluster::refresher(cfg, &federation)?,
        federation,
        serving: Arc::new(crate::serving::ServingReports::new(store.clone())),
        clock,
        store,
        key_manager,
        sealer,
        ca,
        metrics,
        registry,
        engines,
        feed_cursor,
        holder,
    })
}

/// The foreign bundles, audited through the Engines' audit log.
async fn federation(
    cfg: &Config,
    store: &Arc<dyn DataStore>,
    engines: &Engines,
    clock: &Arc<dyn Clock>,
) -> Result<Arc<crate::federation::Federation>, RunError> {
    Ok(crate::federation::Federation::load(
        cfg.trust_domain.clone(),
        store.clone(),
        store.clone(),
        engines.audit().clone(),
        clock.clone(),
    )
    .await?)
}

/// The SPIFFE bundle endpoint, when `[federation.bundle_endpoint]` is configured.
async fn bundle_endpoint(
    cfg: &Config,
    core: &Core,
    identity: &Arc<ServerIdentity>,
) -> Result<(), RunError> {
    let Some(e) = &cfg.bundle_endpoint else {
        return Ok(());
    };
    crate::server::bundle_endpoint::serve(e, core.ca.clone(), identity.clone())
        .await
        .map_err(|e| RunError::Path(e.to_string()))
}

/// The CA: X.509 and JWT authorities kept in the key manager, records in the datastore.
async fn authority(
    cfg: &Config,
    key_manager: Arc<dyn KeyManager>,
    store: Arc<dyn DataStore>,
    clock: Arc<dyn Clock>,
    holder: &str,
) -> Result<Arc<CaManager>, RunError> {
    let upstream = match cfg.upstream_authority.clone() {
        Some(u) => {
            let (now, ttl) = (clock.unix(), cfg.ca_ttl);
            let loaded = tokio::task::spawn_blocking(move || UpstreamAuthority::load(&u, now, ttl))
                .await
                .map_err(|e| RunError::Path(e.to_string()))?
                .map_err(crate::ca::CaError::from)?;
            Some(Arc::new(loaded))
        }
        None => None,
    };
    let ca_cfg = CaConfig {
        trust_domain: cfg.trust_domain.clone(),
        x509_key_type: cfg.ca_key_type,
        jwt_key_type: KeyType::EcP256,
        ttl: cfg.ca_ttl,
        jwt_issuer: cfg.jwt_issuer.clone(),
        upstream,
    };
    let shared = SharedAuthority {
        leases: store.clone(),
        holder: holder.to_string(),
        lease_ttl: cfg.cluster.lease_ttl,
    };
    Ok(CaManager::start_shared(ca_cfg, key_manager, store, clock, Some(shared)).await?)
}

/// Period of the Engine key lifecycle step (scheduled destruction, periodic rotation).
const ENGINE_TICK: std::time::Duration = std::time::Duration::from_secs(5);

/// The server's periodic work: CA rotation, join-token pruning, Engine key ticks and server
/// SVID renewal, each with jitter on the injected clock.
fn scheduler(
    core: &Core,
    identity: &Arc<ServerIdentity>,
    checkpoint_interval: std::time::Duration,
    lease_ttl: std::time::Duration,
) -> Scheduler {
    let mut s = Scheduler::new(core.clock.clone());
    let ca = core.ca.clone();
    s.add(Job::every(
        "ca-rotation",
        ca.check_period(),
        "CA rotation failed; will retry",
        move || {
            let ca = ca.clone();
            async move { ca.rotate().await.map(drop).map_err(Into::into) }
        },
    ));
    let (store, clock) = (core.store.clone(), core.clock.clone());
    s.add(
        Job::every(
            "join-token-pruning",
            core.ca.next_check_in(),
            "pruning expired join tokens failed",
            move || {
                let (store, now) = (store.clone(), clock.unix());
                async move {
                    store
                        .prune_join_tokens(now)
                        .await
                        .map(drop)
                        .map_err(Into::into)
                }
            },
        )
        .failures_at(FailureLevel::Warn),
    );
    s.add(cluster::engine_lifecycle_job(core, ENGINE_TICK, lease_ttl));
    s.add(crate::audit::checkpoint_job(
        core.engines.audit().clone(),
        checkpoint_interval,
    ));
    let (renew, due) = (identity.clone(), identity.clone());
    s.add(Job::dynamic(
        "server-svid-renewal",
        move || due.renew_in(),
        "server SVID renewal failed",
        move || {
            let identity = renew.clone();
            async move { identity.renew().await.map_err(Into::into) }
        },
    ));
    s
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// The agent API (AgentApi and EngineBroker over TLS 1.3): binds `bind_address` and returns
/// the server future.
async fn agent_api(
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
async fn admin_api(
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
