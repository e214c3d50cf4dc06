//! agent.toml: file schema (unknown keys refused) and the typed [`Config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use continuity_attestors::unix::UnixConfig;
use continuity_common::TrustDomain;
use continuity_common::logging::LogFormat;
use serde::Deserialize;

use continuity_common::config::invalid;
pub use continuity_common::config::{ConfigError, FileListener};

/// The file schema of agent.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Trust domain.
    pub trust_domain: Option<String>,
    /// Server host:port.
    pub server_address: Option<String>,
    /// State directory.
    pub data_dir: Option<PathBuf>,
    /// Workload API socket.
    pub socket_path: Option<PathBuf>,
    /// PEM bundle to trust the server with at first start.
    pub trust_bundle_path: Option<PathBuf>,
    /// Trust the first server answering (first start only). Insecure.
    pub insecure_bootstrap: Option<bool>,
    /// Join token for the first attestation.
    pub join_token: Option<String>,
    /// How often to sync with the server (default 5s).
    pub sync_interval: Option<String>,
    /// `[workload_attestors]`.
    pub workload_attestors: Option<FileWorkloadAttestors>,
    /// `[node_attestors]` (default: join token).
    pub node_attestors: Option<FileNodeAttestors>,
    /// `[health]`.
    pub health: Option<FileListener>,
    /// `[metrics]`.
    pub metrics: Option<FileListener>,
    /// `[workload_api]`: limits on what workloads can make the agent hold.
    pub workload_api: Option<FileWorkloadApi>,
    /// Log level.
    pub log_level: Option<String>,
    /// Log format.
    pub log_format: Option<LogFormat>,
}

/// `[workload_attestors]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWorkloadAttestors {
    /// `[workload_attestors.unix]`.
    pub unix: Option<FileUnix>,
    /// `[workload_attestors.k8s]`.
    pub k8s: Option<FileK8s>,
}

/// `[workload_attestors.k8s]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileK8s {
    /// Kubelet base URL (default https://127.0.0.1:10250; http://127.0.0.1:10255 read-only).
    pub kubelet_url: Option<String>,
    /// Kubelet serving CA (PEM).
    pub kubelet_ca_path: Option<PathBuf>,
    /// Do not verify the kubelet's certificate. Insecure.
    pub insecure_skip_kubelet_verify: Option<bool>,
    /// Service-account token for the kubelet.
    pub token_path: Option<PathBuf>,
    /// Looks for a container the kubelet does not list yet (default 5).
    pub max_poll_attempts: Option<u32>,
    /// Pause between looks (default 500ms).
    pub poll_retry_interval: Option<String>,
    /// How long a pod list is reused (default 1s).
    pub pod_list_cache_ttl: Option<String>,
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
    /// Cluster name, as configured on the server.
    pub cluster: Option<String>,
    /// Projected service-account token (default /var/run/secrets/tokens/continuity-agent).
    pub token_path: Option<PathBuf>,
}

/// `[workload_api]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWorkloadApi {
    /// Open connections in total (default 1024).
    pub max_connections: Option<u64>,
    /// Open connections of one uid (default 128).
    pub max_connections_per_uid: Option<u64>,
    /// Concurrent streams per connection (default 16).
    pub max_concurrent_streams: Option<u64>,
    /// Time a connection may take to send its first request, or stay with no call open
    /// (default 10s).
    pub idle_timeout: Option<String>,
    /// Time a call's handler may take, reading its request included (default 30s).
    pub request_timeout: Option<String>,
    /// JWT-SVIDs cached (default 1024).
    pub jwt_cache_size: Option<u64>,
    /// Audiences per FetchJWTSVID request (default 16).
    pub max_audiences: Option<u64>,
    /// Bytes per audience (default 256).
    pub max_audience_length: Option<u64>,
    /// Calls reaching the server per second per workload (default 20).
    pub server_calls_per_second: Option<f64>,
    /// Burst of such calls (default 40).
    pub server_calls_burst: Option<u64>,
}

