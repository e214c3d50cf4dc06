//! `[oidc_discovery]`: the OpenID Connect discovery document and the JWT-SVID keys' JWKS, served
//! over HTTP so that cloud providers, Vault and other OIDC relying parties can verify JWT-SVIDs
//! (as SPIRE's oidc-discovery-provider does). Absent: nothing is served.

use std::net::SocketAddr;

use continuity_common::config::{ConfigError, invalid};
use serde::Deserialize;

/// The path of the JWKS when `jwks_uri` is not set (SPIRE's `/keys`).
pub const KEYS_PATH: &str = "/keys";

/// `[oidc_discovery]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOidcDiscovery {
    /// host:port to listen on (plain HTTP; put TLS in front of it).
    pub bind_address: Option<String>,
    /// The JWKS URL published in the document (default: `jwt_issuer` + `/keys`).
    pub jwks_uri: Option<String>,
}

/// The validated `[oidc_discovery]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcDiscoveryConfig {
    /// The listener.
    pub bind_address: SocketAddr,
    /// `issuer` of the document: the server's `jwt_issuer`, an http(s) URL.
    pub issuer: String,
    /// `jwks_uri` of the document.
    pub jwks_uri: String,
}

impl OidcDiscoveryConfig {
    /// Validates the table against `jwt_issuer` (None: the provider is off); every error names
    /// its key.
    pub fn from_file(
        f: Option<FileOidcDiscovery>,
        jwt_issuer: Option<&str>,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(f) = f else { return Ok(None) };
        let key = "oidc_discovery.bind_address";
        let addr = f
            .bind_address
            .ok_or_else(|| invalid(key, "required when [oidc_discovery] is set"))?;
        let bind_address = addr.parse().map_err(|_| {
            invalid(
                key,
                format!("{addr:?} is not host:port (e.g. \"0.0.0.0:8443\")"),
            )
        })?;
        let issuer = jwt_issuer.ok_or_else(|| {
            invalid(
                "jwt_issuer",
                "required when [oidc_discovery] is set (the document's issuer, e.g. \"https://oidc.example.org\")",
            )
        })?;
        http_url(issuer).map_err(|m| invalid("jwt_issuer", m))?;
        let jwks_uri = match f.jwks_uri {
            Some(u) => {
                http_url(&u).map_err(|m| invalid("oidc_discovery.jwks_uri", m))?;
                u
            }
            None => format!("{}{KEYS_PATH}", issuer.trim_end_matches('/')),
        };
        Ok(Some(Self {
            bind_address,
            issuer: issuer.to_string(),
            jwks_uri,
        }))
    }
}

/// Checks that `s` is an absolute `https://` or `http://` URL with a host and no query or
/// fragment (what OpenID Connect Discovery allows for an issuer).
fn http_url(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| format!("{s:?} is not an https:// (or http://) URL"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.contains('@') {
        return Err(format!("{s:?} has no host (or carries credentials)"));
    }
    if s.contains(['?', '#']) || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{s:?} must not have a query, fragment, whitespace or control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(bind: Option<&str>, jwks_uri: Option<&str>) -> Option<FileOidcDiscovery> {
        Some(FileOidcDiscovery {
            bind_address: bind.map(String::from),
            jwks_uri: jwks_uri.map(String::from),
        })
    }

    #[test]
    fn defaults_jwks_uri_under_the_issuer() {
        let c = OidcDiscoveryConfig::from_file(
            table(Some("127.0.0.1:8443"), None),
            Some("https://oidc.example.org/"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.issuer, "https://oidc.example.org/");
        assert_eq!(c.jwks_uri, "https://oidc.example.org/keys");
        assert_eq!(c.bind_address, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(OidcDiscoveryConfig::from_file(None, None).unwrap(), None);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                table(None, None),
                Some("https://a"),
                "oidc_discovery.bind_address",
            ),
            (
                table(Some("nope"), None),
                Some("https://a"),
                "oidc_discovery.bind_address",
            ),
            (table(Some("127.0.0.1:1"), None), None, "jwt_issuer"),
            (
                table(Some("127.0.0.1:1"), None),
                Some("spiffe://a"),
                "jwt_issuer",
            ),
            (
                table(Some("127.0.0.1:1"), None),
                Some("https://"),
                "jwt_issuer",
            ),
            (
                table(Some("127.0.0.1:1"), None),
                Some("https://a?x=1"),
                "jwt_issuer",
            ),
            (
                table(Some("127.0.0.1:1"), Some("ftp://k")),
                Some("https://a"),
                "oidc_discovery.jwks_uri",
            ),
        ];
        for (f, issuer, key) in cases {
            let e = OidcDiscoveryConfig::from_file(f, issuer)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e:?} should name {key}");
        }
    }
}
