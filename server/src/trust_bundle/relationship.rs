//! A federation relationship (SPIRE's shape): the trust domain, the URL of its SPIFFE bundle
//! endpoint and how that endpoint authenticates (`https_spiffe` with its SPIFFE ID, or
//! `https_web`). Built only through [`Relationship::new`], which treats every field as hostile.

use continuity_common::{SpiffeId, TrustDomain};

/// Longest bundle endpoint URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// How the peer's bundle endpoint is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAuth {
    /// The endpoint presents an X509-SVID with this SPIFFE ID, chained to the bundle held
    /// for the trust domain.
    HttpsSpiffe(SpiffeId),
    /// The endpoint presents a Web PKI certificate for the URL's host.
    HttpsWeb,
}

impl EndpointAuth {
    /// The profile name (`https_spiffe` or `https_web`).
    pub fn profile(&self) -> &'static str {
        match self {
            Self::HttpsSpiffe(_) => "https_spiffe",
            Self::HttpsWeb => "https_web",
        }
    }

    /// The endpoint SPIFFE ID (empty for `https_web`).
    pub fn endpoint_spiffe_id(&self) -> String {
        match self {
            Self::HttpsSpiffe(id) => id.to_string(),
            Self::HttpsWeb => String::new(),
        }
    }
}

/// A validated federation relationship.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relationship {
    /// The foreign trust domain.
    pub trust_domain: TrustDomain,
    /// `https://host[:port]/path` of its bundle endpoint.
    pub bundle_endpoint_url: String,
    /// How the endpoint is authenticated.
    pub auth: EndpointAuth,
}

/// Why a relationship was refused; each names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelationshipError {
    /// A field is malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field (the CLI flag's name, in snake case).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> RelationshipError {
    RelationshipError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl Relationship {
    /// Validates the fields of a relationship (the caller refuses its own trust domain).
    pub fn new(
        trust_domain: &str,
        bundle_endpoint_url: &str,
        profile: &str,
        endpoint_spiffe_id: &str,
    ) -> Result<Self, RelationshipError> {
        let td =
            TrustDomain::new(trust_domain).map_err(|e| invalid("trust_domain", e.to_string()))?;
        check_url(bundle_endpoint_url)?;
        let auth = match profile {
            "https_spiffe" => {
                if endpoint_spiffe_id.is_empty() {
                    return Err(invalid(
                        "endpoint_spiffe_id",
                        "is required with the https_spiffe profile",
                    ));
                }
                let id = SpiffeId::new(endpoint_spiffe_id)
                    .map_err(|e| invalid("endpoint_spiffe_id", e.to_string()))?;
                EndpointAuth::HttpsSpiffe(id)
            }
            "https_web" => {
                if !endpoint_spiffe_id.is_empty() {
                    return Err(invalid(
                        "endpoint_spiffe_id",
                        "only the https_spiffe profile takes an endpoint SPIFFE ID",
                    ));
                }
                EndpointAuth::HttpsWeb
            }
            other => {
                return Err(invalid(
                    "bundle_endpoint_profile",
                    format!("{other:?}: expected https_spiffe or https_web"),
                ));
            }
        };
        Ok(Self {
            trust_domain: td,
            bundle_endpoint_url: bundle_endpoint_url.to_string(),
            auth,
        })
    }
}

/// An `https://host[:port][/path]` URL: no user info, no fragment, printable ASCII only.
fn check_url(url: &str) -> Result<(), RelationshipError> {
    let field = "bundle_endpoint_url";
    if url.len() > MAX_URL_LEN {
        return Err(invalid(field, format!("longer than {MAX_URL_LEN} bytes")));
    }
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(field, "must be printable ASCII without spaces"));
    }
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(invalid(field, format!("{url:?} is not an https:// URL")));
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.contains('@') || url.contains('#') {
        return Err(invalid(field, "must not carry user info or a fragment"));
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => return Err(invalid(field, "unterminated IPv6 address")),
        },
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if let Some(port) = port
        && port.parse::<u16>().ok().is_none_or(|p| p == 0)
    {
        return Err(invalid(field, format!("port {port:?} is not 1-65535")));
    }
    if host.is_empty() {
        return Err(invalid(field, format!("{url:?} has no host")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(r: Result<Relationship, RelationshipError>) -> &'static str {
        match r {
            Err(RelationshipError::Invalid { field, .. }) => field,
            Ok(r) => panic!("accepted {r:?}"),
        }
    }

    #[test]
    fn a_valid_https_spiffe_relationship_is_built() {
        let r = Relationship::new(
            "spiffe://peer.test",
            "https://peer.test:8443/",
            "https_spiffe",
            "spiffe://peer.test/continuity/server",
        )
        .unwrap();
        assert_eq!(r.trust_domain.name(), "peer.test");
        assert_eq!(r.auth.profile(), "https_spiffe");
        assert_eq!(
            r.auth.endpoint_spiffe_id(),
            "spiffe://peer.test/continuity/server"
        );
        let web = Relationship::new("peer.test", "https://b.example/x", "https_web", "").unwrap();
        assert_eq!(web.auth, EndpointAuth::HttpsWeb);
    }

    #[test]
    fn hostile_fields_are_refused_naming_the_field() {
        let id = "spiffe://peer.test/s";
        let new = |td, url, profile, eid| Relationship::new(td, url, profile, eid);
        assert_eq!(
            field_of(new("Bad TD", "https://a/", "https_spiffe", id)),
            "trust_domain"
        );
        for url in [
            "http://a/",
            "https://",
            "https:///x",
            "https://a:0/",
            "https://a:99999/",
            "https://a:x/",
            "https://u@a/",
            "https://a/#f",
            "https://a/ b",
            "https://[::1/",
            "ftp://a/",
        ] {
            assert_eq!(
                field_of(new("peer.test", url, "https_spiffe", id)),
                "bundle_endpoint_url",
                "{url}"
            );
        }
        let long = format!("https://a/{}", "x".repeat(MAX_URL_LEN));
        assert_eq!(
            field_of(new("peer.test", &long, "https_web", "")),
            "bundle_endpoint_url"
        );
        for (profile, eid, field) in [
            ("https_spiffe", "", "endpoint_spiffe_id"),
            ("https_spiffe", "not-an-id", "endpoint_spiffe_id"),
            ("https_web", id, "endpoint_spiffe_id"),
            ("https_other", "", "bundle_endpoint_profile"),
        ] {
            assert_eq!(
                field_of(new("peer.test", "https://a/", profile, eid)),
                field
            );
        }
    }
}
