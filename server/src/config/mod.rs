//! server.toml: the file schema (serde, unknown keys refused) and the typed [`Config`] built from it once at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use continuity_common::TrustDomain;
use continuity_common::logging::LogFormat;
use serde::Deserialize;

use crate::keys::KeyType;
pub use crate::keys::config::{FileKeyManager, KeyManagerConfig, PinSource};

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
    /// `[node_attestors]`.
    pub node_attestors: Option<FileNodeAttestors>,
    /// `[agent_api]`.
    pub agent_api: Option<FileAgentApi>,
    /// `[engines]`.
    pub engines: Option<FileEngines>,
}

/// `[agent_api]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAgentApi {
    /// How long an agent's previous SVID is still accepted after its successor was first used.
    pub previous_svid_grace: Option<String>,
    /// Open connections in total (handshaking ones included).
    pub max_connections: Option<u64>,
    /// Open connections from one IP address.
    pub max_connections_per_ip: Option<u64>,
    /// HTTP/2 streams open at once on one connection.
    pub max_concurrent_streams: Option<u64>,
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Option<String>,
    /// Time AttestAgent waits for its first message.
    pub first_message_timeout: Option<String>,
    /// Time a call has to produce its response.
    pub request_timeout: Option<String>,
    /// HTTP/2 PING interval (also the TCP keepalive idle time).
    pub keepalive_interval: Option<String>,
    /// Time to wait for a PING answer before dropping the connection.
    pub keepalive_timeout: Option<String>,
    /// SVIDs signed per second per agent (each CSR of a batch, each JWT-SVID, each renewal).
    pub svids_per_second: Option<f64>,
    /// SVIDs one agent may have signed in a burst.
    pub svid_burst: Option<u64>,
    /// EngineBroker calls per second per agent.
    pub engine_calls_per_second: Option<f64>,
    /// EngineBroker calls one agent may make in a burst.
    pub engine_call_burst: Option<u64>,
}

/// `[engines]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEngines {
    /// AES-GCM encryptions one key version may do before automatic rotation.
    pub max_encryptions_per_key_version: Option<i64>,
}

/// The validated `[agent_api]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentApiConfig {
    /// Open connections in total.
    pub max_connections: usize,
    /// Open connections per peer IP.
    pub max_connections_per_ip: usize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// AttestAgent first-message deadline.
    pub first_message_timeout: Duration,
    /// Per-call deadline.
    pub request_timeout: Duration,
    /// HTTP/2 PING (and TCP keepalive) interval.
    pub keepalive_interval: Duration,
    /// PING answer deadline.
    pub keepalive_timeout: Duration,
    /// Signing rate per agent.
    pub svids_per_second: f64,
    /// Signing burst per agent.
    pub svid_burst: u32,
    /// Engine call rate per agent.
    pub engine_calls_per_second: f64,
    /// Engine call burst per agent.
    pub engine_call_burst: u32,
}

impl Default for AgentApiConfig {
    fn default() -> Self {
        Self {
            max_connections: 8192,
            max_connections_per_ip: 1024,
            max_concurrent_streams: 100,
            handshake_timeout: Duration::from_secs(10),
            first_message_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            svids_per_second: 50.0,
            svid_burst: 1000,
            engine_calls_per_second: 500.0,
            engine_call_burst: 5000,
        }
    }
}

