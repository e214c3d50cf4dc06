//! server.toml: the file schema (serde, unknown keys refused) and the typed [`Config`] built from it once at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use continuity_common::TrustDomain;
use continuity_common::logging::LogFormat;
use serde::Deserialize;

use crate::keys::KeyType;

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

/// `[key_manager]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileKeyManager {
    /// memory | disk | pkcs11.
    pub kind: Option<String>,
    /// PKCS#11 module path.
    pub module: Option<PathBuf>,
    /// PKCS#11 token label.
    pub token_label: Option<String>,
    /// Environment variable holding the user PIN.
    pub pin_env: Option<String>,
    /// File holding the user PIN.
    pub pin_file: Option<PathBuf>,
    /// Present only to refuse it with a helpful message: PINs never live in the config.
    pub pin: Option<toml::Value>,
}

/// Where the user PIN of a PKCS#11 token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// An environment variable.
    Env(String),
    /// A file (trailing newline ignored).
    File(PathBuf),
}

/// The key manager chosen by `[key_manager] kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyManagerConfig {
    /// Keys in memory only; lost at restart.
    Memory,
    /// PKCS#8 key files (0600) under `data_dir/keys`.
    Disk {
        /// The key directory.
        dir: PathBuf,
    },
    /// Keys generated and used inside a PKCS#11 token.
    Pkcs11 {
        /// The module (.so) path.
        module: PathBuf,
        /// The token's label.
        token_label: String,
        /// Where the PIN comes from.
        pin: PinSource,
    },
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
}

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
        let key_manager = key_manager(f.key_manager.unwrap_or_default(), &data_dir)?;
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
        let validation = match (c.jwks_path, c.oidc_discovery_url, c.token_review_api_server) {
            (Some(p), None, None) => Validation::JwksFile(p),
            (None, Some(u), None) => Validation::OidcDiscovery { issuer: u, ca_path: c.oidc_ca_path },
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

fn key_manager(k: FileKeyManager, data_dir: &Path) -> Result<KeyManagerConfig, ConfigError> {
    if k.pin.is_some() {
        return Err(invalid(
            "key_manager.pin",
            "a PIN is never read from the config file; set pin_env or pin_file instead",
        ));
    }
    let kind = k.kind.as_deref().unwrap_or("disk");
    let pkcs11_only = k.module.is_some()
        || k.token_label.is_some()
        || k.pin_env.is_some()
        || k.pin_file.is_some();
    match kind {
        "memory" | "disk" if pkcs11_only => Err(invalid(
            "key_manager.kind",
            format!(
                "module/token_label/pin_env/pin_file only apply to kind = \"pkcs11\", not {kind:?}"
            ),
        )),
        "memory" => Ok(KeyManagerConfig::Memory),
        "disk" => Ok(KeyManagerConfig::Disk {
            dir: data_dir.join("keys"),
        }),
        "pkcs11" => {
            let module = k.module.ok_or_else(|| {
                invalid(
                    "key_manager.module",
                    "is required with kind = \"pkcs11\" (e.g. /usr/lib/softhsm/libsofthsm2.so)",
                )
            })?;
            let token_label = k.token_label.ok_or_else(|| {
                invalid(
                    "key_manager.token_label",
                    "is required with kind = \"pkcs11\"",
                )
            })?;
            let pin = match (k.pin_env, k.pin_file) {
                (Some(e), None) => PinSource::Env(e),
                (None, Some(f)) => PinSource::File(f),
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "key_manager.pin_env",
                        "set pin_env or pin_file, not both",
                    ));
                }
                (None, None) => {
                    return Err(invalid(
                        "key_manager.pin_env",
                        "pin_env or pin_file is required with kind = \"pkcs11\"",
                    ));
                }
            };
            Ok(KeyManagerConfig::Pkcs11 {
                module,
                token_label,
                pin,
            })
        }
        other => Err(invalid(
            "key_manager.kind",
            format!("{other:?} is not one of \"memory\", \"disk\", \"pkcs11\""),
        )),
    }
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
        ] {
            assert!(
                text.contains(key),
                "deploy/server.full.toml does not document {key}"
            );
        }
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
        let e = parse("trust_domain = \"e.org\"\nca_key_type = \"dsa\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`ca_key_type`"), "{e}");
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
