//! `[node_attestors.k8s_psat]`: the Kubernetes clusters whose projected service account tokens
//! attest agents, each validated offline (JWKS file, OIDC discovery) or online (TokenReview).

use std::path::PathBuf;
use std::time::Duration;

use continuity_attestors::k8s_psat::{
    ClusterConfig, DEFAULT_AUDIENCE, LabelLookup, Validation, label_key_ok,
};
use continuity_common::config::{ConfigError, invalid};
use serde::Deserialize;

/// The key most cluster errors name (with the cluster's name in the message).
const KEY: &str = "node_attestors.k8s_psat.clusters";
/// `jwks_cache_ttl` of a cluster.
const TTL_KEY: &str = "node_attestors.k8s_psat.clusters.<name>.jwks_cache_ttl";
/// `jwks_refresh_interval` of a cluster.
const INTERVAL_KEY: &str = "node_attestors.k8s_psat.clusters.<name>.jwks_refresh_interval";
/// `allowed_node_label_keys` of a cluster.
const NODE_LABELS_KEY: &str = "node_attestors.k8s_psat.clusters.<name>.allowed_node_label_keys";
/// `allowed_pod_label_keys` of a cluster.
const POD_LABELS_KEY: &str = "node_attestors.k8s_psat.clusters.<name>.allowed_pod_label_keys";

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
    /// Node label keys that become `agent_node_label:KEY:VALUE` selectors (TokenReview only:
    /// the Node is read through that API server, with that token).
    pub allowed_node_label_keys: Option<Vec<String>>,
    /// Pod label keys that become `agent_pod_label:KEY:VALUE` selectors (TokenReview only).
    pub allowed_pod_label_keys: Option<Vec<String>>,
}

/// Validates every cluster (none: the attestor is off).
pub(super) fn clusters(p: Option<FilePsat>) -> Result<Vec<ClusterConfig>, ConfigError> {
    p.map(|p| p.clusters)
        .unwrap_or_default()
        .into_iter()
        .map(|(name, c)| cluster(name, c))
        .collect()
}

/// One cluster: its allow list, its key cache settings and exactly one way to validate tokens.
fn cluster(name: String, mut c: FilePsatCluster) -> Result<ClusterConfig, ConfigError> {
    let allow = c
        .service_account_allow_list
        .take()
        .ok_or_else(|| invalid(KEY, format!("cluster {name:?}: service_account_allow_list is required (\"namespace:service-account\")")))?;
    if let Some(bad) = allow.iter().find(|a| a.split(':').count() != 2) {
        return Err(invalid(
            KEY,
            format!("cluster {name:?}: {bad:?} is not \"namespace:service-account\""),
        ));
    }
    let (cache_ttl, refresh_interval) = cache_settings(&c, &name)?;
    let labels = label_settings(&mut c, &name)?;
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
            ca_path: c.token_review_ca_path.ok_or_else(|| invalid(KEY, format!("cluster {name:?}: token_review_ca_path is required with token_review_api_server")))?,
            token_path: c
                .token_review_token_path
                .ok_or_else(|| invalid(KEY, format!("cluster {name:?}: token_review_token_path is required with token_review_api_server")))?,
        },
        _ => {
            return Err(invalid(
                KEY,
                format!("cluster {name:?}: set exactly one of jwks_path, oidc_discovery_url, token_review_api_server"),
            ));
        }
    };
    Ok(ClusterConfig {
        name,
        service_account_allow_list: allow,
        audience: c.audience.unwrap_or_else(|| DEFAULT_AUDIENCE.into()),
        issuer: c.issuer,
        validation,
        labels,
    })
}

/// `allowed_node_label_keys` and `allowed_pod_label_keys`: Kubernetes label keys, and only
/// with `token_review_api_server` (the API server the Node and Pod are read from).
fn label_settings(c: &mut FilePsatCluster, name: &str) -> Result<LabelLookup, ConfigError> {
    let mut out = LabelLookup::default();
    for (keys, target, k) in [
        (
            c.allowed_node_label_keys.take(),
            &mut out.node_keys,
            NODE_LABELS_KEY,
        ),
        (
            c.allowed_pod_label_keys.take(),
            &mut out.pod_keys,
            POD_LABELS_KEY,
        ),
    ] {
        let Some(keys) = keys else { continue };
        if let Some(bad) = keys.iter().find(|l| !label_key_ok(l)) {
            return Err(invalid(
                k,
                format!("cluster {name:?}: {bad:?} is not a Kubernetes label key"),
            ));
        }
        if !keys.is_empty() && c.token_review_api_server.is_none() {
            return Err(invalid(
                k,
                format!(
                    "cluster {name:?}: needs token_review_api_server (labels are read from the Node and Pod through the API server)"
                ),
            ));
        }
        *target = keys;
    }
    Ok(out)
}

/// `jwks_cache_ttl` (default 5m) and `jwks_refresh_interval` (default 30s, in (0, ttl]); both
/// only with `oidc_discovery_url`.
fn cache_settings(c: &FilePsatCluster, name: &str) -> Result<(Duration, Duration), ConfigError> {
    let oidc = c.oidc_discovery_url.is_some();
    for (set, k) in [
        (c.jwks_cache_ttl.is_some(), TTL_KEY),
        (c.jwks_refresh_interval.is_some(), INTERVAL_KEY),
    ] {
        if set && !oidc {
            return Err(invalid(
                k,
                format!("cluster {name:?}: only applies with oidc_discovery_url"),
            ));
        }
    }
    let cache_ttl = cluster_duration(c.jwks_cache_ttl.as_deref(), "5m", name, TTL_KEY)?;
    let refresh_interval = cluster_duration(
        c.jwks_refresh_interval.as_deref(),
        "30s",
        name,
        INTERVAL_KEY,
    )?;
    if refresh_interval.is_zero() || refresh_interval > cache_ttl {
        return Err(invalid(
            INTERVAL_KEY,
            format!("cluster {name:?}: must be more than 0 and at most jwks_cache_ttl"),
        ));
    }
    Ok((cache_ttl, refresh_interval))
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
