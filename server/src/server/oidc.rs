//! The OIDC discovery provider (`[oidc_discovery]`): `/.well-known/openid-configuration` and
//! the JWKS of the JWT-SVID keys it names, so that OIDC relying parties (cloud providers,
//! Vault) verify JWT-SVIDs with nothing but the issuer URL. The document matches SPIRE's
//! oidc-discovery-provider; the JWKS is built from the CA's current bundle on every request,
//! so it follows JWT key rotation (a prepared key is published before it signs anything).

use serde_json::{Value, json};

use crate::ca::{Bundle, CaManager};
use crate::config::{KEYS_PATH, OidcDiscoveryConfig};
use continuity_common::http::Reply;

/// The discovery document's path.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// Answers one GET on the provider's listener.
pub fn reply(cfg: &OidcDiscoveryConfig, ca: &CaManager, path: &str) -> Reply {
    match path {
        DISCOVERY_PATH => (200, "application/json", document(cfg).to_string()),
        KEYS_PATH => match jwks(&ca.bundle()) {
            Ok(keys) => (200, "application/json", keys.to_string()),
            Err(e) => {
                tracing::error!(error = %e, "a JWT-SVID key cannot be published as a JWK");
                (500, "text/plain", "JWKS not available\n".into())
            }
        },
        _ => (404, "text/plain", "not found\n".into()),
    }
}

/// The OpenID Provider metadata (only what a JWT relying party needs, as SPIRE serves it).
fn document(cfg: &OidcDiscoveryConfig) -> Value {
    json!({
        "issuer": cfg.issuer,
        "jwks_uri": cfg.jwks_uri,
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": [],
        "id_token_signing_alg_values_supported": ["RS256", "ES256", "ES384"],
    })
}

/// The JWT-SVID keys as an RFC 7517 JWKS: `kid`, `use: sig` and the `alg` they sign with.
fn jwks(bundle: &Bundle) -> Result<Value, continuity_common::jwk::JwkError> {
    let mut keys = Vec::with_capacity(bundle.jwt_authorities.len());
    for k in &bundle.jwt_authorities {
        let mut jwk = continuity_common::jwk::from_spki(&k.public_key)?;
        let alg = match (jwk.get("kty"), jwk.get("crv")) {
            (Some(Value::String(kty)), _) if kty == "RSA" => "RS256",
            (_, Some(Value::String(crv))) if crv == "P-384" => "ES384",
            _ => "ES256",
        };
        jwk.insert("kid".into(), k.key_id.clone().into());
        jwk.insert("use".into(), "sig".into());
        jwk.insert("alg".into(), alg.into());
        keys.push(Value::Object(jwk));
    }
    Ok(json!({ "keys": keys }))
}
