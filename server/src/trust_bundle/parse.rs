//! Parsing a foreign trust bundle an operator hands us (`bundle set --format pem|spiffe`) or a
//! bundle endpoint answers: hostile bytes until every certificate and key in them parsed.
//!
//! Accepted: PEM (one or more `CERTIFICATE` blocks, nothing else) or the SPIFFE bundle
//! document (a JWKS whose keys have `use` `x509-svid`, with exactly one certificate in `x5c`,
//! or `jwt-svid`, with a `kid`; keys of any other `use` are ignored, as the SPIFFE Trust
//! Domain and Bundle spec says). Sizes are bounded before anything is decoded.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use continuity_common::TrustDomain;
use serde_json::Value;

use super::{Bundle, JwtAuthority};

/// Largest bundle document accepted, bytes.
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;
/// Most X.509 authorities plus JWT keys in one bundle.
pub const MAX_BUNDLE_KEYS: usize = 256;
/// Longest `kid` accepted.
const MAX_KID_LEN: usize = 256;

/// The format of a bundle document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleFormat {
    /// Concatenated PEM `CERTIFICATE` blocks (X.509 authorities only).
    Pem,
    /// The SPIFFE bundle document (JWKS).
    Spiffe,
}

/// Why a bundle document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleParseError {
    /// Larger than [`MAX_BUNDLE_BYTES`].
    #[error("bundle is {0} bytes, more than the {MAX_BUNDLE_BYTES} accepted")]
    TooLarge(usize),
    /// More than [`MAX_BUNDLE_KEYS`] keys.
    #[error("bundle has more than {MAX_BUNDLE_KEYS} keys")]
    TooManyKeys,
    /// Not UTF-8 text.
    #[error("bundle is not UTF-8 text")]
    NotText,
    /// PEM that does not decode, or has no certificate.
    #[error("PEM: {0}")]
    Pem(String),
    /// JSON that does not parse or is not a SPIFFE bundle document.
    #[error("SPIFFE bundle: {0}")]
    Json(String),
    /// A certificate that does not parse or is not a CA.
    #[error("certificate {index}: {reason}")]
    Certificate {
        /// Its position (0-based) among the bundle's certificates.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A JWT key that is malformed, unsupported or duplicated.
    #[error("JWT key {kid:?}: {reason}")]
    JwtKey {
        /// Its `kid` (as given).
        kid: String,
        /// What is wrong.
        reason: String,
    },
    /// Neither an X.509 authority nor a JWT key.
    #[error("bundle has no X.509 authority and no JWT key")]
    Empty,
}

/// Parses `bytes` in `format` as the bundle of `trust_domain`. Sequence and refresh hint come
/// from a SPIFFE document (0 when absent, and always for PEM).
pub fn parse_bundle(
    trust_domain: &TrustDomain,
    bytes: &[u8],
    format: BundleFormat,
) -> Result<Bundle, BundleParseError> {
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(BundleParseError::TooLarge(bytes.len()));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| BundleParseError::NotText)?;
    let bundle = match format {
        BundleFormat::Pem => parse_pem(trust_domain, text)?,
        BundleFormat::Spiffe => parse_spiffe(trust_domain, text)?,
    };
    if bundle.x509_authorities.is_empty() && bundle.jwt_authorities.is_empty() {
        return Err(BundleParseError::Empty);
    }
    Ok(bundle)
}

fn parse_pem(trust_domain: &TrustDomain, text: &str) -> Result<Bundle, BundleParseError> {
    let other = text
        .lines()
        .filter(|l| l.starts_with("-----BEGIN ") && *l != "-----BEGIN CERTIFICATE-----")
        .map(str::to_string)
        .next();
    if let Some(line) = other {
        return Err(BundleParseError::Pem(format!(
            "only CERTIFICATE blocks are accepted, found {line:?}"
        )));
    }
    let certs = continuity_common::x509::pem_decode_all("CERTIFICATE", text)
        .map_err(BundleParseError::Pem)?;
    if certs.is_empty() {
        return Err(BundleParseError::Pem("no CERTIFICATE block".into()));
    }
    if certs.len() > MAX_BUNDLE_KEYS {
        return Err(BundleParseError::TooManyKeys);
    }
    for (index, der) in certs.iter().enumerate() {
        check_ca(index, der)?;
    }
    Ok(Bundle {
        trust_domain: trust_domain.clone(),
        x509_authorities: certs,
        jwt_authorities: Vec::new(),
        sequence: 0,
        refresh_hint: 0,
        tainted_x509: Vec::new(),
        tainted_jwt: Vec::new(),
    })
}

