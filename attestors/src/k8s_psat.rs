//! The k8s_psat node attestor: an agent proves which node it runs on with its projected
//! service-account token. The server validates the token either offline, against the
//! cluster's service-account issuer keys (a JWKS file or OIDC discovery), or with the API
//! server's TokenReview; checks the audience and the allowed namespace/service account; and
//! names the agent by cluster and node UID, so a new agent pod on the same node keeps its ID.
//!
//! Offline validation checks the token's shape and claims before it looks up a key
//! (`claims`), and keeps discovered keys in a per-cluster cache with a bounded refresh rate
//! (`keys`), so junk tokens cost no fetch. TokenReview makes the same checks (bar the
//! signature) before it asks the API server, so junk costs the API server no request either.
//! Offline validation cannot tell that the pod the token is bound to has been deleted (the
//! token stays valid until `exp`); TokenReview can, and is the recommended mode.

mod claims;
mod discovery;
mod keys;
mod labels;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use continuity_common::https::{self, ServerTrust};
use serde_json::{Value, json};

use crate::Selector;
pub use claims::{CLOCK_SKEW_SECS, MAX_KID_BYTES, MAX_TOKEN_BYTES, check_times};
use discovery::{discover, read_json_file};
pub use discovery::{jwks_keys, jwks_uri};
pub use keys::{KeyCache, KeySet, STALE_GRACE};
pub use labels::{LabelLookup, label_key_ok};

/// The attestation data type string on the wire.
pub const ATTESTOR_TYPE: &str = "k8s_psat";
/// Default token audience.
pub const DEFAULT_AUDIENCE: &str = "continuity-server";
/// Default time discovered issuer keys are used before they are fetched again.
pub const DEFAULT_JWKS_CACHE_TTL: Duration = Duration::from_secs(300);
/// Default least time between two fetches of a cluster's discovery document and JWKS.
pub const DEFAULT_JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Largest discovery document, JWKS (fetched or file) or TokenReview response read.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;
/// Largest attestation payload parsed.
pub const MAX_PAYLOAD_BYTES: usize = 32 * 1024;

/// What the agent sends.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Payload {
    /// Cluster name (as configured on the server).
    pub cluster: String,
    /// The projected service-account token.
    pub token: String,
}

/// How the server validates tokens of one cluster.
#[derive(Debug, Clone)]
pub enum Validation {
    /// Offline, with the issuer's keys from a JWKS file.
    JwksFile(PathBuf),
    /// Offline, with keys found by OIDC discovery from the issuer URL (TLS verified against
    /// `ca_path`, or the system roots), cached per cluster.
    OidcDiscovery {
        /// Issuer URL.
        issuer: String,
        /// CA of a private issuer (PEM).
        ca_path: Option<PathBuf>,
        /// How long fetched keys are used before they are fetched again.
        cache_ttl: Duration,
        /// Least time between two fetch attempts (an unknown `kid` refreshes no faster).
        refresh_interval: Duration,
    },
    /// Online, with the API server's TokenReview.
    TokenReview {
        /// API server URL.
        api_server: String,
        /// API server CA (PEM).
        ca_path: PathBuf,
        /// Token of a service account allowed to create TokenReviews.
        token_path: PathBuf,
    },
}

/// Server-side settings of one cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Cluster name.
    pub name: String,
    /// `namespace:service-account` pairs agents may run as.
    pub service_account_allow_list: Vec<String>,
    /// Required token audience.
    pub audience: String,
    /// Required `iss`, when set (offline validation; with OIDC discovery the discovery URL
    /// is required when this is not set).
    pub issuer: Option<String>,
    /// How tokens are validated.
    pub validation: Validation,
    /// Node and pod labels that become selectors (read through the TokenReview API server).
    pub labels: LabelLookup,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum PsatError {
    /// Not a payload this attestor understands.
    #[error("malformed k8s_psat payload: {0}")]
    Payload(String),
    /// The cluster is not configured.
    #[error("cluster {0:?} is not configured on this server")]
    UnknownCluster(String),
    /// The token did not validate.
    #[error("service-account token refused: {0}")]
    Token(String),
    /// Valid token of a service account that may not run agents.
    #[error("service account {0} is not allowed to attest agents (service_account_allow_list)")]
    NotAllowed(String),
    /// Validation could not be carried out.
    #[error("cannot validate the token: {0}")]
    Validator(String),
}