impl AgentApiConfig {
    /// Validates the table; every error names its key.
    pub fn from_file(f: Option<FileAgentApi>) -> Result<Self, ConfigError> {
        let d = Self::default();
        let Some(f) = f else { return Ok(d) };
        let count = |v: Option<u64>, default: usize, key: &'static str, max: u64| match v {
            None => Ok(default),
            Some(n) if n >= 1 && n <= max => Ok(n as usize),
            Some(n) => Err(invalid(key, format!("{n} is not between 1 and {max}"))),
        };
        let time = |v: Option<String>, default: Duration, key: &'static str| match v {
            None => Ok(default),
            Some(s) => {
                let t = continuity_common::duration::parse(&s).map_err(|m| invalid(key, m))?;
                if t.is_zero() || t > Duration::from_secs(3600) {
                    return Err(invalid(
                        key,
                        format!("{s:?} must be positive and at most 1h"),
                    ));
                }
                Ok(t)
            }
        };
        let rate = |v: Option<f64>, default: f64, key: &'static str| match v {
            None => Ok(default),
            Some(r) if r.is_finite() && r > 0.0 && r <= 1e6 => Ok(r),
            Some(r) => Err(invalid(
                key,
                format!("{r} must be positive (at most 1000000)"),
            )),
        };
        Ok(Self {
            max_connections: count(
                f.max_connections,
                d.max_connections,
                "agent_api.max_connections",
                1 << 20,
            )?,
            max_connections_per_ip: count(
                f.max_connections_per_ip,
                d.max_connections_per_ip,
                "agent_api.max_connections_per_ip",
                1 << 20,
            )?,
            max_concurrent_streams: count(
                f.max_concurrent_streams,
                d.max_concurrent_streams as usize,
                "agent_api.max_concurrent_streams",
                10_000,
            )? as u32,
            handshake_timeout: time(
                f.handshake_timeout,
                d.handshake_timeout,
                "agent_api.handshake_timeout",
            )?,
            first_message_timeout: time(
                f.first_message_timeout,
                d.first_message_timeout,
                "agent_api.first_message_timeout",
            )?,
            request_timeout: time(
                f.request_timeout,
                d.request_timeout,
                "agent_api.request_timeout",
            )?,
            keepalive_interval: time(
                f.keepalive_interval,
                d.keepalive_interval,
                "agent_api.keepalive_interval",
            )?,
            keepalive_timeout: time(
                f.keepalive_timeout,
                d.keepalive_timeout,
                "agent_api.keepalive_timeout",
            )?,
            svids_per_second: rate(
                f.svids_per_second,
                d.svids_per_second,
                "agent_api.svids_per_second",
            )?,
            svid_burst: count(
                f.svid_burst,
                d.svid_burst as usize,
                "agent_api.svid_burst",
                1_000_000,
            )? as u32,
            engine_calls_per_second: rate(
                f.engine_calls_per_second,
                d.engine_calls_per_second,
                "agent_api.engine_calls_per_second",
            )?,
            engine_call_burst: count(
                f.engine_call_burst,
                d.engine_call_burst as usize,
                "agent_api.engine_call_burst",
                1_000_000,
            )? as u32,
        })
    }
}

/// `[node_attestors]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNodeAttestors {
    /// `[node_attestors.k8s_psat]`.
    pub k8s_psat: Option<FilePsat>,
}

/// `[node_attestors.k8s_psat]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePsat {
    /// `[node_attestors.k8s_psat.clusters.<name>]`.
    pub clusters: std::collections::BTreeMap<String, FilePsatCluster>,
}

