//! `[controller]`: the automatic registration controller, which watches pods and
//! `ClusterSPIFFEID` resources through the Kubernetes API server and keeps their entries.

use std::path::PathBuf;

use continuity_common::config::{ConfigError, invalid};
use continuity_common::{SpiffeId, TrustDomain};
use serde::Deserialize;

/// The service account's files inside a pod.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `[controller]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileController {
    /// API server URL (default `https://kubernetes.default.svc`).
    pub api_server: Option<String>,
    /// PEM CA bundle the API server is verified with (default: the service account's ca.crt).
    pub ca_file: Option<PathBuf>,
    /// Bearer token file, re-read on every request (default: the service account's token).
    pub token_file: Option<PathBuf>,
    /// The cluster's name: `{{ .ClusterName }}` in templates and part of the ownership hint.
    pub cluster_name: Option<String>,
    /// The SPIFFE ID every controller-made entry is parented to (a node alias entry's ID).
    pub node_alias_id: Option<String>,
}

/// The validated `[controller]` table.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// API server base URL, without a trailing slash.
    pub api_server: String,
    /// The API server's CA bundle file.
    pub ca_file: PathBuf,
    /// The bearer token file.
    pub token_file: PathBuf,
    /// The cluster's name.
    pub cluster_name: String,
    /// Parent of every entry the controller makes.
    pub node_alias_id: SpiffeId,
}

impl ControllerConfig {
    /// Checks `[controller]` (None when the table is absent: no controller runs).
    pub fn from_file(
        f: Option<FileController>,
        trust_domain: &TrustDomain,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(f) = f else { return Ok(None) };
        let api_server = f
            .api_server
            .unwrap_or_else(|| "https://kubernetes.default.svc".into())
            .trim_end_matches('/')
            .to_string();
        if !api_server.starts_with("https://") {
            return Err(invalid(
                "controller.api_server",
                format!("{api_server:?} must be an https:// URL"),
            ));
        }
        let cluster_name = f
            .cluster_name
            .filter(|c| !c.is_empty())
            .ok_or_else(|| invalid("controller.cluster_name", "is required (e.g. \"demo\")"))?;
        if cluster_name.contains('/') || cluster_name.chars().any(char::is_whitespace) {
            return Err(invalid(
                "controller.cluster_name",
                "must not contain '/' or whitespace",
            ));
        }
        let key = "controller.node_alias_id";
        let id = f.node_alias_id.ok_or_else(|| {
            invalid(
                key,
                "is required (the SPIFFE ID of the cluster's node alias entry)",
            )
        })?;
        let node_alias_id = SpiffeId::new(&id).map_err(|e| invalid(key, e.to_string()))?;
        if node_alias_id.trust_domain() != *trust_domain {
            return Err(invalid(
                key,
                format!("{id} is not in trust domain {trust_domain}"),
            ));
        }
        Ok(Some(Self {
            api_server,
            ca_file: f
                .ca_file
                .unwrap_or_else(|| format!("{SA_DIR}/ca.crt").into()),
            token_file: f
                .token_file
                .unwrap_or_else(|| format!("{SA_DIR}/token").into()),
            cluster_name,
            node_alias_id,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> Result<Option<ControllerConfig>, ConfigError> {
        let f: FileController = toml::from_str(toml).unwrap();
        ControllerConfig::from_file(Some(f), &TrustDomain::new("example.org").unwrap())
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("node_alias_id = \"spiffe://example.org/k8s/demo\"").unwrap_err();
        assert!(e.to_string().contains("controller.cluster_name"), "{e}");
        let e = parse("cluster_name = \"demo\"").unwrap_err();
        assert!(e.to_string().contains("controller.node_alias_id"), "{e}");
        let e =
            parse("cluster_name = \"demo\"\nnode_alias_id = \"spiffe://other.org/x\"").unwrap_err();
        assert!(e.to_string().contains("controller.node_alias_id"), "{e}");
        let e = parse(
            "cluster_name = \"demo\"\nnode_alias_id = \"spiffe://example.org/x\"\napi_server = \"http://k\"",
        )
        .unwrap_err();
        assert!(e.to_string().contains("controller.api_server"), "{e}");
    }

    #[test]
    fn defaults_are_the_in_cluster_ones() {
        let c = parse("cluster_name = \"demo\"\nnode_alias_id = \"spiffe://example.org/k8s/demo\"")
            .unwrap()
            .unwrap();
        assert_eq!(c.api_server, "https://kubernetes.default.svc");
        assert_eq!(c.token_file, PathBuf::from(format!("{SA_DIR}/token")));
        assert_eq!(c.node_alias_id.to_string(), "spiffe://example.org/k8s/demo");
    }
}
