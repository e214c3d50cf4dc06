//! The file schema of agent.toml (unknown keys refused), as parsed before validation.

use std::path::PathBuf;

use continuity_common::config::FileListener;
use continuity_common::logging::LogFormat;
use serde::Deserialize;

/// The file schema of agent.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Trust domain.
    pub trust_domain: Option<String>,
    /// Server host:port, or an array of them (checked by `config::server_address`).
    pub server_address: Option<toml::Value>,
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
