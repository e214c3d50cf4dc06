//! Wiring: datastore, key manager, CA, registry, Engines, the periodic jobs, the two gRPC
//! listeners, and the health, metrics and JWKS HTTP listeners.
//!
//! Each subsystem is built by its own function that returns its handle (and, for listeners,
//! the future that serves it), so [`run`] reads as the list of them.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use continuity_common::SystemClock;
use continuity_common::fsperm::{SecureDir, secure_dir};
use continuity_common::tls::TrustRoots;

use crate::api::tls::{self, ServerIdentity};
use crate::config::Config;
use crate::integrity;
use crate::scheduler::{FailureLevel, Job, Scheduler};

mod bundle_endpoint;
mod cluster;
mod http;
mod listeners;
mod oidc;
mod subsystems;

use self::subsystems::Core;

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

/// Runs the server until SIGINT/SIGTERM.
pub async fn run(cfg: Config) -> Result<(), RunError> {
    let core = subsystems::core(&cfg, Arc::new(SystemClock)).await?;
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
    let agent_api = listeners::agent_api(&cfg, &core, &identity, roots, stop_rx.clone()).await?;
    let admin_api = listeners::admin_api(&cfg, &core, stop_rx).await?;
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
