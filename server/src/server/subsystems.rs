//! The subsystems every API serves from: data directory, datastore, key manager and CA, audit
//! log, registry, Engines and foreign bundles, built once at start and shared by handle.

use std::sync::Arc;

use continuity_common::Clock;

use super::{RunError, cluster, private_dir};
use crate::ca::upstream::UpstreamAuthority;
use crate::ca::{CaConfig, CaManager, SharedAuthority};
use crate::config::Config;
use crate::datastore::{DataStore, SqlDataStore};
use crate::engines::Engines;
use crate::integrity;
use crate::keys::{self, KeyManager, KeyType};
use crate::metrics::Metrics;
use crate::registry::Registry;

/// The subsystems every API serves from: built once at start, shared by handle.
pub(super) struct Core {
    pub(super) clock: Arc<dyn Clock>,
    pub(super) store: Arc<dyn DataStore>,
    pub(super) key_manager: Arc<dyn KeyManager>,
    /// Record MACs (the backup snapshot opens the datastore with it).
    pub(super) sealer: crate::datastore::RecordSealer,
    pub(super) ca: Arc<CaManager>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) registry: Arc<Registry>,
    pub(super) engines: Arc<Engines>,
    /// Foreign trust bundles.
    pub(super) federation: Arc<crate::federation::Federation>,
    /// What the agents report serving (revokes wait on it).
    pub(super) serving: Arc<crate::serving::ServingReports>,
    /// Fetches the federation relationships' bundle endpoints.
    pub(super) refresher: Arc<crate::federation::refresher::Refresher>,
    /// The change feed position read before the state above was loaded.
    pub(super) feed_cursor: i64,
    /// This server's name in the leader leases (kept in `data_dir/server-id`).
    pub(super) holder: String,
}

/// The data directory, datastore, key manager and CA, audit log, registry and Engines.
pub(super) async fn core(cfg: &Config, clock: Arc<dyn Clock>) -> Result<Core, RunError> {
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
    let registry = registry(cfg, &store, &clock, &audit, &metrics).await?;
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

/// The registry of entries, agents and join tokens, loaded from the datastore.
async fn registry(
    cfg: &Config,
    store: &Arc<dyn DataStore>,
    clock: &Arc<dyn Clock>,
    audit: &Arc<crate::audit::Audit>,
    metrics: &Arc<Metrics>,
) -> Result<Arc<Registry>, RunError> {
    let registry = Registry::load(
        store.clone(),
        store.clone(),
        clock.clone(),
        audit.clone(),
        metrics.clone(),
    )
    .await?;
    Ok(Arc::new(
        registry.with_previous_svid_grace(cfg.previous_svid_grace),
    ))
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
