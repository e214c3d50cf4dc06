//! Node and pod label selectors (`agent_node_label:KEY:VALUE`, `agent_pod_label:KEY:VALUE`), as
//! SPIRE's k8s_psat server attestor makes them: the agent's Node and Pod are read through the
//! API server, checked against what the token says (same UIDs, the pod on that node), and only
//! labels whose key is in the cluster's allow-list become selectors. Any failure refuses the
//! attestation: no selector is ever made up from a lookup that did not succeed.

use std::time::Duration;

use continuity_common::https::{self, ServerTrust};
use serde_json::Value;

use super::{Attested, MAX_DOCUMENT_BYTES, PsatError};

/// Timeout of one Node or Pod read.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest label value Kubernetes allows.
const MAX_LABEL_VALUE: usize = 63;
/// Largest label key Kubernetes allows (a 253-byte prefix, '/', a 63-byte name).
const MAX_LABEL_KEY: usize = 253 + 1 + 63;

/// Which labels of one cluster become selectors, and the API server they are read from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelLookup {
    /// Node label keys that become `agent_node_label:` selectors.
    pub node_keys: Vec<String>,
    /// Pod label keys that become `agent_pod_label:` selectors.
    pub pod_keys: Vec<String>,
}

impl LabelLookup {
    /// Whether no label is wanted (no lookup is made).
    pub fn is_empty(&self) -> bool {
        self.node_keys.is_empty() && self.pod_keys.is_empty()
    }
}

/// The API server as the lookups see it.
pub(super) struct Api<'a> {
    /// Base URL, no trailing slash.
    pub base: &'a str,
    /// Its CA certificates.
    pub trust: &'a ServerTrust,
    /// The bearer token.
    pub bearer: &'a str,
}

/// Adds the allowed node and pod labels of `a`'s Node and Pod to it.
pub(super) fn add_labels(
    want: &LabelLookup,
    api: &Api<'_>,
    a: &mut Attested,
) -> Result<(), PsatError> {
    if !want.node_keys.is_empty() {
        let path = format!("/api/v1/nodes/{}", name(&a.node_name, "node name")?);
        let node = get(api, &path)?;
        check_uid(&node, &a.node_uid, "Node", &a.node_name)?;
        a.node_labels = allowed(&node, &want.node_keys, "Node")?;
    }
    if !want.pod_keys.is_empty() {
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}",
            name(&a.namespace, "namespace")?,
            name(&a.pod_name, "pod name")?
        );
        let pod = get(api, &path)?;
        check_uid(&pod, &a.pod_uid, "Pod", &a.pod_name)?;
        if pod["spec"]["nodeName"].as_str() != Some(a.node_name.as_str()) {
            return Err(PsatError::Token(format!(
                "Pod {} is not on node {} (spec.nodeName {})",
                a.pod_name, a.node_name, pod["spec"]["nodeName"]
            )));
        }
        a.pod_labels = allowed(&pod, &want.pod_keys, "Pod")?;
    }
    Ok(())
}

/// A name from the token, safe in a URL path (a Kubernetes DNS subdomain).
fn name<'a>(s: &'a str, what: &str) -> Result<&'a str, PsatError> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(s)
    } else {
        Err(PsatError::Token(format!(
            "the token's {what} {s:?} is not a Kubernetes name"
        )))
    }
}

/// GET `path`: the object, a refusal (404: the object is gone), or a validator failure.
fn get(api: &Api<'_>, path: &str) -> Result<Value, PsatError> {
    let r = https::request_capped(
        "GET",
        &format!("{}{path}", api.base),
        api.trust,
        Some(api.bearer),
        None,
        LOOKUP_TIMEOUT,
        MAX_DOCUMENT_BYTES,
    )
    .map_err(|e| PsatError::Validator(format!("GET {path}: {e}")))?;
    match r.status {
        200 => serde_json::from_slice(&r.body)
            .map_err(|e| PsatError::Validator(format!("GET {path}: not JSON: {e}"))),
        404 => Err(PsatError::Token(format!(
            "GET {path}: not found (the agent's node or pod does not exist)"
        ))),
        s => Err(PsatError::Validator(format!(
            "GET {path}: API server answered {s}"
        ))),
    }
}

