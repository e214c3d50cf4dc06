//! Several servers on one datastore: this server's stable lease holder name, the change-feed
//! follower, the Engine key lifecycle under its lease, and handing the leases over at shutdown.

use std::sync::Arc;
use std::time::Duration;

use continuity_common::fsperm::{FsPermError, SecureDir};

use super::{Core, RunError};
use crate::config::Config;
use crate::feed::{Feed, Followers};
use crate::scheduler::Job;

/// The lease that makes one server run the Engine key lifecycle step.
const ENGINE_LEASE: &str = "engine-lifecycle";

/// This server's stable name in the leader leases: random, made once in `data_dir/server-id`,
/// so a restarted server takes its own unexpired lease back at once.
pub(super) fn server_id(data_dir: &SecureDir) -> Result<String, RunError> {
    let name = "server-id";
    let bad = |e: FsPermError| RunError::Path(format!("data_dir: {e}"));
    loop {
        if let Some(raw) = data_dir.read(std::ffi::OsStr::new(name)).map_err(bad)? {
            let id = String::from_utf8_lossy(&raw).trim().to_string();
            if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(id);
            }
            return Err(RunError::Path(format!(
                "data_dir: {name} is malformed (expected 32 hex digits); remove it to make a new one"
            )));
        }
        let id = hex::encode(
            continuity_common::rand::array::<16>().map_err(|e| RunError::Path(e.to_string()))?,
        );
        data_dir
            .write_new(name, 0o600, |f| {
                std::io::Write::write_all(f, format!("{id}\n").as_bytes())
            })
            .map_err(bad)?;
    }
}

/// The federation refresher of `federation`, with the Web PKI roots of
/// `[federation] web_ca_file` read now.
pub(super) fn refresher(
    cfg: &Config,
    federation: &Arc<crate::federation::Federation>,
) -> Result<Arc<crate::federation::refresher::Refresher>, RunError> {
    use rustls_pki_types::pem::PemObject;
    let r = &cfg.federation_refresher;
    let web_roots = match &r.web_ca_file {
        None => None,
        Some(path) => {
            let bad = |e: String| {
                RunError::Path(format!("federation.web_ca_file: {}: {e}", path.display()))
            };
            let certs: Vec<Vec<u8>> = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(e.to_string()))?
                .into_iter()
                .map(|c| c.to_vec())
                .collect();
            if certs.is_empty() {
                return Err(bad("no CERTIFICATE".into()));
            }
            Some(certs)
        }
    };
    Ok(crate::federation::refresher::Refresher::new(
        federation.clone(),
        r.min_interval,
        web_roots,
    ))
}

/// Starts the change-feed follower of `core`, polling every `poll`.
pub(super) fn follow(core: &Core, poll: Duration) -> tokio::task::JoinHandle<()> {
    Feed::new(
        core.store.clone(),
        Followers {
            registry: core.registry.clone(),
            engines: core.engines.clone(),
            ca: core.ca.clone(),
            federation: core.federation.clone(),
        },
        poll,
        core.feed_cursor,
    )
    .spawn()
}

/// The Engine key lifecycle step every `period`, run only by the holder of its lease.
pub(super) fn engine_lifecycle_job(core: &Core, period: Duration, lease_ttl: Duration) -> Job {
    let (engines, leases, clock) = (core.engines.clone(), core.store.clone(), core.clock.clone());
    let holder = core.holder.clone();
    let ttl = i64::try_from(lease_ttl.as_secs()).unwrap_or(i64::MAX);
    Job::every(
        "engine-key-lifecycle",
        period,
        "Engine key lifecycle step failed; will retry",
        move || {
            let (engines, leases, holder) = (engines.clone(), leases.clone(), holder.clone());
            let now = clock.unix();
            async move {
                // One server at a time destroys and rotates on schedule.
                if leases.try_lease(ENGINE_LEASE, &holder, now, ttl).await? {
                    engines.tick().await?;
                }
                Ok(())
            }
        },
    )
}

/// Starts the registration controller when `[controller]` is set; it writes only while this
/// server holds its lease.
pub(super) fn controller(cfg: &Config, core: &Core) -> Result<(), RunError> {
    let Some(c) = &cfg.controller else {
        return Ok(());
    };
    let deps = crate::controller::Deps {
        registry: core.registry.clone(),
        engines: core.engines.clone(),
        trust_domain: cfg.trust_domain.clone(),
        leadership: crate::controller::Leadership {
            leases: core.store.clone(),
            holder: core.holder.clone(),
            lease_ttl: cfg.cluster.lease_ttl,
            clock: core.clock.clone(),
        },
    };
    crate::controller::spawn(c, deps)?;
    Ok(())
}

/// Gives this server's leases up, so another server need not wait for them to expire.
/// The registration controller's lease is among them when `[controller]` is set.
pub(super) async fn release_leases(core: &Core, cfg: &Config) {
    let controller = cfg
        .controller
        .as_ref()
        .map(|c| crate::controller::lease_name(&c.cluster_name));
    let fixed = [
        crate::ca::CA_LEASE,
        ENGINE_LEASE,
        crate::federation::refresher::REFRESHER_LEASE,
    ]
    .map(String::from);
    for lease in fixed.into_iter().chain(controller) {
        let lease = lease.as_str();
        if let Err(e) = core.store.release_lease(lease, &core.holder).await {
            tracing::warn!(lease, error = %e, "could not release a lease at shutdown; it expires by itself");
        }
    }
}
