//! server.toml: the file schema (serde, unknown keys refused) and the typed [`Config`] built from it once at start.
//!
//! One submodule per table: [`agent_api`], [`engines`], [`psat`] (`[node_attestors]`); the
//! `[key_manager]` table belongs to [`crate::keys::config`].

mod agent_api;
mod audit;
mod cluster;
mod controller;
mod datastore;
mod engines;
mod federation;
mod integrity;
mod k8s_bundle;
mod oidc;
mod psat;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use continuity_common::TrustDomain;
use continuity_common::logging::LogFormat;
use serde::Deserialize;

pub use crate::ca::upstream::{FileUpstream, UpstreamConfig, UpstreamKey};
use crate::keys::KeyType;
pub use crate::keys::config::{FileKeyManager, KeyManagerConfig, PinSource};
pub use agent_api::{AgentApiConfig, FileAgentApi};
pub use audit::{AuditConfig, DEFAULT_CHECKPOINT_INTERVAL, FileAudit};
pub use cluster::{ClusterConfig, FileCluster};
pub use controller::{ControllerConfig, FileController};
pub use engines::FileEngines;
pub use federation::{
    BundleEndpointConfig, EndpointProfile, FileBundleEndpoint, FileFederation, RefresherConfig,
};
pub use k8s_bundle::{FileK8sBundle, K8sBundleConfig};
pub use oidc::{FileOidcDiscovery, KEYS_PATH, OidcDiscoveryConfig};
pub use psat::{FileNodeAttestors, FilePsat, FilePsatCluster};

use continuity_common::config::invalid;
pub use continuity_common::config::{ConfigError, FileListener};

/// The file schema of server.toml, exactly as written by operators.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The trust domain this server is the authority for.
    pub trust_domain: Option<String>,
    /// Where the server keeps its state.
    pub data_dir: Option<PathBuf>,
    /// Agent-facing gRPC over TLS.
    pub bind_address: Option<String>,
    /// The admin API's Unix socket.
    pub admin_socket: Option<PathBuf>,
    /// ec-p256 | ec-p384 | rsa-2048 | rsa-4096.
    pub ca_key_type: Option<String>,
    /// CA lifetime.
    pub ca_ttl: Option<String>,
    /// Default X509-SVID lifetime.
    pub default_x509_svid_ttl: Option<String>,
    /// Default JWT-SVID lifetime.
    pub default_jwt_svid_ttl: Option<String>,
    /// `iss` claim of JWT-SVIDs (omitted when empty).
    pub jwt_issuer: Option<String>,
    /// trace | debug | info | warn | error.
    pub log_level: Option<String>,
    /// text | json.
    pub log_format: Option<LogFormat>,
    /// `[datastore]`.
    pub datastore: Option<FileDatastore>,
    /// `[key_manager]`.
    pub key_manager: Option<FileKeyManager>,
    /// `[health]`.
    pub health: Option<FileListener>,
    /// `[metrics]`.
    pub metrics: Option<FileListener>,
    /// `[jwks]`: Engine JWKS for relying parties.
    pub jwks: Option<FileListener>,
    /// `[oidc_discovery]`: the OIDC discovery document and JWT-SVID JWKS.
    pub oidc_discovery: Option<FileOidcDiscovery>,
    /// `[node_attestors]`.
    pub node_attestors: Option<FileNodeAttestors>,
    /// `[agent_api]`.
    pub agent_api: Option<FileAgentApi>,
    /// `[engines]`.
    pub engines: Option<FileEngines>,
    /// `[integrity]`.
    pub integrity: Option<integrity::FileIntegrity>,
    /// `[audit]`.
    pub audit: Option<FileAudit>,
    /// `[cluster]`: several servers on one datastore.
    pub cluster: Option<FileCluster>,
    /// `[controller]`: automatic registration from Kubernetes.
    pub controller: Option<FileController>,
    /// `[k8s_bundle]`: the ConfigMap kept holding the bundle.
    pub k8s_bundle: Option<FileK8sBundle>,
    /// `[federation]`: the SPIFFE bundle endpoint.
    pub federation: Option<FileFederation>,
    /// `[upstream_authority]`: an existing CA that signs this trust domain's CAs.
    pub upstream_authority: Option<FileUpstream>,
}

