//! Wiring: state from `data_dir` (or a fresh attestation), the cache manager, the Workload API.

use std::sync::Arc;
use std::time::Duration;

use continuity_common::tls::TrustRoots;
use continuity_common::{Clock, SystemClock};

use crate::attestor::Attestors;
use crate::client::{Attested, ClientError, ServerClient};
use crate::config::{Bootstrap, Config, NodeAttestor, WorkloadApiConfig};
use crate::endpoints;
use crate::endpoints::workload::WorkloadHandler;
use crate::limits::RateLimiter;
use crate::manager::Manager;
use crate::metrics::AgentMetrics;
use crate::state::PersistedState;
use crate::storage::{Storage, StorageError};
use continuity_common::metrics::RpcMetrics;

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// data_dir state could not be used.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The server refused attestation (or could not be set up).
    #[error("attestation failed: {0}")]
    Attest(ClientError),
    /// First start without a join token.
    #[error(
        "this agent has not attested yet: give it a join token (join_token in agent.toml, or --join-token)"
    )]
    NoJoinToken,
    /// The trust bundle file could not be read.
    #[error("trust_bundle_path {path}: {reason}")]
    TrustBundle {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The Workload API socket could not be bound.
    #[error("socket_path {path}: {source}")]
    Socket {
        /// The socket.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A listener failed.
    #[error("{0}")]
    Listener(String),
}

/// Loads the trust bundle into the client's roots; true for an insecure bootstrap.
fn bootstrap_roots(cfg: &Config, client: &ServerClient) -> Result<bool, RunError> {
    match &cfg.bootstrap {
        Bootstrap::TrustBundle(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| RunError::TrustBundle {
                path: p.display().to_string(),
                reason: e.to_string(),
            })?;
            let roots =
                continuity_common::x509::pem_decode_all("CERTIFICATE", &text).map_err(|e| {
                    RunError::TrustBundle {
                        path: p.display().to_string(),
                        reason: e,
                    }
                })?;
            if roots.is_empty() {
                return Err(RunError::TrustBundle {
                    path: p.display().to_string(),
                    reason: "no CERTIFICATE blocks".into(),
                });
            }
            client.roots().replace(roots);
            Ok(false)
        }
        Bootstrap::Insecure => {
            tracing::warn!(
                "insecure_bootstrap: the server is not authenticated for this first attestation"
            );
            Ok(true)
        }
    }
}

/// One attestation attempt with the configured node attestor.
async fn attest_once(
    cfg: &Config,
    client: &ServerClient,
    token: &str,
    insecure: bool,
) -> Result<Result<Attested, ClientError>, RunError> {
    Ok(match &cfg.node_attestor {
        NodeAttestor::JoinToken => {
            client
                .attest("join_token", token.as_bytes().to_vec(), insecure)
                .await
        }
        NodeAttestor::K8sPsat {
            cluster,
            token_path,
        } => {
            // Read fresh on every attempt: the kubelet rotates projected tokens.
            let t = std::fs::read_to_string(token_path).map_err(|e| RunError::TrustBundle {
                path: token_path.display().to_string(),
                reason: format!("cannot read the projected service-account token: {e}"),
            })?;
            let payload = serde_json::json!({"cluster": cluster, "token": t.trim()}).to_string();
            client
                .attest("k8s_psat", payload.into_bytes(), insecure)
                .await
        }
    })
}