/// One cluster of `[node_attestors.k8s_psat.clusters]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePsatCluster {
    /// "namespace:service-account" pairs agents may run as.
    pub service_account_allow_list: Option<Vec<String>>,
    /// Token audience (default continuity-server).
    pub audience: Option<String>,
    /// Required `iss` (offline validation).
    pub issuer: Option<String>,
    /// Offline: the issuer's JWKS file.
    pub jwks_path: Option<PathBuf>,
    /// Offline: the issuer URL for OIDC discovery.
    pub oidc_discovery_url: Option<String>,
    /// CA of a private OIDC issuer (PEM); system roots otherwise.
    pub oidc_ca_path: Option<PathBuf>,
    /// OIDC discovery: how long fetched issuer keys are used (default 5m).
    pub jwks_cache_ttl: Option<String>,
    /// OIDC discovery: least time between two key fetches (default 30s).
    pub jwks_refresh_interval: Option<String>,
    /// Online: the API server for TokenReview.
    pub token_review_api_server: Option<String>,
    /// Online: the API server's CA (PEM).
    pub token_review_ca_path: Option<PathBuf>,
    /// Online: a token allowed to create TokenReviews.
    pub token_review_token_path: Option<PathBuf>,
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
    /// Health listener.
    pub health_address: Option<SocketAddr>,
    /// Metrics listener.
    pub metrics_address: Option<SocketAddr>,
    /// Engine JWKS listener (`/engines/<name>/jwks.json`).
    pub jwks_address: Option<SocketAddr>,
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
        let trust_domain = TrustDomain::new(
            f.trust_domain
                .as_deref()
                .ok_or_else(|| invalid("trust_domain", "is required (e.g. \"example.org\")"))?,
        )
        .map_err(|e| invalid("trust_domain", e.to_string()))?;
        let data_dir = f
            .data_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/continuity/server"));
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
        let ca_ttl = duration(f.ca_ttl.as_deref(), "24h", "ca_ttl")?;
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
        if ca_ttl < Duration::from_secs(60) {
            return Err(invalid("ca_ttl", "must be at least 1m"));
        }
        // The CA adds it to now as i64 Unix seconds and writes the sum into certificates.
        if ca_ttl > MAX_CA_TTL {
            return Err(invalid("ca_ttl", "must be at most 36500d (100 years)"));
        }
        for (key, d) in [
            ("default_x509_svid_ttl", x509),
            ("default_jwt_svid_ttl", jwt),
        ] {
            if d.is_zero() || d >= ca_ttl {
                return Err(invalid(
                    key,
                    format!(
                        "must be positive and shorter than ca_ttl ({})",
                        continuity_common::duration::format(ca_ttl)
                    ),
                ));
            }
        }
        let log_level = f.log_level.unwrap_or_else(|| "info".into());
        continuity_common::logging::check_level(&log_level).map_err(|m| invalid("log_level", m))?;
        let datastore_url = match f.datastore.and_then(|d| d.url) {
            Some(u)
                if u.starts_with("sqlite://")
                    || u.starts_with("postgres://")
                    || u.starts_with("postgresql://") =>
            {
                u
            }
            Some(u) => {
                return Err(invalid(
                    "datastore.url",
                    format!("{u:?} is neither sqlite://... nor postgres://..."),
                ));
            }
            None => format!(
                "sqlite://{}?mode=rwc",
                data_dir.join("datastore.sqlite3").display()
            ),
        };
        let key_manager = KeyManagerConfig::from_file(f.key_manager.unwrap_or_default(), &data_dir)?;
        let previous_svid_grace = match f
            .agent_api
            .as_ref()
            .and_then(|a| a.previous_svid_grace.clone())
        {
            None => crate::registry::DEFAULT_PREVIOUS_SVID_GRACE,
            Some(v) => {
                let d = continuity_common::duration::parse(&v)
                    .map_err(|m| invalid("agent_api.previous_svid_grace", m))?;
                if d > MAX_PREVIOUS_SVID_GRACE {
                    return Err(invalid(
                        "agent_api.previous_svid_grace",
                        "must be at most 5m (the previous agent SVID only covers calls in flight during a renewal)",
                    ));
                }
                d
            }
        };
        let listener = FileListener::address;
        Ok(Self {
            trust_domain,
            bind_address,
            admin_socket: f
                .admin_socket
                .unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into()),
            ca_key_type,
            ca_ttl,
            default_x509_svid_ttl: x509,
            default_jwt_svid_ttl: jwt,
            jwt_issuer: f.jwt_issuer.filter(|s| !s.is_empty()),
            datastore_url,
            key_manager,
            health_address: listener(f.health, "health.bind_address")?,
            metrics_address: listener(f.metrics, "metrics.bind_address")?,
            jwks_address: listener(f.jwks, "jwks.bind_address")?,
            psat_clusters: psat(f.node_attestors.and_then(|n| n.k8s_psat))?,
            log_level,
            log_format: f.log_format.unwrap_or_default(),
            previous_svid_grace,
            max_encryptions_per_key_version: max_encryptions(f.engines)?,
            agent_api: AgentApiConfig::from_file(f.agent_api)?,
            data_dir,
        })
    }
}