/// A certificate that parses as X.509 and is a CA (basic constraints cA=true).
fn check_ca(index: usize, der: &[u8]) -> Result<(), BundleParseError> {
    let bad = |reason: String| BundleParseError::Certificate { index, reason };
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the certificate".into()));
    }
    if !cert.is_ca() {
        return Err(bad(
            "not a CA certificate (basic constraints cA is not true)".into(),
        ));
    }
    Ok(())
}

fn parse_spiffe(trust_domain: &TrustDomain, text: &str) -> Result<Bundle, BundleParseError> {
    let json = |s: String| BundleParseError::Json(s);
    let doc: Value = serde_json::from_str(text).map_err(|e| json(e.to_string()))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| json("no \"keys\" array".into()))?;
    if keys.len() > MAX_BUNDLE_KEYS {
        return Err(BundleParseError::TooManyKeys);
    }
    let sequence = match doc.get("spiffe_sequence") {
        None => 0,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| json("spiffe_sequence is not a non-negative integer".into()))?,
    };
    let refresh_hint = match doc.get("spiffe_refresh_hint") {
        None => 0,
        Some(v) => v
            .as_i64()
            .filter(|h| *h >= 0)
            .ok_or_else(|| json("spiffe_refresh_hint is not a non-negative integer".into()))?,
    };
    let mut bundle = Bundle {
        trust_domain: trust_domain.clone(),
        x509_authorities: Vec::new(),
        jwt_authorities: Vec::new(),
        sequence,
        refresh_hint,
        tainted_x509: Vec::new(),
        tainted_jwt: Vec::new(),
    };
    for key in keys {
        match key.get("use").and_then(Value::as_str) {
            Some("x509-svid") => {
                let der = x509_key(key).map_err(json)?;
                check_ca(bundle.x509_authorities.len(), &der)?;
                bundle.x509_authorities.push(der);
            }
            Some("jwt-svid") => {
                let k = jwt_key(key)?;
                if bundle.jwt_authorities.iter().any(|o| o.key_id == k.key_id) {
                    return Err(BundleParseError::JwtKey {
                        kid: k.key_id,
                        reason: "kid appears twice".into(),
                    });
                }
                bundle.jwt_authorities.push(k);
            }
            // The spec: keys of an unknown use are ignored.
            _ => {}
        }
    }
    Ok(bundle)
}

/// The one certificate of an `x509-svid` key's `x5c`.
fn x509_key(key: &Value) -> Result<Vec<u8>, String> {
    let x5c = key
        .get("x5c")
        .and_then(Value::as_array)
        .ok_or("an x509-svid key has no \"x5c\" array")?;
    let [cert] = x5c.as_slice() else {
        return Err(format!(
            "an x509-svid key must have exactly one certificate in \"x5c\", found {}",
            x5c.len()
        ));
    };
    let b64 = cert.as_str().ok_or("x5c holds a non-string")?;
    STANDARD
        .decode(b64)
        .map_err(|e| format!("x5c is not base64: {e}"))
}

fn jwt_key(key: &Value) -> Result<JwtAuthority, BundleParseError> {
    let kid = key.get("kid").and_then(Value::as_str).unwrap_or_default();
    let bad = |reason: &str| BundleParseError::JwtKey {
        kid: kid.chars().take(64).collect(),
        reason: reason.into(),
    };
    if kid.is_empty() {
        return Err(bad("a jwt-svid key has no kid"));
    }
    if kid.len() > MAX_KID_LEN {
        return Err(bad("kid is too long"));
    }
    let public_key = continuity_common::jwk::to_spki(key).map_err(|e| bad(&e.to_string()))?;
    // The key must also read back as a JWK (a point of the curve's length, a supported type).
    continuity_common::jwk::from_spki(&public_key).map_err(|e| bad(&e.to_string()))?;
    Ok(JwtAuthority {
        key_id: kid.to_string(),
        public_key,
        expires_at: 0,
    })
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
