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

fn b64url(jwk: &Value, field: &str) -> Result<Vec<u8>, JwkError> {
    let s = jwk[field]
        .as_str()
        .ok_or_else(|| JwkError::Malformed(format!("JWK has no {field}")))?;
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| JwkError::Malformed(format!("JWK {field}: {e}")))
}

/// SubjectPublicKeyInfo (DER) of an EC (P-256/P-384) or RSA JWK.
pub fn to_spki(jwk: &Value) -> Result<Vec<u8>, JwkError> {
    use crate::der::{rsa_public_key, tlv};
    const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
    const RSA: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let bit_string = |content: &[u8]| {
        let mut b = vec![0u8];
        b.extend_from_slice(content);
        tlv(0x03, &b)
    };
    match jwk["kty"].as_str() {
        Some("EC") => {
            let curve = match jwk["crv"].as_str() {
                Some("P-256") => P256,
                Some("P-384") => P384,
                _ => return Err(JwkError::Unsupported),
            };
            let mut point = vec![0x04];
            point.extend(b64url(jwk, "x")?);
            point.extend(b64url(jwk, "y")?);
            let mut alg = EC_PUBLIC_KEY.to_vec();
            alg.extend_from_slice(curve);
            let mut body = tlv(0x30, &alg);
            body.extend(bit_string(&point));
            Ok(tlv(0x30, &body))
        }
        Some("RSA") => {
            let key = rsa_public_key(&b64url(jwk, "n")?, &b64url(jwk, "e")?);
            let mut body = tlv(0x30, RSA);
            body.extend(bit_string(&key));
            Ok(tlv(0x30, &body))
        }
        _ => Err(JwkError::Unsupported),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwk_round_trips_through_spki() {
        use aws_lc_rs::signature::KeyPair;
        let kp = aws_lc_rs::signature::EcdsaKeyPair::generate(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        )
        .unwrap();
        let point = kp.public_key().as_ref().to_vec();
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])});
        let spki = to_spki(&jwk).unwrap();
        let back = from_spki(&spki).unwrap();
        assert_eq!(back["x"], jwk["x"]);
        assert_eq!(back["y"], jwk["y"]);
    }
}