fn psat(
    p: Option<FilePsat>,
) -> Result<Vec<continuity_attestors::k8s_psat::ClusterConfig>, ConfigError> {
    use continuity_attestors::k8s_psat::{ClusterConfig, DEFAULT_AUDIENCE, Validation};
    let mut out = Vec::new();
    for (name, c) in p.map(|p| p.clusters).unwrap_or_default() {
        let key = "node_attestors.k8s_psat.clusters";
        let allow = c
            .service_account_allow_list
            .ok_or_else(|| invalid(key, format!("cluster {name:?}: service_account_allow_list is required (\"namespace:service-account\")")))?;
        if let Some(bad) = allow.iter().find(|a| a.split(':').count() != 2) {
            return Err(invalid(
                key,
                format!("cluster {name:?}: {bad:?} is not \"namespace:service-account\""),
            ));
        }
        let oidc = c.oidc_discovery_url.is_some();
        let ttl_key = "node_attestors.k8s_psat.clusters.<name>.jwks_cache_ttl";
        let interval_key = "node_attestors.k8s_psat.clusters.<name>.jwks_refresh_interval";
        for (set, k) in [
            (c.jwks_cache_ttl.is_some(), ttl_key),
            (c.jwks_refresh_interval.is_some(), interval_key),
        ] {
            if set && !oidc {
                return Err(invalid(
                    k,
                    format!("cluster {name:?}: only applies with oidc_discovery_url"),
                ));
            }
        }
        let cache_ttl = cluster_duration(c.jwks_cache_ttl.as_deref(), "5m", &name, ttl_key)?;
        let refresh_interval = cluster_duration(
            c.jwks_refresh_interval.as_deref(),
            "30s",
            &name,
            interval_key,
        )?;
        if refresh_interval.is_zero() || refresh_interval > cache_ttl {
            return Err(invalid(
                interval_key,
                format!("cluster {name:?}: must be more than 0 and at most jwks_cache_ttl"),
            ));
        }
        let validation = match (c.jwks_path, c.oidc_discovery_url, c.token_review_api_server) {
            (Some(p), None, None) => Validation::JwksFile(p),
            (None, Some(u), None) => Validation::OidcDiscovery {
                issuer: u,
                ca_path: c.oidc_ca_path,
                cache_ttl,
                refresh_interval,
            },
            (None, None, Some(api)) => Validation::TokenReview {
                api_server: api,
                ca_path: c.token_review_ca_path.ok_or_else(|| invalid(key, format!("cluster {name:?}: token_review_ca_path is required with token_review_api_server")))?,
                token_path: c
                    .token_review_token_path
                    .ok_or_else(|| invalid(key, format!("cluster {name:?}: token_review_token_path is required with token_review_api_server")))?,
            },
            _ => {
                return Err(invalid(
                    key,
                    format!("cluster {name:?}: set exactly one of jwks_path, oidc_discovery_url, token_review_api_server"),
                ));
            }
        };
        out.push(ClusterConfig {
            name,
            service_account_allow_list: allow,
            audience: c.audience.unwrap_or_else(|| DEFAULT_AUDIENCE.into()),
            issuer: c.issuer,
            validation,
        });
    }
    Ok(out)
}

/// Random 96-bit nonces are safe for about 2^32 encryptions per key; more is refused.
const MAX_ENCRYPTIONS_LIMIT: u64 = 1 << 32;

fn max_encryptions(e: Option<FileEngines>) -> Result<u64, ConfigError> {
    let Some(n) = e.and_then(|e| e.max_encryptions_per_key_version) else {
        return Ok(crate::engines::DEFAULT_MAX_ENCRYPTIONS_PER_KEY_VERSION);
    };
    match u64::try_from(n) {
        Ok(n) if (1..=MAX_ENCRYPTIONS_LIMIT).contains(&n) => Ok(n),
        _ => Err(invalid(
            "engines.max_encryptions_per_key_version",
            format!(
                "{n} is not between 1 and {MAX_ENCRYPTIONS_LIMIT} (2^32, the safe bound for random AES-GCM nonces)"
            ),
        )),
    }
}

