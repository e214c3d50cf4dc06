//! `[k8s_bundle]`: the Kubernetes ConfigMap the server keeps holding the trust bundle (PEM),
//! through the API server, as SPIRE's k8sbundle notifier does. Absent: nothing is published.

use std::path::PathBuf;
use std::time::Duration;

use continuity_common::config::{ConfigError, invalid};
use serde::Deserialize;

/// In-cluster API server address.
pub const DEFAULT_API_SERVER: &str = "https://kubernetes.default.svc";
/// The service account's CA file, mounted in every pod.
pub const DEFAULT_CA_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The service account's token file, mounted in every pod.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// `[k8s_bundle]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileK8sBundle {
    /// Namespace of the ConfigMap (default "continuity").
    pub namespace: Option<String>,
    /// Name of the ConfigMap (default "continuity-bundle").
    pub config_map: Option<String>,
    /// Key in the ConfigMap's data (default "bundle.crt").
    pub key: Option<String>,
    /// API server URL (default the in-cluster one).
    pub api_server: Option<String>,
    /// CA of the API server, PEM (default the service account's).
    pub ca_path: Option<PathBuf>,
    /// Bearer token file, read on every request (default the service account's).
    pub token_path: Option<PathBuf>,
    /// How often the ConfigMap is written again even without a bundle change, restoring a
    /// hand-edited or deleted one (default 30s).
    pub refresh_interval: Option<String>,
}

/// The validated `[k8s_bundle]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sBundleConfig {
    /// Namespace of the ConfigMap.
    pub namespace: String,
    /// Name of the ConfigMap.
    pub config_map: String,
    /// Key in its data.
    pub key: String,
    /// API server URL, `https://host[:port]` without a trailing slash.
    pub api_server: String,
    /// CA of the API server (PEM).
    pub ca_path: PathBuf,
    /// Bearer token file.
    pub token_path: PathBuf,
    /// Period of the unconditional re-publish.
    pub refresh_interval: Duration,
}

impl K8sBundleConfig {
    /// Validates the table (None: the publisher is off); every error names its key.
    pub fn from_file(f: Option<FileK8sBundle>) -> Result<Option<Self>, ConfigError> {
        let Some(f) = f else { return Ok(None) };
        let namespace = f.namespace.unwrap_or_else(|| "continuity".into());
        if !dns_name(&namespace, 63, false) {
            return Err(invalid(
                "k8s_bundle.namespace",
                format!(
                    "{namespace:?} is not a Kubernetes namespace (lower-case letters, digits and '-', at most 63)"
                ),
            ));
        }
        let config_map = f.config_map.unwrap_or_else(|| "continuity-bundle".into());
        if !dns_name(&config_map, 253, true) {
            return Err(invalid(
                "k8s_bundle.config_map",
                format!(
                    "{config_map:?} is not a ConfigMap name (lower-case letters, digits, '-' and '.', at most 253)"
                ),
            ));
        }
        let key = f.key.unwrap_or_else(|| "bundle.crt".into());
        let key_ok = !key.is_empty()
            && key.len() <= 253
            && key != "."
            && key != ".."
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !key_ok {
            return Err(invalid(
                "k8s_bundle.key",
                format!(
                    "{key:?} is not a ConfigMap key (letters, digits, '-', '_' and '.', at most 253)"
                ),
            ));
        }
        let api_server = f
            .api_server
            .unwrap_or_else(|| DEFAULT_API_SERVER.into())
            .trim_end_matches('/')
            .to_string();
        let host = api_server.strip_prefix("https://").unwrap_or_default();
        if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
            return Err(invalid(
                "k8s_bundle.api_server",
                format!("{api_server:?} must be https://host[:port]"),
            ));
        }
        let refresh_interval = refresh_interval(f.refresh_interval.as_deref())?;
        Ok(Some(Self {
            namespace,
            config_map,
            key,
            api_server,
            ca_path: f.ca_path.unwrap_or_else(|| DEFAULT_CA_PATH.into()),
            token_path: f.token_path.unwrap_or_else(|| DEFAULT_TOKEN_PATH.into()),
            refresh_interval,
        }))
    }
}

/// `refresh_interval`: a duration more than 0 (default 30s).
fn refresh_interval(v: Option<&str>) -> Result<Duration, ConfigError> {
    let key = "k8s_bundle.refresh_interval";
    let d = continuity_common::duration::parse(v.unwrap_or("30s")).map_err(|m| invalid(key, m))?;
    if d.is_zero() {
        return Err(invalid(key, "must be more than 0"));
    }
    Ok(d)
}

/// A DNS label (or, with `dots`, subdomain) of at most `max` bytes, as Kubernetes names are.
fn dns_name(s: &str, max: usize, dots: bool) -> bool {
    let ok_part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('-')
            && !p.ends_with('-')
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    s.len() <= max
        && if dots {
            s.split('.').all(ok_part)
        } else {
            ok_part(s)
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> Result<Option<K8sBundleConfig>, ConfigError> {
        K8sBundleConfig::from_file(Some(toml::from_str(toml).unwrap()))
    }

    #[test]
    fn defaults_are_in_cluster() {
        let c = parse("").unwrap().unwrap();
        assert_eq!(c.namespace, "continuity");
        assert_eq!(c.config_map, "continuity-bundle");
        assert_eq!(c.key, "bundle.crt");
        assert_eq!(c.api_server, DEFAULT_API_SERVER);
        assert_eq!(c.ca_path, PathBuf::from(DEFAULT_CA_PATH));
        assert_eq!(c.token_path, PathBuf::from(DEFAULT_TOKEN_PATH));
        assert_eq!(c.refresh_interval, Duration::from_secs(30));
        assert_eq!(K8sBundleConfig::from_file(None).unwrap(), None);
    }

    #[test]
    fn errors_name_the_key() {
        for (toml, key) in [
            ("namespace = \"Bad_NS\"", "k8s_bundle.namespace"),
            ("namespace = \"\"", "k8s_bundle.namespace"),
            ("config_map = \"a..b\"", "k8s_bundle.config_map"),
            ("key = \"a/b\"", "k8s_bundle.key"),
            ("key = \"..\"", "k8s_bundle.key"),
            ("api_server = \"http://x\"", "k8s_bundle.api_server"),
            ("api_server = \"https://x/y\"", "k8s_bundle.api_server"),
            ("refresh_interval = \"0s\"", "k8s_bundle.refresh_interval"),
            ("refresh_interval = \"soon\"", "k8s_bundle.refresh_interval"),
        ] {
            match parse(toml) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{toml}"),
                other => panic!("{toml}: {other:?}"),
            }
        }
    }
}