async fn attest(
    cfg: &Config,
    client: &ServerClient,
    token: &str,
) -> Result<PersistedState, RunError> {
    let insecure = bootstrap_roots(cfg, client)?;
    let mut backoff = Duration::from_millis(250);
    loop {
        let result = attest_once(cfg, client, token, insecure).await?;
        // The server just tried (nothing else moves the client during attestation).
        let server = client.server();
        match result {
            Ok(a) => {
                tracing::info!(agent = %a.agent_id, server = ?client.server(), "attested to the server");
                return Ok(PersistedState {
                    agent_id: a.agent_id,
                    agent_svid: Some(a.svid),
                    bundle: a.bundle,
                    ..Default::default()
                });
            }
            // Unreachable (down, not the trust domain's server, Unavailable): the next server,
            // after a jittered back-off.
            Err(e) if client.failed(server, &e) => {
                let wait = backoff.mul_f64(0.75 + 0.5 * continuity_common::rand::jitter_fraction());
                let tried = server.map(|s| s.to_string()).unwrap_or_default();
                tracing::warn!(error = %e, server = %tried, retry_in = ?wait, "cannot reach the server to attest; retrying");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            // The server refused: retrying will not help.
            Err(e) => return Err(RunError::Attest(e)),
        }
    }
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

/// The persisted state, or (first start, or no agent SVID kept) a fresh attestation, saved.
async fn load_or_attest(
    cfg: &Config,
    storage: &Storage,
    client: &ServerClient,
    join_token: Option<String>,
) -> Result<PersistedState, RunError> {
    if let Some(s) = storage.load()?
        && s.agent_svid.is_some()
    {
        tracing::info!(agent = %s.agent_id, entries = s.entries.len(), "resuming from persisted state");
        return Ok(s);
    }
    let token = match cfg.node_attestor {
        NodeAttestor::JoinToken => join_token
            .or_else(|| cfg.join_token.as_ref().map(|t| t.expose().to_string()))
            .ok_or(RunError::NoJoinToken)?,
        NodeAttestor::K8sPsat { .. } => String::new(),
    };
    let s = attest(cfg, client, &token).await?;
    storage.save(&s)?;
    Ok(s)
}

fn log_fd_limit(limits: &WorkloadApiConfig) {
    match endpoints::conns::raise_fd_limit() {
        Some(n) => tracing::info!(
            open_files = n,
            max_connections = limits.max_connections,
            "open-files limit (RLIMIT_NOFILE soft limit, raised to the hard limit)"
        ),
        None => tracing::warn!("cannot read the open-files limit (RLIMIT_NOFILE)"),
    }
}

/// Serves `/live` and `/ready` (ready once a bundle is held) on `addr`.
async fn serve_health(addr: std::net::SocketAddr, m: Arc<Manager>) -> Result<(), RunError> {
    continuity_common::http::serve(addr, move |path| {
        let ready = !m.snapshot().bundle.x509.is_empty();
        async move {
            match path.as_str() {
                "/live" => (200, "text/plain", "live\n".into()),
                "/ready" if ready => (200, "text/plain", "ready\n".into()),
                "/ready" => (503, "text/plain", "no bundle yet\n".into()),
                _ => (404, "text/plain", "not found\n".into()),
            }
        }
    })
    .await
    .map_err(|e| RunError::Listener(format!("health.bind_address {addr}: {e}")))
}

/// Serves `/metrics` (Prometheus text) on `addr`.
async fn serve_metrics(addr: std::net::SocketAddr, m: AgentMetrics) -> Result<(), RunError> {
    continuity_common::http::serve(addr, move |path| {
        let reply = match path.as_str() {
            "/metrics" => (200, "text/plain; version=0.0.4", m.render()),
            _ => (404, "text/plain", "not found\n".into()),
        };
        std::future::ready(reply)
    })
    .await
    .map_err(|e| RunError::Listener(format!("metrics.bind_address {addr}: {e}")))
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(cfg: Config, join_token: Option<String>) -> Result<(), RunError> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let storage = Storage::open(&cfg.data_dir)?;
    let client = Arc::new(
        ServerClient::new(
            cfg.server_addresses.clone(),
            &cfg.trust_domain,
            TrustRoots::default(),
        )
        .map_err(RunError::Attest)?,
    );
    let state = load_or_attest(&cfg, &storage, &client, join_token).await?;
    let limits = &cfg.workload_api;
    log_fd_limit(limits);
    let manager = Manager::new(
        client,
        storage,
        clock.clone(),
        cfg.sync_interval,
        state,
        limits.jwt_cache_size,
    );
    let listener = endpoints::bind(&cfg.socket_path)
        .await
        .map_err(|source| RunError::Socket {
            path: cfg.socket_path.display().to_string(),
            source,
        })?;
    tokio::spawn(manager.clone().run());
    if let Some(addr) = cfg.health_address {
        serve_health(addr, manager.clone()).await?;
    }
    let rpc = Arc::new(RpcMetrics::default());
    if let Some(addr) = cfg.metrics_address {
        serve_metrics(addr, AgentMetrics::new(manager.clone(), rpc.clone())).await?;
    }
    let attestor: Arc<dyn crate::attestor::WorkloadAttestor> =
        Attestors::new(cfg.unix.clone(), cfg.k8s.clone());
    // One limiter for everything a workload can make reach the server.
    let limiter = Arc::new(RateLimiter::new(
        limits.server_calls_per_second,
        limits.server_calls_burst,
    ));
    let engine =
        endpoints::engine::EngineHandler::new(manager.clone(), attestor.clone(), limiter.clone());
    let sds = endpoints::sds::SdsHandler::new(manager.clone(), attestor.clone());
    let handler = WorkloadHandler::new(manager, attestor, clock, limiter, limits);
    tracing::info!(socket = %cfg.socket_path.display(), "Workload API and Envoy SDS ready");
    let result = endpoints::serve(
        listener,
        limits,
        handler,
        engine,
        sds,
        rpc,
        shutdown_signal(),
    )
    .await;
    let _ = std::fs::remove_file(&cfg.socket_path);
    result.map_err(|e| RunError::Listener(e.to_string()))
}