/// What a validated token says about the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    /// Cluster.
    pub cluster: String,
    /// Namespace of the agent pod.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Agent pod name.
    pub pod_name: String,
    /// Agent pod UID.
    pub pod_uid: String,
    /// Node name.
    pub node_name: String,
    /// Node UID: the stable part of the agent ID.
    pub node_uid: String,
    /// The Node's labels whose key is allowed (`allowed_node_label_keys`), sorted.
    pub node_labels: Vec<(String, String)>,
    /// The agent Pod's labels whose key is allowed (`allowed_pod_label_keys`), sorted.
    pub pod_labels: Vec<(String, String)>,
}

impl Attested {
    /// The agent ID path: `/continuity/agent/k8s_psat/<cluster>/<node-uid>`.
    pub fn agent_path(&self) -> String {
        format!(
            "/continuity/agent/{ATTESTOR_TYPE}/{}/{}",
            self.cluster, self.node_uid
        )
    }

    /// `k8s_psat:` selectors of the agent.
    pub fn selectors(&self) -> Vec<Selector> {
        let s = |k: &str, v: &str| Selector::raw(ATTESTOR_TYPE, format!("{k}:{v}"));
        let mut out = vec![
            s("cluster", &self.cluster),
            s("agent_ns", &self.namespace),
            s("agent_sa", &self.service_account),
            s("agent_pod_name", &self.pod_name),
            s("agent_pod_uid", &self.pod_uid),
            s("agent_node_name", &self.node_name),
            s("agent_node_uid", &self.node_uid),
        ];
        for (k, v) in &self.node_labels {
            out.push(s("agent_node_label", &format!("{k}:{v}")));
        }
        for (k, v) in &self.pod_labels {
            out.push(s("agent_pod_label", &format!("{k}:{v}")));
        }
        out
    }
}

/// The k8s_psat validator the server keeps for its lifetime: the configured clusters and,
/// for OIDC-discovery clusters, their key caches.
#[derive(Debug)]
pub struct Validator {
    clusters: Vec<Cluster>,
}

#[derive(Debug)]
struct Cluster {
    cfg: ClusterConfig,
    cache: Option<KeyCache>,
}

impl Validator {
    /// A validator for `clusters`; logs once, at warn, for each cluster validated offline.
    pub fn new(clusters: Vec<ClusterConfig>) -> Self {
        for c in &clusters {
            if !matches!(c.validation, Validation::TokenReview { .. }) {
                tracing::warn!(
                    cluster = %c.name,
                    "k8s_psat: cluster validates tokens offline, which cannot tell that the agent pod is gone: \
                     a token stays valid until it expires. TokenReview (token_review_api_server) checks the pod \
                     still exists and is the recommended mode"
                );
            }
        }
        Self::quiet(clusters)
    }

    fn quiet(clusters: Vec<ClusterConfig>) -> Self {
        let clusters = clusters
            .into_iter()
            .map(|cfg| {
                let cache = match &cfg.validation {
                    Validation::OidcDiscovery {
                        cache_ttl,
                        refresh_interval,
                        ..
                    } => Some(KeyCache::new(*cache_ttl, *refresh_interval)),
                    _ => None,
                };
                Cluster { cfg, cache }
            })
            .collect();
        Self { clusters }
    }

