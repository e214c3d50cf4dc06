//! The k8s_psat node attestor: an agent proves which node it runs on with its projected
//! service-account token. The server validates the token either offline, against the
//! cluster's service-account issuer keys (a JWKS file or OIDC discovery), or with the API
//! server's TokenReview; checks the audience and the allowed namespace/service account; and
//! names the agent by cluster and node UID, so a new agent pod on the same node keeps its ID.

use std::path::PathBuf;
use std::time::Duration;

use continuity_common::https::{self, ServerTrust};
use serde_json::{Value, json};

use crate::Selector;

/// The attestation data type string on the wire.
pub const ATTESTOR_TYPE: &str = "k8s_psat";
/// Default token audience.
pub const DEFAULT_AUDIENCE: &str = "continuity-server";

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
    /// `ca_path`, or the system roots).
    OidcDiscovery {
        /// Issuer URL.
        issuer: String,
        /// CA of a private issuer (PEM).
        ca_path: Option<PathBuf>,
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
    /// Required `iss`, when set (offline validation).
    pub issuer: Option<String>,
    /// How tokens are validated.
    pub validation: Validation,
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
        vec![
            s("cluster", &self.cluster),
            s("agent_ns", &self.namespace),
            s("agent_sa", &self.service_account),
            s("agent_pod_name", &self.pod_name),
            s("agent_pod_uid", &self.pod_uid),
            s("agent_node_name", &self.node_name),
            s("agent_node_uid", &self.node_uid),
        ]
    }
}

/// The `(kid, SubjectPublicKeyInfo)` pairs of a JWKS document; keys without a `kid` or that are
/// not usable JWKs are skipped.
pub fn jwks_keys(jwks: &Value) -> Vec<(String, Vec<u8>)> {
    jwks["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| {
            Some((
                k["kid"].as_str()?.to_string(),
                continuity_common::jwk::to_spki(k).ok()?,
            ))
        })
        .collect()
}

fn fetch_json(url: &str, roots: &[Vec<u8>]) -> Result<Value, PsatError> {
    let r = https::request(
        "GET",
        url,
        &ServerTrust::Roots(roots.to_vec()),
        None,
        None,
        Duration::from_secs(5),
    )
    .map_err(|e| PsatError::Validator(e.to_string()))?;
    if r.status != 200 {
        return Err(PsatError::Validator(format!(
            "GET {url} answered {}",
            r.status
        )));
    }
    serde_json::from_slice(&r.body).map_err(|e| PsatError::Validator(format!("{url}: {e}")))
}

fn system_roots() -> Vec<Vec<u8>> {
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .and_then(|pem| continuity_common::x509::pem_decode_all("CERTIFICATE", &pem).ok())
    .unwrap_or_default()
}

/// The `jwks_uri` of an OIDC discovery document.
pub fn jwks_uri(conf: &Value) -> Result<&str, PsatError> {
    conf["jwks_uri"]
        .as_str()
        .ok_or_else(|| PsatError::Validator("OIDC configuration has no jwks_uri".into()))
}

fn check_allowed(cfg: &ClusterConfig, ns: &str, sa: &str) -> Result<(), PsatError> {
    let who = format!("{ns}:{sa}");
    if cfg.service_account_allow_list.contains(&who) {
        Ok(())
    } else {
        Err(PsatError::NotAllowed(who))
    }
}

/// Validates a payload against the configured clusters (blocking: may call the network).
pub fn validate(
    payload: &[u8],
    clusters: &[ClusterConfig],
    now: i64,
) -> Result<Attested, PsatError> {
    let p: Payload =
        serde_json::from_slice(payload).map_err(|e| PsatError::Payload(e.to_string()))?;
    let cfg = clusters
        .iter()
        .find(|c| c.name == p.cluster)
        .ok_or_else(|| PsatError::UnknownCluster(p.cluster.clone()))?;
    match &cfg.validation {
        Validation::JwksFile(_) | Validation::OidcDiscovery { .. } => offline(cfg, &p.token, now),
        Validation::TokenReview {
            api_server,
            ca_path,
            token_path,
        } => token_review(cfg, &p.token, api_server, ca_path, token_path),
    }
}