/// The typed `[workload_api]` limits.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadApiConfig {
    /// Open connections in total; at the cap the oldest connection that has not sent a
    /// request is closed to make room.
    pub max_connections: usize,
    /// Open connections of one workload (its pod if it runs in one, else its uid).
    pub max_connections_per_uid: usize,
    /// HTTP/2 concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// A connection that has not sent its first request, or has had no call open, for this
    /// long is idle: closed, and evictable at the caps.
    pub idle_timeout: Duration,
    /// A call whose handler (reading the request included) takes longer is cancelled; server
    /// streams such as FetchX509SVID return at once and are not cut.
    pub request_timeout: Duration,
    /// JWT-SVIDs kept in the LRU cache.
    pub jwt_cache_size: usize,
    /// Audiences per FetchJWTSVID request.
    pub max_audiences: usize,
    /// Bytes per audience.
    pub max_audience_length: usize,
    /// Calls reaching the server per second, per workload (pod, else uid).
    pub server_calls_per_second: f64,
    /// Burst of calls reaching the server, per workload.
    pub server_calls_burst: u32,
}

impl Default for WorkloadApiConfig {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_uid: 128,
            max_concurrent_streams: 16,
            idle_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            jwt_cache_size: 1024,
            max_audiences: 16,
            max_audience_length: 256,
            server_calls_per_second: 20.0,
            server_calls_burst: 40,
        }
    }
}

/// A count key of `[workload_api]`: between 1 and `max`.
fn count(
    v: Option<u64>,
    default: usize,
    key: &'static str,
    max: u64,
) -> Result<usize, ConfigError> {
    match v {
        None => Ok(default),
        Some(0) => Err(invalid(key, "must be at least 1")),
        Some(n) if n > max => Err(invalid(key, format!("{n} is absurd; at most {max}"))),
        Some(n) => usize::try_from(n).map_err(|_| invalid(key, format!("{n} is too large"))),
    }
}

fn workload_api_config(f: Option<FileWorkloadApi>) -> Result<WorkloadApiConfig, ConfigError> {
    let d = WorkloadApiConfig::default();
    let Some(f) = f else {
        return Ok(d);
    };
    let max_connections = count(
        f.max_connections,
        d.max_connections,
        "workload_api.max_connections",
        1_000_000,
    )?;
    let max_connections_per_uid = count(
        f.max_connections_per_uid,
        d.max_connections_per_uid.min(max_connections),
        "workload_api.max_connections_per_uid",
        1_000_000,
    )?;
    if max_connections_per_uid > max_connections {
        return Err(invalid(
            "workload_api.max_connections_per_uid",
            format!("{max_connections_per_uid} is more than max_connections ({max_connections})"),
        ));
    }
    let idle_timeout = match f.idle_timeout {
        None => d.idle_timeout,
        Some(s) => continuity_common::duration::parse(&s)
            .map_err(|m| invalid("workload_api.idle_timeout", m))?,
    };
    if idle_timeout < Duration::from_millis(100) || idle_timeout > Duration::from_secs(3600) {
        return Err(invalid(
            "workload_api.idle_timeout",
            format!("{idle_timeout:?} is out of range: between 100ms and 1h"),
        ));
    }
    let request_timeout = match f.request_timeout {
        None => d.request_timeout,
        Some(s) => continuity_common::duration::parse(&s)
            .map_err(|m| invalid("workload_api.request_timeout", m))?,
    };
    if request_timeout < Duration::from_millis(100) || request_timeout > Duration::from_secs(3600) {
        return Err(invalid(
            "workload_api.request_timeout",
            format!("{request_timeout:?} is out of range: between 100ms and 1h"),
        ));
    }
    let rate = f
        .server_calls_per_second
        .unwrap_or(d.server_calls_per_second);
    if !rate.is_finite() || rate <= 0.0 || rate > 1_000_000.0 {
        return Err(invalid(
            "workload_api.server_calls_per_second",
            format!("{rate} is out of range: above 0, at most 1000000"),
        ));
    }
    Ok(WorkloadApiConfig {
        max_connections,
        max_connections_per_uid,
        max_concurrent_streams: count(
            f.max_concurrent_streams,
            d.max_concurrent_streams as usize,
            "workload_api.max_concurrent_streams",
            10_000,
        )? as u32,
        idle_timeout,
        request_timeout,
        jwt_cache_size: count(
            f.jwt_cache_size,
            d.jwt_cache_size,
            "workload_api.jwt_cache_size",
            1_000_000,
        )?,
        max_audiences: count(
            f.max_audiences,
            d.max_audiences,
            "workload_api.max_audiences",
            1024,
        )?,
        max_audience_length: count(
            f.max_audience_length,
            d.max_audience_length,
            "workload_api.max_audience_length",
            16 * 1024,
        )?,
        server_calls_per_second: rate,
        server_calls_burst: count(
            f.server_calls_burst,
            d.server_calls_burst as usize,
            "workload_api.server_calls_burst",
            1_000_000,
        )? as u32,
    })
}