/// `[datastore]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDatastore {
    /// `sqlite://...` or `postgres://...`.
    pub url: Option<String>,
}

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// State directory.
    pub data_dir: PathBuf,
    /// Agent API listener.
    pub bind_address: SocketAddr,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// CA key type.
    pub ca_key_type: KeyType,
    /// CA lifetime.
    pub ca_ttl: Duration,
    /// Default X509-SVID lifetime.
    pub default_x509_svid_ttl: Duration,
    /// Default JWT-SVID lifetime.
    pub default_jwt_svid_ttl: Duration,
    /// `iss` for JWT-SVIDs.
    pub jwt_issuer: Option<String>,
    /// Datastore URL.
    pub datastore_url: String,
    /// Key manager.
    pub key_manager: KeyManagerConfig,
    /// Upstream authority (None: the CA is its own root).
    pub upstream_authority: Option<UpstreamConfig>,
    /// Health listener.
    pub health_address: Option<SocketAddr>,
    /// Metrics listener.
    pub metrics_address: Option<SocketAddr>,
    /// Engine JWKS listener (`/engines/<name>/jwks.json`).
    pub jwks_address: Option<SocketAddr>,
    /// The OIDC discovery provider (None: off).
    pub oidc_discovery: Option<OidcDiscoveryConfig>,
    /// k8s_psat clusters (empty: the attestor is off).
    pub psat_clusters: Vec<continuity_attestors::k8s_psat::ClusterConfig>,
    /// Log level.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// `[agent_api] previous_svid_grace`: how long an agent's previous SVID is still accepted
    /// after its successor was first used (in-flight calls on the old channel).
    pub previous_svid_grace: Duration,
    /// `[engines] max_encryptions_per_key_version`: the AES-GCM nonce budget of a key version.
    pub max_encryptions_per_key_version: u64,
    /// `[agent_api]` limits.
    pub agent_api: AgentApiConfig,
    /// `[integrity] verify_interval`: period of the record-MAC verifier.
    pub integrity_verify_interval: Duration,
    /// `[audit]`: checkpoints of the audit log.
    pub audit: AuditConfig,
    /// `[cluster]`: the change feed's poll and the leader leases.
    pub cluster: ClusterConfig,
    /// `[controller]`: automatic registration from Kubernetes (None: off).
    pub controller: Option<ControllerConfig>,
    /// `[k8s_bundle]`: the ConfigMap kept holding the bundle (None: not published).
    pub k8s_bundle: Option<K8sBundleConfig>,
    /// `[federation] bundle_endpoint` (None: not served).
    pub bundle_endpoint: Option<BundleEndpointConfig>,
    /// `[federation]`: how peers' bundle endpoints are fetched.
    pub federation_refresher: RefresherConfig,
}

/// Longest `[agent_api] previous_svid_grace`: a longer grace lets a stolen, superseded
/// agent key keep working beside the real agent for longer.
pub const MAX_PREVIOUS_SVID_GRACE: Duration = Duration::from_secs(300);
/// The longest `ca_ttl` accepted: 100 years.
const MAX_CA_TTL: Duration = Duration::from_secs(36_500 * 86_400);

/// The default admin socket path.
pub const DEFAULT_ADMIN_SOCKET: &str = "/tmp/continuity-server/private/admin.sock";

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = continuity_common::config::read(path)?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text (`path` only labels errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: FileConfig = continuity_common::config::parse_toml(text, path)?;
        Self::from_file(file)
    }

    /// Turns the file schema into the typed config.
    pub fn from_file(f: FileConfig) -> Result<Self, ConfigError> {
        let trust_domain = trust_domain(f.trust_domain.as_deref())?;
        let bind_address = socket_addr(
            f.bind_address.as_deref().unwrap_or("0.0.0.0:8081"),
            "bind_address",
        )?;
        let ca_key_type = f
            .ca_key_type
            .as_deref()
            .unwrap_or("ec-p256")
            .parse::<KeyType>()
            .map_err(|e| invalid("ca_key_type", e))?;
        let ttls = Ttls::from_file(&f)?;
        let data_dir = f
            .data_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/continuity/server"));
        let log_level = f.log_level.unwrap_or_else(|| "info".into());
        continuity_common::logging::check_level(&log_level).map_err(|m| invalid("log_level", m))?;
        let datastore_url = datastore::url(f.datastore, &data_dir)?;
        let key_manager =
            KeyManagerConfig::from_file(f.key_manager.unwrap_or_default(), &data_dir)?;
        let previous_svid_grace = previous_svid_grace(f.agent_api.as_ref())?;
        let listener = FileListener::address;
        let controller = ControllerConfig::from_file(f.controller, &trust_domain)?;
        let jwt_issuer = f.jwt_issuer.filter(|s| !s.is_empty());
        let oidc = OidcDiscoveryConfig::from_file(f.oidc_discovery, jwt_issuer.as_deref())?;
        Ok(Self {
            trust_domain,
            bind_address,
            admin_socket: f
                .admin_socket
                .unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into()),
            ca_key_type,
            ca_ttl: ttls.ca,
            default_x509_svid_ttl: ttls.x509,
            default_jwt_svid_ttl: ttls.jwt,
            oidc_discovery: oidc,
            jwt_issuer,
            datastore_url,
            key_manager,
            upstream_authority: UpstreamConfig::from_file(f.upstream_authority)?,
            health_address: listener(f.health, "health.bind_address")?,
            metrics_address: listener(f.metrics, "metrics.bind_address")?,
            jwks_address: listener(f.jwks, "jwks.bind_address")?,
            psat_clusters: psat::clusters(f.node_attestors.and_then(|n| n.k8s_psat))?,
            log_level,
            log_format: f.log_format.unwrap_or_default(),
            previous_svid_grace,
            max_encryptions_per_key_version: engines::max_encryptions(f.engines)?,
            agent_api: AgentApiConfig::from_file(f.agent_api)?,
            integrity_verify_interval: integrity::verify_interval(f.integrity)?,
            audit: AuditConfig::from_file(f.audit)?,
            cluster: ClusterConfig::from_file(f.cluster)?,
            controller,
            k8s_bundle: K8sBundleConfig::from_file(f.k8s_bundle)?,
            federation_refresher: RefresherConfig::from_file(f.federation.as_ref())?,
            bundle_endpoint: BundleEndpointConfig::from_file(f.federation)?,
            data_dir,
        })
    }
}