    /// No cluster is configured (the attestor is off).
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    /// Validates a payload at `now` (unix seconds). Blocking: may read files and call the
    /// network, but only for a token whose shape and claims pass.
    pub fn validate(&self, payload: &[u8], now: i64) -> Result<Attested, PsatError> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(PsatError::Payload(format!(
                "{} bytes, more than {MAX_PAYLOAD_BYTES}",
                payload.len()
            )));
        }
        let p: Payload =
            serde_json::from_slice(payload).map_err(|e| PsatError::Payload(e.to_string()))?;
        let cluster = self
            .clusters
            .iter()
            .find(|c| c.cfg.name == p.cluster)
            .ok_or_else(|| PsatError::UnknownCluster(p.cluster.clone()))?;
        let cfg = &cluster.cfg;
        match &cfg.validation {
            Validation::JwksFile(path) => {
                let (jws, a) = claims::check(&p.token, cfg, cfg.issuer.as_deref(), now)?;
                let keys = KeySet::from_jwks(&read_json_file(path, "jwks_path")?).map_err(|e| {
                    PsatError::Validator(format!("jwks_path {}: {e}", path.display()))
                })?;
                let spki = keys.get(&jws.kid).ok_or_else(|| {
                    PsatError::Token(format!("unknown key id (kid) {:?}", jws.kid))
                })?;
                verified(cfg, &jws, spki, a)
            }
            Validation::OidcDiscovery {
                issuer: url,
                ca_path,
                ..
            } => {
                let want = cfg.issuer.as_deref().unwrap_or(url);
                let (jws, a) = claims::check(&p.token, cfg, Some(want), now)?;
                let Some(cache) = &cluster.cache else {
                    return Err(PsatError::Validator("no key cache for this cluster".into()));
                };
                let spki = cache.key(&jws.kid, Instant::now(), || {
                    discover(url, want, ca_path.as_ref())
                })?;
                verified(cfg, &jws, &spki, a)
            }
            Validation::TokenReview {
                api_server,
                ca_path,
                token_path,
            } => {
                // The API server has the last word, but a token that is not even a current,
                // node-bound service-account JWT for our audience costs it no request.
                claims::check(&p.token, cfg, cfg.issuer.as_deref(), now)?;
                token_review(cfg, &p.token, api_server, ca_path, token_path)
            }
        }
        .and_then(|a| match &cfg.validation {
            _ if cfg.labels.is_empty() => Ok(a),
            Validation::TokenReview { .. } => Ok(a),
            _ => Err(PsatError::Validator(
                "node or pod label keys are allowed but the cluster has no API server (token_review_api_server)".into(),
            )),
        })
    }
}

/// Validates a payload against `clusters` with a fresh [`Validator`]: no key cache outlives the
/// call (the server keeps one [`Validator`] instead; this is for tests and fuzzing).
pub fn validate(
    payload: &[u8],
    clusters: &[ClusterConfig],
    now: i64,
) -> Result<Attested, PsatError> {
    Validator::quiet(clusters.to_vec()).validate(payload, now)
}

/// The signature check and the allow list, after the claims passed.
fn verified(
    cfg: &ClusterConfig,
    jws: &continuity_common::jwt::Jws<'_>,
    spki: &[u8],
    a: Attested,
) -> Result<Attested, PsatError> {
    jws.verify(spki)
        .map_err(|e| PsatError::Token(e.to_string()))?;
    finish(cfg, a)
}

fn check_allowed(cfg: &ClusterConfig, ns: &str, sa: &str) -> Result<(), PsatError> {
    let who = format!("{ns}:{sa}");
    if cfg.service_account_allow_list.contains(&who) {
        Ok(())
    } else {
        Err(PsatError::NotAllowed(who))
    }
}