/// How the agent attests its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAttestor {
    /// A join token (config or --join-token).
    JoinToken,
    /// A projected service-account token.
    K8sPsat {
        /// Cluster name.
        cluster: String,
        /// Token file.
        token_path: PathBuf,
    },
}

/// `[workload_attestors.unix]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUnix {
    /// Produce unix:path and unix:sha256 (default true).
    pub discover_workload_path: Option<bool>,
    /// Largest executable hashed, bytes (default 256 MiB; 0, set explicitly, = no limit).
    pub workload_size_limit: Option<u64>,
    /// Most executable hashes remembered (default 4096; least recently used evicted).
    pub hash_cache_size: Option<usize>,
    /// Most executables read for hashing at once (default 2; callers beyond wait, bounded).
    pub max_concurrent_hashes: Option<usize>,
}

/// How the agent first learns to trust the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// A PEM bundle file (as `continuity-server bundle show` prints it).
    TrustBundle(PathBuf),
    /// Trust whatever answers first. Only for demos and tests.
    Insecure,
}

/// The default Workload API socket.
pub const DEFAULT_SOCKET_PATH: &str = "/tmp/continuity-agent/public/api.sock";

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Server host:port.
    pub server_address: String,
    /// State directory.
    pub data_dir: PathBuf,
    /// Workload API socket.
    pub socket_path: PathBuf,
    /// Trust bootstrap.
    pub bootstrap: Bootstrap,
    /// Join token (redacted in `Debug`).
    pub join_token: Option<continuity_common::secret::SecretString>,
    /// Sync interval.
    pub sync_interval: Duration,
    /// Unix attestor (None = disabled).
    pub unix: Option<UnixConfig>,
    /// k8s attestor (None = disabled).
    pub k8s: Option<continuity_attestors::k8s::K8sConfig>,
    /// Node attestor.
    pub node_attestor: NodeAttestor,
    /// Health listener.
    pub health_address: Option<SocketAddr>,
    /// Metrics listener.
    pub metrics_address: Option<SocketAddr>,
    /// `[workload_api]` limits.
    pub workload_api: WorkloadApiConfig,
    /// Log level.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = continuity_common::config::read(path)?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let f: FileConfig = continuity_common::config::parse_toml(text, path)?;
        Self::from_file(f)
    }

    /// Turns the file schema into the typed config.
    pub fn from_file(f: FileConfig) -> Result<Self, ConfigError> {
        let trust_domain = TrustDomain::new(
            f.trust_domain
                .as_deref()
                .ok_or_else(|| invalid("trust_domain", "is required (e.g. \"example.org\")"))?,
        )
        .map_err(|e| invalid("trust_domain", e.to_string()))?;
        let server_address = f.server_address.unwrap_or_else(|| "127.0.0.1:8081".into());
        if server_address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(invalid(
                "server_address",
                format!("{server_address:?} is not host:port"),
            ));
        }
        let bootstrap = match (f.trust_bundle_path, f.insecure_bootstrap.unwrap_or(false)) {
            (Some(p), false) => Bootstrap::TrustBundle(p),
            (None, true) => Bootstrap::Insecure,
            (Some(_), true) => {
                return Err(invalid(
                    "insecure_bootstrap",
                    "set trust_bundle_path or insecure_bootstrap, not both",
                ));
            }
            (None, false) => {
                return Err(invalid(
                    "trust_bundle_path",
                    "is required (the PEM from `continuity-server bundle show`), unless insecure_bootstrap = true",
                ));
            }
        };
        let sync_interval =
            continuity_common::duration::parse(f.sync_interval.as_deref().unwrap_or("5s"))
                .map_err(|m| invalid("sync_interval", m))?;
        if sync_interval.is_zero() {
            return Err(invalid("sync_interval", "must be positive"));
        }
        let (unix, k8s) = match f.workload_attestors {
            None => (Some(UnixConfig::default()), None),
            Some(w) => (
                w.unix.map(unix_config).transpose()?,
                w.k8s.map(k8s_config).transpose()?,
            ),
        };
        let node_attestor = match f.node_attestors.and_then(|n| n.k8s_psat) {
            None => NodeAttestor::JoinToken,
            Some(p) => NodeAttestor::K8sPsat {
                cluster: p.cluster.ok_or_else(|| {
                    invalid(
                        "node_attestors.k8s_psat.cluster",
                        "is required (the cluster name configured on the server)",
                    )
                })?,
                token_path: p
                    .token_path
                    .unwrap_or_else(|| "/var/run/secrets/tokens/continuity-agent".into()),
            },
        };
        let log_level = f.log_level.unwrap_or_else(|| "info".into());
        continuity_common::logging::check_level(&log_level).map_err(|m| invalid("log_level", m))?;
        let addr = FileListener::address;
        Ok(Self {
            trust_domain,
            server_address,
            data_dir: f
                .data_dir
                .unwrap_or_else(|| "/var/lib/continuity/agent".into()),
            socket_path: f.socket_path.unwrap_or_else(|| DEFAULT_SOCKET_PATH.into()),
            bootstrap,
            join_token: f.join_token.filter(|t| !t.is_empty()).map(Into::into),
            sync_interval,
            unix,
            k8s,
            node_attestor,
            health_address: addr(f.health, "health.bind_address")?,
            metrics_address: addr(f.metrics, "metrics.bind_address")?,
            workload_api: workload_api_config(f.workload_api)?,
            log_level,
            log_format: f.log_format.unwrap_or_default(),
        })
    }
}

