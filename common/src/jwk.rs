//! JSON Web Keys built from SubjectPublicKeyInfo, and the SPIFFE bundle document.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// A public key that cannot be expressed as a JWK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwkError {
    /// The SubjectPublicKeyInfo did not parse.
    #[error("malformed SubjectPublicKeyInfo: {0}")]
    Malformed(String),
    /// Only EC P-256/P-384 and RSA keys are supported.
    #[error("unsupported public key type (only EC P-256, P-384 and RSA)")]
    Unsupported,
}

const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

/// The JWK members describing the key in `spki_der` (`kty`, `crv`/`x`/`y` or `n`/`e`).
pub fn from_spki(spki_der: &[u8]) -> Result<Map<String, Value>, JwkError> {
    let (_, spki) =
        SubjectPublicKeyInfo::from_der(spki_der).map_err(|e| JwkError::Malformed(e.to_string()))?;
    let parsed = spki
        .parsed()
        .map_err(|e| JwkError::Malformed(e.to_string()))?;
    let mut m = Map::new();
    match parsed {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .ok_or(JwkError::Unsupported)?;
            let (crv, width) = match curve.as_str() {
                OID_P256 => ("P-256", 32),
                OID_P384 => ("P-384", 48),
                _ => return Err(JwkError::Unsupported),
            };
            let data = point.data();
            if data.len() != 1 + 2 * width || data[0] != 0x04 {
                return Err(JwkError::Malformed("EC point is not uncompressed".into()));
            }
            m.insert("kty".into(), "EC".into());
            m.insert("crv".into(), crv.into());
            m.insert(
                "x".into(),
                URL_SAFE_NO_PAD.encode(&data[1..1 + width]).into(),
            );
            m.insert(
                "y".into(),
                URL_SAFE_NO_PAD.encode(&data[1 + width..]).into(),
            );
        }
        PublicKey::RSA(rsa) => {
            let strip = |b: &[u8]| {
                b.iter()
                    .skip_while(|x| **x == 0)
                    .copied()
                    .collect::<Vec<u8>>()
            };
            m.insert("kty".into(), "RSA".into());
            m.insert(
                "n".into(),
                URL_SAFE_NO_PAD.encode(strip(rsa.modulus)).into(),
            );
            m.insert(
                "e".into(),
                URL_SAFE_NO_PAD.encode(strip(rsa.exponent)).into(),
            );
        }
        _ => return Err(JwkError::Unsupported),
    }
    Ok(m)
}

/// A JWT signing key as published in a bundle.
#[derive(Debug, Clone)]
pub struct JwtAuthority<'a> {
    /// The key ID (`kid`).
    pub key_id: &'a str,
    /// SubjectPublicKeyInfo, DER.
    pub public_key: &'a [u8],
}

/// A plain JWKS of JWT signing keys (what the Workload API's JWT bundle carries).
pub fn jwt_jwks(keys: &[JwtAuthority<'_>]) -> Result<Value, JwkError> {
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let mut jwk = from_spki(k.public_key)?;
        jwk.insert("kid".into(), k.key_id.into());
        jwk.insert("use".into(), "jwt-svid".into());
        out.push(Value::Object(jwk));
    }
    Ok(json!({ "keys": out }))
}

/// The SPIFFE bundle document: x509-svid keys (x5c), jwt-svid keys (kid), sequence and refresh hint.
pub fn spiffe_bundle(
    x509_authorities: &[Vec<u8>],
    jwt_authorities: &[JwtAuthority<'_>],
    sequence: u64,
    refresh_hint_secs: i64,
) -> Result<Value, JwkError> {
    let mut keys = Vec::new();
    for cert in x509_authorities {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| JwkError::Malformed(e.to_string()))?;
        let mut jwk = from_spki(parsed.tbs_certificate.subject_pki.raw)?;
        jwk.insert("use".into(), "x509-svid".into());
        jwk.insert("x5c".into(), json!([STANDARD.encode(cert)]));
        keys.push(Value::Object(jwk));
    }
    if let Value::Object(mut jwt) = jwt_jwks(jwt_authorities)?
        && let Some(Value::Array(list)) = jwt.remove("keys")
    {
        keys.extend(list);
    }
    Ok(json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint_secs,
    }))
}
