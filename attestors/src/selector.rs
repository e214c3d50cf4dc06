//! Selectors: `type:value` pairs describing a workload or node (SPIRE's spelling).

use std::fmt;
use std::str::FromStr;

/// Why a selector is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// No ':' separating type from value.
    #[error("selector {0:?} must be TYPE:VALUE, e.g. unix:uid:1000")]
    Syntax(String),
    /// The type is not one Continuity knows.
    #[error("selector {0:?}: unknown type (known: unix, k8s, k8s_psat, join_token)")]
    UnknownType(String),
    /// The value does not fit the type.
    #[error("selector {selector:?}: {reason}")]
    Value {
        /// The whole selector.
        selector: String,
        /// What the value should look like.
        reason: String,
    },
}

/// A selector: `kind` is the attestor type (`unix`, `k8s`, ...), `value` the rest.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Selector {
    /// The attestor type, e.g. `unix`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The value, e.g. `uid:1000`.
    pub value: String,
}

impl Selector {
    /// Builds and validates a selector from its two parts.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        let s = Self {
            kind: kind.to_string(),
            value: value.to_string(),
        };
        s.validate()?;
        Ok(s)
    }

    /// A selector produced by an attestor (not validated; attestors produce well-formed ones).
    pub fn raw(kind: &str, value: impl Into<String>) -> Self {
        Self {
            kind: kind.to_string(),
            value: value.into(),
        }
    }

    fn validate(&self) -> Result<(), SelectorError> {
        let whole = self.to_string();
        let bad = |reason: &str| SelectorError::Value {
            selector: whole.clone(),
            reason: reason.to_string(),
        };
        if self.value.is_empty() {
            return Err(bad("the value is empty"));
        }
        let (key, rest) = self
            .value
            .split_once(':')
            .unwrap_or((self.value.as_str(), ""));
        match self.kind.as_str() {
            "unix" => match key {
                "uid" | "gid" | "supplementary_gid" => rest
                    .parse::<u32>()
                    .map(|_| ())
                    .map_err(|_| bad(&format!("unix:{key} takes a number, e.g. unix:{key}:1000"))),
                "user" | "group" if !rest.is_empty() => Ok(()),
                "path" if rest.starts_with('/') => Ok(()),
                "path" => Err(bad("unix:path takes an absolute path")),
                "sha256" if rest.len() == 64 && rest.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    Ok(())
                }
                "sha256" => Err(bad("unix:sha256 takes 64 hex digits")),
                _ => Err(bad(
                    "unix selectors are uid, gid, user, group, supplementary_gid, path, sha256",
                )),
            },
            "k8s" => match key {
                "ns" | "sa" | "pod-uid" | "pod-name" | "pod-image" | "container-name"
                | "container-image" | "node-name" | "pod-image-count" | "pod-init-image"
                    if !rest.is_empty() =>
                {
                    Ok(())
                }
                "pod-label" | "pod-owner" | "pod-owner-uid"
                    if rest.contains(':') || key != "pod-label" =>
                {
                    Ok(())
                }
                "pod-label" => Err(bad("k8s:pod-label takes KEY:VALUE")),
                _ => Err(bad(
                    "k8s selectors are ns, sa, pod-uid, pod-name, pod-label:K:V, pod-image, container-name, container-image, node-name",
                )),
            },
            "k8s_psat" | "join_token" | "spiffe_id" => Ok(()),
            _ => Err(SelectorError::UnknownType(whole)),
        }
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| SelectorError::Syntax(s.to_string()))?;
        Self::new(kind, value)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spire_spelling() {
        let s: Selector = "unix:uid:1000".parse().unwrap();
        assert_eq!((s.kind.as_str(), s.value.as_str()), ("unix", "uid:1000"));
        assert!("k8s:pod-label:app:web".parse::<Selector>().is_ok());
        assert!("k8s:ns:prod".parse::<Selector>().is_ok());
    }

    #[test]
    fn rejects_typos_with_reasons() {
        assert!(matches!(
            "unix".parse::<Selector>(),
            Err(SelectorError::Syntax(_))
        ));
        assert!(matches!(
            "unx:uid:1".parse::<Selector>(),
            Err(SelectorError::UnknownType(_))
        ));
        assert!("unix:uid:abc".parse::<Selector>().is_err());
        assert!("unix:path:relative".parse::<Selector>().is_err());
        assert!("k8s:pod-label:nolabel".parse::<Selector>().is_err());
    }
}
