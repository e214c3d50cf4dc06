//! agent.toml: file schema (unknown keys refused) and the typed [`Config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use continuity_attestors::unix::UnixConfig;
use continuity_common::TrustDomain;
use continuity_common::config::invalid;
pub use continuity_common::config::{ConfigError, FileListener};
use continuity_common::logging::LogFormat;

pub use self::file::{
    FileConfig, FileK8s, FileNodeAttestors, FilePsat, FileUnix, FileWorkloadApi,
    FileWorkloadAttestors,
};
pub use self::server_address::{DEFAULT_SERVER_ADDRESS, MAX_SERVER_ADDRESSES, ServerAddress};

mod file;
mod server_address;
#[cfg(test)]
mod tests;

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

/// A timeout key of `[workload_api]`: between 100ms and 1h.
fn timeout(
    v: Option<String>,
    default: Duration,
    key: &'static str,
) -> Result<Duration, ConfigError> {
    let t = match v {
        None => default,
        Some(s) => continuity_common::duration::parse(&s).map_err(|m| invalid(key, m))?,
    };
    if t < Duration::from_millis(100) || t > Duration::from_secs(3600) {
        return Err(invalid(
            key,
            format!("{t:?} is out of range: between 100ms and 1h"),
        ));
    }
    Ok(t)
}

/// `max_connections` and `max_connections_per_uid` (the latter at most the former).
fn connection_caps(
    f: &FileWorkloadApi,
    d: &WorkloadApiConfig,
) -> Result<(usize, usize), ConfigError> {
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
    Ok((max_connections, max_connections_per_uid))
}

/// `server_calls_per_second`: above 0, at most 1000000.
fn server_call_rate(v: Option<f64>, default: f64) -> Result<f64, ConfigError> {
    let rate = v.unwrap_or(default);
    if !rate.is_finite() || rate <= 0.0 || rate > 1_000_000.0 {
        return Err(invalid(
            "workload_api.server_calls_per_second",
            format!("{rate} is out of range: above 0, at most 1000000"),
        ));
    }
    Ok(rate)
}

fn workload_api_config(f: Option<FileWorkloadApi>) -> Result<WorkloadApiConfig, ConfigError> {
    let d = WorkloadApiConfig::default();
    let Some(f) = f else {
        return Ok(d);
    };
    let (max_connections, max_connections_per_uid) = connection_caps(&f, &d)?;
    let idle_timeout = timeout(f.idle_timeout, d.idle_timeout, "workload_api.idle_timeout")?;
    let request_timeout = timeout(
        f.request_timeout,
        d.request_timeout,
        "workload_api.request_timeout",
    )?;
    let rate = server_call_rate(f.server_calls_per_second, d.server_calls_per_second)?;
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
    /// The servers (`server_address`): one or more host:port, each DNS name standing for
    /// every address it resolves to. At least one.
    pub server_addresses: Vec<ServerAddress>,
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
        let server_addresses = server_address::server_addresses(f.server_address)?;
        let bootstrap = bootstrap(f.trust_bundle_path, f.insecure_bootstrap.unwrap_or(false))?;
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
        let node_attestor = node_attestor(f.node_attestors.and_then(|n| n.k8s_psat))?;
        let log_level = f.log_level.unwrap_or_else(|| "info".into());
        continuity_common::logging::check_level(&log_level).map_err(|m| invalid("log_level", m))?;
        let addr = FileListener::address;
        Ok(Self {
            trust_domain,
            server_addresses,
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

/// `trust_bundle_path` or `insecure_bootstrap`: exactly one.
fn bootstrap(trust_bundle_path: Option<PathBuf>, insecure: bool) -> Result<Bootstrap, ConfigError> {
    match (trust_bundle_path, insecure) {
        (Some(p), false) => Ok(Bootstrap::TrustBundle(p)),
        (None, true) => Ok(Bootstrap::Insecure),
        (Some(_), true) => Err(invalid(
            "insecure_bootstrap",
            "set trust_bundle_path or insecure_bootstrap, not both",
        )),
        (None, false) => Err(invalid(
            "trust_bundle_path",
            "is required (the PEM from `continuity-server bundle show`), unless insecure_bootstrap = true",
        )),
    }
}

/// `[node_attestors.k8s_psat]` if present, else the join token.
fn node_attestor(psat: Option<FilePsat>) -> Result<NodeAttestor, ConfigError> {
    let Some(p) = psat else {
        return Ok(NodeAttestor::JoinToken);
    };
    Ok(NodeAttestor::K8sPsat {
        cluster: p.cluster.ok_or_else(|| {
            invalid(
                "node_attestors.k8s_psat.cluster",
                "is required (the cluster name configured on the server)",
            )
        })?,
        token_path: p
            .token_path
            .unwrap_or_else(|| "/var/run/secrets/tokens/continuity-agent".into()),
    })
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