/// The object's `metadata.uid` is the one the token names.
fn check_uid(obj: &Value, want: &str, kind: &str, name: &str) -> Result<(), PsatError> {
    match obj["metadata"]["uid"].as_str() {
        Some(uid) if uid == want => Ok(()),
        got => Err(PsatError::Token(format!(
            "{kind} {name} has uid {got:?}, the token names {want:?}"
        ))),
    }
}

/// The labels of `obj` whose key is in `keys`, sorted by key; a malformed label refuses.
fn allowed(obj: &Value, keys: &[String], kind: &str) -> Result<Vec<(String, String)>, PsatError> {
    let labels = match &obj["metadata"]["labels"] {
        Value::Null => return Ok(Vec::new()),
        Value::Object(m) => m,
        _ => {
            return Err(PsatError::Validator(format!(
                "{kind} metadata.labels is not an object"
            )));
        }
    };
    let mut out = Vec::new();
    for (k, v) in labels {
        if !keys.contains(k) {
            continue;
        }
        let v = v
            .as_str()
            .filter(|v| label_value_ok(v))
            .ok_or_else(|| PsatError::Validator(format!("{kind} label {k:?} has a bad value")))?;
        out.push((k.clone(), v.to_string()));
    }
    out.sort();
    Ok(out)
}

/// A label key as Kubernetes allows it: `[prefix/]name`, letters, digits, `-`, `_`, `.`.
pub fn label_key_ok(k: &str) -> bool {
    let chars = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    let name_ok = |n: &str| n.len() <= 63 && chars(n);
    k.len() <= MAX_LABEL_KEY
        && match k.split_once('/') {
            Some((prefix, name)) => prefix.len() <= 253 && chars(prefix) && name_ok(name),
            None => name_ok(k),
        }
}

fn label_value_ok(v: &str) -> bool {
    v.len() <= MAX_LABEL_VALUE
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_allowed_keys_become_labels() {
        let node = serde_json::json!({"kind": "Node", "metadata": {"name": "n", "uid": "u",
            "labels": {"zone": "a", "rack": "r1", "topology.kubernetes.io/region": "eu"}}});
        let got = allowed(
            &node,
            &keys(&["zone", "topology.kubernetes.io/region"]),
            "Node",
        )
        .unwrap();
        assert_eq!(
            got,
            [
                ("topology.kubernetes.io/region".into(), "eu".into()),
                ("zone".into(), "a".into())
            ]
        );
        let none = serde_json::json!({"metadata": {"name": "n"}});
        assert!(allowed(&none, &keys(&["zone"]), "Node").unwrap().is_empty());
    }

    #[test]
    fn malformed_labels_and_uids_refuse() {
        let bad = serde_json::json!({"metadata": {"labels": {"zone": "a:b"}}});
        assert!(allowed(&bad, &keys(&["zone"]), "Node").is_err());
        let bad = serde_json::json!({"metadata": {"labels": {"zone": 7}}});
        assert!(allowed(&bad, &keys(&["zone"]), "Node").is_err());
        let bad = serde_json::json!({"metadata": {"labels": ["zone"]}});
        assert!(allowed(&bad, &keys(&["zone"]), "Node").is_err());
        let node = serde_json::json!({"metadata": {"uid": "other"}});
        let e = check_uid(&node, "u", "Node", "n").unwrap_err().to_string();
        assert!(e.contains("\"other\"") && e.contains("\"u\""), "{e}");
        assert!(check_uid(&serde_json::json!({}), "u", "Node", "n").is_err());
    }

    #[test]
    fn names_from_the_token_are_checked_before_a_path_is_built() {
        assert!(name("node-a.example", "node name").is_ok());
        for bad in ["", "../secrets", "a/b", "a?b", "A", "a b"] {
            assert!(name(bad, "node name").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn label_keys_follow_kubernetes() {
        for ok in ["zone", "topology.kubernetes.io/zone", "a_b-c.d"] {
            assert!(label_key_ok(ok), "{ok}");
        }
        for bad in ["", "a:b", "/zone", "a/", "x y", &"k".repeat(64)] {
            assert!(!label_key_ok(bad), "{bad:?}");
        }
    }
}