/// The CA and default SVID lifetimes, checked against each other.
struct Ttls {
    ca: Duration,
    x509: Duration,
    jwt: Duration,
}

impl Ttls {
    /// `ca_ttl` within [1m, 100 years]; both SVID defaults positive and shorter than it.
    fn from_file(f: &FileConfig) -> Result<Self, ConfigError> {
        let ca = duration(f.ca_ttl.as_deref(), "24h", "ca_ttl")?;
        let x509 = duration(
            f.default_x509_svid_ttl.as_deref(),
            "1h",
            "default_x509_svid_ttl",
        )?;
        let jwt = duration(
            f.default_jwt_svid_ttl.as_deref(),
            "5m",
            "default_jwt_svid_ttl",
        )?;
        if ca < Duration::from_secs(60) {
            return Err(invalid("ca_ttl", "must be at least 1m"));
        }
        // The CA adds it to now as i64 Unix seconds and writes the sum into certificates.
        if ca > MAX_CA_TTL {
            return Err(invalid("ca_ttl", "must be at most 36500d (100 years)"));
        }
        for (key, d) in [
            ("default_x509_svid_ttl", x509),
            ("default_jwt_svid_ttl", jwt),
        ] {
            if d.is_zero() || d >= ca {
                return Err(invalid(
                    key,
                    format!(
                        "must be positive and shorter than ca_ttl ({})",
                        continuity_common::duration::format(ca)
                    ),
                ));
            }
        }
        Ok(Self { ca, x509, jwt })
    }
}

/// `[agent_api] previous_svid_grace`, at most [`MAX_PREVIOUS_SVID_GRACE`].
fn previous_svid_grace(a: Option<&FileAgentApi>) -> Result<Duration, ConfigError> {
    let Some(v) = a.and_then(|a| a.previous_svid_grace.as_deref()) else {
        return Ok(crate::registry::DEFAULT_PREVIOUS_SVID_GRACE);
    };
    let d = continuity_common::duration::parse(v)
        .map_err(|m| invalid("agent_api.previous_svid_grace", m))?;
    if d > MAX_PREVIOUS_SVID_GRACE {
        return Err(invalid(
            "agent_api.previous_svid_grace",
            "must be at most 5m (the previous agent SVID only covers calls in flight during a renewal)",
        ));
    }
    Ok(d)
}

fn socket_addr(s: &str, key: &'static str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        invalid(
            key,
            format!("{s:?} is not host:port (e.g. \"127.0.0.1:8081\")"),
        )
    })
}

fn duration(v: Option<&str>, default: &str, key: &'static str) -> Result<Duration, ConfigError> {
    continuity_common::duration::parse(v.unwrap_or(default)).map_err(|m| invalid(key, m))
}

/// The required `trust_domain`.
fn trust_domain(v: Option<&str>) -> Result<TrustDomain, ConfigError> {
    let v = v.ok_or_else(|| invalid("trust_domain", "is required (e.g. \"example.org\")"))?;
    TrustDomain::new(v).map_err(|e| invalid("trust_domain", e.to_string()))
}
