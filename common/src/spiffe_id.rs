//! SPIFFE IDs and trust domains, validated per the SPIFFE ID specification.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The scheme is not `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID: it must start with \"spiffe://\"")]
    Scheme(String),
    /// The trust domain part is empty or has characters outside [a-z0-9.-_].
    #[error(
        "{0:?}: the trust domain must be non-empty and use only lowercase letters, digits, '.', '-' and '_'"
    )]
    TrustDomain(String),
    /// The path has an empty, "." or ".." segment, a trailing slash, or a bad character.
    #[error(
        "{0:?}: path segments must be non-empty, not '.' or '..', and use only letters, digits, '.', '-' and '_'"
    )]
    Path(String),
    /// Query, fragment, port or user info are present.
    #[error("{0:?}: a SPIFFE ID has no query, fragment, port or user info")]
    Extra(String),
}

/// A trust domain name such as `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or its ID form (`spiffe://example.org`).
    pub fn new(s: &str) -> Result<Self, SpiffeIdError> {
        let name = s.strip_prefix("spiffe://").unwrap_or(s);
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(SpiffeIdError::TrustDomain(s.to_string()));
        }
        Ok(Self(name.to_string()))
    }

    /// The bare name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// `spiffe://<name>`, the key used in Workload API bundle maps.
    pub fn id_string(&self) -> String {
        format!("spiffe://{}", self.0)
    }

    /// A SPIFFE ID in this trust domain with the given path (which must start with '/').
    pub fn id(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::new(&format!("spiffe://{}{}", self.0, path))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated SPIFFE ID: `spiffe://<trust-domain>/<path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    td_len: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn new(s: &str) -> Result<Self, SpiffeIdError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_string()))?;
        if rest.contains(['?', '#', '@', ':']) {
            return Err(SpiffeIdError::Extra(s.to_string()));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        TrustDomain::new(td).map_err(|_| SpiffeIdError::TrustDomain(s.to_string()))?;
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                let ok = !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
                if !ok {
                    return Err(SpiffeIdError::Path(s.to_string()));
                }
            }
        }
        Ok(Self {
            id: s.to_string(),
            td_len: td.len(),
        })
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.id["spiffe://".len().."spiffe://".len() + self.td_len].to_string())
    }

    /// The path part, empty or starting with '/'.
    pub fn path(&self) -> &str {
        &self.id["spiffe://".len() + self.td_len..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        let id = SpiffeId::new("spiffe://example.org/ns/prod/sa/web").unwrap();
        assert_eq!(id.trust_domain().name(), "example.org");
        assert_eq!(id.path(), "/ns/prod/sa/web");
        assert!(SpiffeId::new("spiffe://example.org").is_ok());
    }

    #[test]
    fn rejects_invalid_ids() {
        for bad in [
            "http://example.org/x",
            "spiffe://",
            "spiffe://Example.org/x",
            "spiffe://example.org/",
            "spiffe://example.org//x",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a?x=1",
            "spiffe://example.org:8080/a",
            "spiffe://example.org/a b",
        ] {
            assert!(SpiffeId::new(bad).is_err(), "{bad} should be rejected");
        }
    }
}