fn offline(cfg: &ClusterConfig, token: &str, now: i64) -> Result<Attested, PsatError> {
    let jwks = match &cfg.validation {
        Validation::JwksFile(path) => {
            let text = std::fs::read(path)
                .map_err(|e| PsatError::Validator(format!("jwks_path {}: {e}", path.display())))?;
            serde_json::from_slice(&text)
                .map_err(|e| PsatError::Validator(format!("jwks_path {}: {e}", path.display())))?
        }
        Validation::OidcDiscovery { issuer, ca_path } => {
            let roots = match ca_path {
                Some(p) => {
                    let pem = std::fs::read_to_string(p).map_err(|e| {
                        PsatError::Validator(format!("oidc_ca_path {}: {e}", p.display()))
                    })?;
                    continuity_common::x509::pem_decode_all("CERTIFICATE", &pem)
                        .map_err(PsatError::Validator)?
                }
                None => system_roots(),
            };
            let conf = fetch_json(
                &format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                ),
                &roots,
            )?;
            fetch_json(jwks_uri(&conf)?, &roots)?
        }
        Validation::TokenReview { .. } => {
            return Err(PsatError::Validator("not an offline cluster".into()));
        }
    };
    let keys = jwks_keys(&jwks);
    let claims = continuity_common::jwt::verify_jws(token, |kid| {
        keys.iter()
            .find(|(k, _)| k == kid)
            .map(|(_, s)| s.as_slice())
    })
    .map_err(|e| PsatError::Token(e.to_string()))?;
    if let Some(iss) = &cfg.issuer {
        let got = claims
            .get("iss")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if got != iss {
            return Err(PsatError::Token(format!("issuer {got:?} is not {iss:?}")));
        }
    }
    let aud = continuity_common::jwt::audiences(&claims);
    if !aud.contains(&cfg.audience) {
        return Err(PsatError::Token(format!(
            "audience {aud:?} does not include {:?}",
            cfg.audience
        )));
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(|| PsatError::Token("no exp claim".into()))?;
    // `exp` is the token's: saturate rather than overflow on i64::MAX.
    if exp.saturating_add(continuity_common::jwt::LEEWAY_SECS) < now {
        return Err(PsatError::Token(format!("token expired at {exp}")));
    }
    let k = &claims.get("kubernetes.io").cloned().unwrap_or_default();
    let str_at = |path: &[&str]| {
        path.iter()
            .fold(k, |v, p| &v[*p])
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let a = Attested {
        cluster: cfg.name.clone(),
        namespace: str_at(&["namespace"]),
        service_account: str_at(&["serviceaccount", "name"]),
        pod_name: str_at(&["pod", "name"]),
        pod_uid: str_at(&["pod", "uid"]),
        node_name: str_at(&["node", "name"]),
        node_uid: str_at(&["node", "uid"]),
    };
    finish(cfg, a)
}

fn finish(cfg: &ClusterConfig, a: Attested) -> Result<Attested, PsatError> {
    if a.namespace.is_empty() || a.service_account.is_empty() {
        return Err(PsatError::Token(
            "not a service-account token (no namespace/service account)".into(),
        ));
    }
    check_allowed(cfg, &a.namespace, &a.service_account)?;
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
    let roots = continuity_common::x509::pem_decode_all("CERTIFICATE", &ca)
        .map_err(PsatError::Validator)?;
    let bearer = std::fs::read_to_string(token_path)
        .map_err(|e| PsatError::Validator(format!("token_path {}: {e}", token_path.display())))?;
    let body = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [cfg.audience]},
    })
    .to_string();
    let url = format!(
        "{}/apis/authentication.k8s.io/v1/tokenreviews",
        api_server.trim_end_matches('/')
    );
    let r = https::request(
        "POST",
        &url,
        &ServerTrust::Roots(roots),
        Some(bearer.trim()),
        Some(("application/json", body.as_bytes())),
        Duration::from_secs(5),
    )
    .map_err(|e| PsatError::Validator(e.to_string()))?;
    if r.status != 200 && r.status != 201 {
        return Err(PsatError::Validator(format!(
            "TokenReview answered {}",
            r.status
        )));
    }
    token_review_status(cfg, &r.body)
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
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    /// base64url without padding (attestors has no base64 dependency of its own).
    fn b64url(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for c in data.chunks(3) {
            let n = c
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
            for i in 0..=c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn a_psat_whose_exp_is_i64_max_does_not_overflow() {
        let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let point = kp.public_key().as_ref();
        let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k",
            "x": b64url(&point[1..33]), "y": b64url(&point[33..])}]});
        let path = std::env::temp_dir().join(format!("psat-jwks-{}.json", std::process::id()));
        std::fs::write(&path, jwks.to_string()).unwrap();
        let claims = serde_json::json!({"aud": ["continuity-server"], "exp": i64::MAX,
            "kubernetes.io": {"namespace": "spire", "serviceaccount": {"name": "agent"},
            "pod": {"name": "p", "uid": "u"}, "node": {"name": "n",
            "uid": "0b3c2a44-59d0-4c3b-8c6f-5f0c8d1a2e3f"}}});
        let input = format!(
            "{}.{}",
            b64url(br#"{"alg":"ES256","kid":"k"}"#),
            b64url(claims.to_string().as_bytes())
        );
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = kp.sign(&rng, input.as_bytes()).unwrap();
        let token = format!("{input}.{}", b64url(sig.as_ref()));
        let cfg = ClusterConfig {
            name: "c".into(),
            service_account_allow_list: vec!["spire:agent".into()],
            audience: DEFAULT_AUDIENCE.into(),
            issuer: None,
            validation: Validation::JwksFile(path.clone()),
        };
        let payload = serde_json::to_vec(&Payload {
            cluster: "c".into(),
            token,
        })
        .unwrap();
        let r = validate(&payload, &[cfg], 1_700_000_000);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(r.unwrap().service_account, "agent");
    }
}