fn unix_config(u: FileUnix) -> Result<UnixConfig, ConfigError> {
    let d = UnixConfig::default();
    let positive = |v: Option<usize>, default: usize, key: &'static str| match v {
        Some(0) => Err(invalid(key, "must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    Ok(UnixConfig {
        discover_workload_path: u.discover_workload_path.unwrap_or(d.discover_workload_path),
        workload_size_limit: u.workload_size_limit.unwrap_or(d.workload_size_limit),
        hash_cache_size: positive(
            u.hash_cache_size,
            d.hash_cache_size,
            "workload_attestors.unix.hash_cache_size",
        )?,
        max_concurrent_hashes: positive(
            u.max_concurrent_hashes,
            d.max_concurrent_hashes,
            "workload_attestors.unix.max_concurrent_hashes",
        )?,
    })
}

fn k8s_config(k: FileK8s) -> Result<continuity_attestors::k8s::K8sConfig, ConfigError> {
    let d = continuity_attestors::k8s::K8sConfig::default();
    let dur = |v: Option<String>,
               default: std::time::Duration,
               key: &'static str|
     -> Result<std::time::Duration, ConfigError> {
        v.map(|s| continuity_common::duration::parse(&s).map_err(|m| invalid(key, m)))
            .transpose()
            .map(|o| o.unwrap_or(default))
    };
    let url = k.kubelet_url.unwrap_or(d.kubelet_url);
    if !url.starts_with("https://") && !url.starts_with("http://") {
        return Err(invalid(
            "workload_attestors.k8s.kubelet_url",
            format!("{url:?} is not an http(s):// URL"),
        ));
    }
    let insecure = k.insecure_skip_kubelet_verify.unwrap_or(false);
    if url.starts_with("https://") && !insecure && k.kubelet_ca_path.is_none() {
        return Err(invalid(
            "workload_attestors.k8s.kubelet_ca_path",
            "is required for an https kubelet_url unless insecure_skip_kubelet_verify = true",
        ));
    }
    Ok(continuity_attestors::k8s::K8sConfig {
        kubelet_url: url,
        kubelet_ca_path: k.kubelet_ca_path,
        insecure_skip_kubelet_verify: insecure,
        token_path: k.token_path.unwrap_or(d.token_path),
        max_poll_attempts: k.max_poll_attempts.unwrap_or(d.max_poll_attempts),
        poll_retry_interval: dur(
            k.poll_retry_interval,
            d.poll_retry_interval,
            "workload_attestors.k8s.poll_retry_interval",
        )?,
        pod_list_cache_ttl: dur(
            k.pod_list_cache_ttl,
            d.pod_list_cache_ttl,
            "workload_attestors.k8s.pod_list_cache_ttl",
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("agent.toml"))
    }

    #[test]
    fn errors_name_the_key() {
        let base = "trust_domain = \"example.org\"\ninsecure_bootstrap = true\n";
        for (extra, key) in [
            ("sokcet_path = \"/x\"\n", "sokcet_path"),
            ("server_address = \"nope\"\n", "server_address"),
            ("sync_interval = \"often\"\n", "sync_interval"),
            (
                "[workload_attestors.unix]\ndiscover_path = true\n",
                "discover_path",
            ),
            (
                "[workload_attestors.unix]\nhash_cache_size = 0\n",
                "workload_attestors.unix.hash_cache_size",
            ),
            (
                "[workload_attestors.unix]\nmax_concurrent_hashes = 0\n",
                "workload_attestors.unix.max_concurrent_hashes",
            ),
            (
                "[workload_attestors.unix]\nworkload_size_limit = -1\n",
                "workload_size_limit",
            ),
        ] {
            let e = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        for (extra, key) in [
            ("[workload_api]\nmax_conections = 5\n", "max_conections"),
            (
                "[workload_api]\nmax_connections = 0\n",
                "workload_api.max_connections",
            ),
            (
                "[workload_api]\nmax_connections = 10\nmax_connections_per_uid = 11\n",
                "workload_api.max_connections_per_uid",
            ),
            (
                "[workload_api]\nmax_concurrent_streams = 0\n",
                "workload_api.max_concurrent_streams",
            ),
            (
                "[workload_api]\nidle_timeout = \"soon\"\n",
                "workload_api.idle_timeout",
            ),
            (
                "[workload_api]\nidle_timeout = \"0s\"\n",
                "workload_api.idle_timeout",
            ),
            (
                "[workload_api]\nidle_timeout = \"30d\"\n",
                "workload_api.idle_timeout",
            ),
            (
                "[workload_api]\nrequest_timeout = \"0s\"\n",
                "workload_api.request_timeout",
            ),
            (
                "[workload_api]\njwt_cache_size = 0\n",
                "workload_api.jwt_cache_size",
            ),
            (
                "[workload_api]\njwt_cache_size = 1000000000000\n",
                "workload_api.jwt_cache_size",
            ),
            (
                "[workload_api]\nmax_audiences = 0\n",
                "workload_api.max_audiences",
            ),
            (
                "[workload_api]\nmax_audience_length = 1000000\n",
                "workload_api.max_audience_length",
            ),
            (
                "[workload_api]\nserver_calls_per_second = 0\n",
                "workload_api.server_calls_per_second",
            ),
            (
                "[workload_api]\nserver_calls_per_second = nan\n",
                "workload_api.server_calls_per_second",
            ),
            (
                "[workload_api]\nserver_calls_burst = 0\n",
                "workload_api.server_calls_burst",
            ),
            ("[workload_api]\nmax_audiences = -1\n", "max_audiences"),
        ] {
            let e = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
        let e = parse("trust_domain = \"example.org\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("trust_bundle_path"), "{e}");
    }

    #[test]
    fn workload_api_defaults_and_values() {
        let base = "trust_domain = \"example.org\"\ninsecure_bootstrap = true\n";
        assert_eq!(
            parse(base).unwrap().workload_api,
            WorkloadApiConfig::default()
        );
        let c = parse(&format!(
            "{base}[workload_api]\nmax_connections = 64\nidle_timeout = \"2s\"\nrequest_timeout = \"5s\"\nserver_calls_per_second = 1\nserver_calls_burst = 3\njwt_cache_size = 100\n"
        ))
        .unwrap()
        .workload_api;
        assert_eq!(c.max_connections, 64);
        // The per-uid default never exceeds the total.
        assert_eq!(c.max_connections_per_uid, 64);
        assert_eq!(c.idle_timeout, Duration::from_secs(2));
        assert_eq!(c.request_timeout, Duration::from_secs(5));
        assert_eq!(c.max_concurrent_streams, 16);
        assert_eq!(c.server_calls_per_second, 1.0);
        assert_eq!(c.server_calls_burst, 3);
        assert_eq!(c.jwt_cache_size, 100);
        assert_eq!(c.max_audiences, 16);
    }

    #[test]
    fn unix_defaults_and_explicit_no_size_limit() {
        let base = "trust_domain = \"example.org\"\ninsecure_bootstrap = true\n";
        for extra in ["", "[workload_attestors.unix]\n"] {
            let u = parse(&format!("{base}{extra}")).unwrap().unix.unwrap();
            assert_eq!(u.workload_size_limit, 256 << 20);
            assert_eq!(u.hash_cache_size, 4096);
            assert_eq!(u.max_concurrent_hashes, 2);
        }
        let u = parse(&format!(
            "{base}[workload_attestors.unix]\nworkload_size_limit = 0\nhash_cache_size = 10\nmax_concurrent_hashes = 4\n"
        ))
        .unwrap()
        .unix
        .unwrap();
        assert_eq!(
            (
                u.workload_size_limit,
                u.hash_cache_size,
                u.max_concurrent_hashes
            ),
            (0, 10, 4)
        );
    }

    #[test]
    fn full_example_documents_every_key_and_parses() {
        let text = include_str!("../../deploy/agent.full.toml");
        parse(text).unwrap();
        for key in [
            "trust_domain",
            "server_address",
            "data_dir",
            "socket_path",
            "trust_bundle_path",
            "insecure_bootstrap",
            "join_token",
            "sync_interval",
            "[workload_attestors.unix]",
            "discover_workload_path",
            "workload_size_limit",
            "hash_cache_size",
            "max_concurrent_hashes",
            "[health]",
            "[metrics]",
            "[workload_api]",
            "max_connections",
            "max_connections_per_uid",
            "max_concurrent_streams",
            "idle_timeout",
            "request_timeout",
            "jwt_cache_size",
            "max_audiences",
            "max_audience_length",
            "server_calls_per_second",
            "server_calls_burst",
            "log_level",
            "log_format",
        ] {
            assert!(
                text.contains(key),
                "deploy/agent.full.toml does not document {key}"
            );
        }
    }
}