fn cluster_duration(
    v: Option<&str>,
    default: &str,
    cluster: &str,
    key: &'static str,
) -> Result<Duration, ConfigError> {
    continuity_common::duration::parse(v.unwrap_or(default))
        .map_err(|m| invalid(key, format!("cluster {cluster:?}: {m}")))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("server.toml"))
    }

    #[test]
    fn defaults_apply() {
        let c = parse("trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"").unwrap();
        assert_eq!(c.ca_ttl, Duration::from_secs(86400));
        assert_eq!(c.max_encryptions_per_key_version, 1 << 31);
        assert_eq!(
            c.key_manager,
            KeyManagerConfig::Disk {
                dir: "/tmp/x/keys".into()
            }
        );
        assert!(
            c.datastore_url
                .starts_with("sqlite:///tmp/x/datastore.sqlite3")
        );
    }

    #[test]
    fn full_example_documents_every_key_and_parses() {
        let text = include_str!("../../deploy/server.full.toml");
        parse(text).unwrap();
        for key in [
            "trust_domain",
            "data_dir",
            "bind_address",
            "admin_socket",
            "ca_key_type",
            "ca_ttl",
            "default_x509_svid_ttl",
            "default_jwt_svid_ttl",
            "jwt_issuer",
            "log_level",
            "log_format",
            "[datastore]",
            "url",
            "[key_manager]",
            "kind",
            "module",
            "token_label",
            "pin_env",
            "pin_file",
            "[health]",
            "[metrics]",
            "[engines]",
            "max_encryptions_per_key_version",
            "[agent_api]",
            "max_connections_per_ip",
            "max_concurrent_streams",
            "handshake_timeout",
            "first_message_timeout",
            "request_timeout",
            "keepalive_interval",
            "keepalive_timeout",
            "svids_per_second",
            "svid_burst",
            "engine_calls_per_second",
            "engine_call_burst",
        ] {
            assert!(
                text.contains(key),
                "deploy/server.full.toml does not document {key}"
            );
        }
    }

    #[test]
    fn psat_key_cache_settings_are_checked_and_name_their_key() {
        let c = |extra: &str, source: &str| {
            parse(&format!(
                "trust_domain = \"e.org\"\n[node_attestors.k8s_psat.clusters.c1]\nservice_account_allow_list = [\"a:b\"]\n{source}\n{extra}"
            ))
        };
        let oidc = "oidc_discovery_url = \"https://oidc.example\"";
        let cfg = c("", oidc).unwrap();
        let continuity_attestors::k8s_psat::Validation::OidcDiscovery {
            cache_ttl,
            refresh_interval,
            ..
        } = &cfg.psat_clusters[0].validation
        else {
            panic!("not OIDC discovery");
        };
        assert_eq!(
            (*cache_ttl, *refresh_interval),
            (
                continuity_attestors::k8s_psat::DEFAULT_JWKS_CACHE_TTL,
                continuity_attestors::k8s_psat::DEFAULT_JWKS_REFRESH_INTERVAL
            )
        );
        for (extra, source, key) in [
            ("jwks_cache_ttl = \"soon\"", oidc, "jwks_cache_ttl"),
            (
                "jwks_refresh_interval = \"0s\"",
                oidc,
                "jwks_refresh_interval",
            ),
            (
                "jwks_cache_ttl = \"10s\"\njwks_refresh_interval = \"1m\"",
                oidc,
                "jwks_refresh_interval",
            ),
            (
                "jwks_cache_ttl = \"1m\"",
                "jwks_path = \"/j.json\"",
                "jwks_cache_ttl",
            ),
        ] {
            let e = c(extra, source).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("c1"), "{key}: {e}");
        }
    }

    #[test]
    fn agent_api_defaults_and_errors_name_the_key() {
        let c = parse("trust_domain = \"e.org\"").unwrap();
        assert_eq!(c.agent_api, AgentApiConfig::default());
        assert_eq!(c.agent_api.max_concurrent_streams, 100);
        let c = parse(
            "trust_domain = \"e.org\"\n[agent_api]\nsvid_burst = 7\nhandshake_timeout = \"2s\"",
        )
        .unwrap();
        assert_eq!(c.agent_api.svid_burst, 7);
        assert_eq!(c.agent_api.handshake_timeout, Duration::from_secs(2));
        for (bad, key) in [
            ("max_connections = 0", "agent_api.max_connections"),
            (
                "max_concurrent_streams = 100000",
                "agent_api.max_concurrent_streams",
            ),
            ("handshake_timeout = \"0s\"", "agent_api.handshake_timeout"),
            (
                "first_message_timeout = \"soon\"",
                "agent_api.first_message_timeout",
            ),
            ("svids_per_second = -1.0", "agent_api.svids_per_second"),
            (
                "engine_calls_per_second = nan",
                "agent_api.engine_calls_per_second",
            ),
            ("svid_burst = 0", "agent_api.svid_burst"),
        ] {
            let e = parse(&format!("trust_domain = \"e.org\"\n[agent_api]\n{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
        let e = parse("trust_domain = \"e.org\"\n[agent_api]\nmax_streams = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_streams"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("trust_domain = \"example.org\"\nca_tll = \"1h\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca_tll"), "{e}");
        let e = parse("trust_domain = \"example.org\"\nca_ttl = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`ca_ttl`"), "{e}");
        let e = parse("trust_domain = \"Bad Domain\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`trust_domain`"), "{e}");
        let e = parse("trust_domain = \"e.org\"\n[key_manager]\nkind = \"pkcs11\"\nmodule = \"/x.so\"\ntoken_label = \"t\"\npin = \"1234\"").unwrap_err().to_string();
        assert!(e.contains("`key_manager.pin`"), "{e}");
        for bad in ["0", "-1", "4294967297"] {
            let e = parse(&format!(
                "trust_domain = \"e.org\"\n[engines]\nmax_encryptions_per_key_version = {bad}"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("`engines.max_encryptions_per_key_version`"),
                "{e}"
            );
        }
        let c = parse("trust_domain = \"e.org\"\n[engines]\nmax_encryptions_per_key_version = 10")
            .unwrap();
        assert_eq!(c.max_encryptions_per_key_version, 10);
        let e = parse("trust_domain = \"e.org\"\nca_key_type = \"dsa\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`ca_key_type`"), "{e}");
        for bad in ["soon", "1h"] {
            let e = parse(&format!(
                "trust_domain = \"e.org\"\n[agent_api]\nprevious_svid_grace = \"{bad}\""
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("`agent_api.previous_svid_grace`"), "{e}");
        }
        let c =
            parse("trust_domain = \"e.org\"\n[agent_api]\nprevious_svid_grace = \"0s\"").unwrap();
        assert_eq!(c.previous_svid_grace, Duration::ZERO);
    }

    #[test]
    fn a_ca_ttl_the_ca_cannot_add_to_now_is_refused() {
        // The server_config fuzz target refuses these: u64::MAX seconds became -1 as i64 in
        // the CA, and 2^63 - 808 overflowed now + ttl (a panic in debug builds).
        for ttl in ["18446744073709551615", "9223372036854775000", "36501d"] {
            let e = parse(&format!("trust_domain = \"e.org\"\nca_ttl = \"{ttl}\""))
                .unwrap_err()
                .to_string();
            assert!(e.contains("`ca_ttl`") && e.contains("at most"), "{e}");
        }
        assert!(parse("trust_domain = \"e.org\"\nca_ttl = \"36500d\"").is_ok());
    }
}