/// What an agent's identity needs from a token: a service account, a node UID and a
/// cluster name usable in a SPIFFE ID.
fn check_shape(a: &Attested) -> Result<(), PsatError> {
    if a.namespace.is_empty() || a.service_account.is_empty() {
        return Err(PsatError::Token(
            "not a service-account token (no namespace/service account)".into(),
        ));
    }
    if a.node_uid.is_empty()
        || !a
            .node_uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(PsatError::Token("the token is not bound to a node (project it with a Kubernetes that adds node claims, ≥ 1.30)".into()));
    }
    if !a
        .cluster
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(PsatError::Payload(format!(
            "cluster name {:?} is not usable in a SPIFFE ID",
            a.cluster
        )));
    }
    Ok(())
}

fn finish(cfg: &ClusterConfig, a: Attested) -> Result<Attested, PsatError> {
    check_shape(&a)?;
    check_allowed(cfg, &a.namespace, &a.service_account)?;
    Ok(a)
}

fn token_review(
    cfg: &ClusterConfig,
    token: &str,
    api_server: &str,
    ca_path: &PathBuf,
    token_path: &PathBuf,
) -> Result<Attested, PsatError> {
    let ca = std::fs::read_to_string(ca_path)
        .map_err(|e| PsatError::Validator(format!("ca_path {}: {e}", ca_path.display())))?;
    let trust = ServerTrust::Roots(
        continuity_common::x509::pem_decode_all("CERTIFICATE", &ca)
            .map_err(PsatError::Validator)?,
    );
    let bearer = std::fs::read_to_string(token_path)
        .map_err(|e| PsatError::Validator(format!("token_path {}: {e}", token_path.display())))?;
    let api_server = api_server.trim_end_matches('/');
    let body = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [cfg.audience]},
    })
    .to_string();
    let url = format!("{api_server}/apis/authentication.k8s.io/v1/tokenreviews");
    let r = https::request_capped(
        "POST",
        &url,
        &trust,
        Some(bearer.trim()),
        Some(("application/json", body.as_bytes())),
        Duration::from_secs(5),
        MAX_DOCUMENT_BYTES,
    )
    .map_err(|e| PsatError::Validator(e.to_string()))?;
    if r.status != 200 && r.status != 201 {
        return Err(PsatError::Validator(format!(
            "TokenReview answered {}",
            r.status
        )));
    }
    let mut a = token_review_status(cfg, &r.body)?;
    if !cfg.labels.is_empty() {
        let api = labels::Api {
            base: api_server,
            trust: &trust,
            bearer: bearer.trim(),
        };
        labels::add_labels(&cfg.labels, &api, &mut a)?;
    }
    Ok(a)
}

/// Reads a TokenReview answer's body (the API server's JSON): the agent it authenticates, or
/// why not. Checks the audience, the service account allow list and the node binding.
pub fn token_review_status(cfg: &ClusterConfig, body: &[u8]) -> Result<Attested, PsatError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| PsatError::Validator(format!("TokenReview: {e}")))?;
    let st = &v["status"];
    if st["authenticated"].as_bool() != Some(true) {
        let why = st["error"].as_str().unwrap_or("not authenticated");
        return Err(PsatError::Token(format!("TokenReview: {why}")));
    }
    let aud: Vec<&str> = st["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !aud.contains(&cfg.audience.as_str()) {
        return Err(PsatError::Token(format!(
            "audience {aud:?} does not include {:?}",
            cfg.audience
        )));
    }
    let username = st["user"]["username"].as_str().unwrap_or_default();
    let rest = username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(|| PsatError::Token(format!("{username:?} is not a service account")))?;
    let (ns, sa) = rest.split_once(':').unwrap_or((rest, ""));
    let extra = |k: &str| {
        st["user"]["extra"][format!("authentication.kubernetes.io/{k}")][0]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    finish(
        cfg,
        Attested {
            cluster: cfg.name.clone(),
            namespace: ns.into(),
            service_account: sa.into(),
            pod_name: extra("pod-name"),
            pod_uid: extra("pod-uid"),
            node_name: extra("node-name"),
            node_uid: extra("node-uid"),
            node_labels: Vec::new(),
            pod_labels: Vec::new(),
        },
    )
}

#[cfg(test)]
mod tests;
