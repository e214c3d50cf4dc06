//! Where a cluster's token-signing keys come from: OIDC discovery over HTTPS, or a JWKS file.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use continuity_common::https::{self, ServerTrust};
use serde_json::Value;

use super::{KeySet, MAX_DOCUMENT_BYTES, PsatError};

/// OIDC discovery: the configuration document at `url`, whose `issuer` must be `issuer`, then
/// its `jwks_uri`.
pub(super) fn discover(
    url: &str,
    issuer: &str,
    ca_path: Option<&PathBuf>,
) -> Result<KeySet, PsatError> {
    let roots = match ca_path {
        Some(p) => {
            let pem = std::fs::read_to_string(p)
                .map_err(|e| PsatError::Validator(format!("oidc_ca_path {}: {e}", p.display())))?;
            continuity_common::x509::pem_decode_all("CERTIFICATE", &pem)
                .map_err(PsatError::Validator)?
        }
        None => system_roots(),
    };
    let conf_url = format!(
        "{}/.well-known/openid-configuration",
        url.trim_end_matches('/')
    );
    let conf = fetch_json(&conf_url, &roots)?;
    // OpenID Connect Discovery 1.0 §4.3: the document's issuer is the issuer, exactly.
    let named = conf["issuer"].as_str().unwrap_or_default();
    if named != issuer {
        return Err(PsatError::Validator(format!(
            "{conf_url} names issuer {named:?}, not {issuer:?}"
        )));
    }
    let uri = jwks_uri(&conf).map_err(|e| PsatError::Validator(format!("{conf_url}: {e}")))?;
    KeySet::from_jwks(&fetch_json(uri, &roots)?)
        .map_err(|e| PsatError::Validator(format!("{uri}: {e}")))
}

/// The `jwks_uri` of an OIDC discovery document.
pub fn jwks_uri(conf: &Value) -> Result<&str, PsatError> {
    conf["jwks_uri"]
        .as_str()
        .ok_or_else(|| PsatError::Validator("the OIDC configuration has no jwks_uri".into()))
}

/// The `(kid, SubjectPublicKeyInfo)` pairs of a JWKS document; keys without a `kid` or that are
/// not usable JWKs are skipped.
pub fn jwks_keys(jwks: &Value) -> Vec<(String, Vec<u8>)> {
    KeySet::from_jwks(jwks)
        .map(KeySet::into_pairs)
        .unwrap_or_default()
}

fn fetch_json(url: &str, roots: &[Vec<u8>]) -> Result<Value, PsatError> {
    let r = https::request_capped(
        "GET",
        url,
        &ServerTrust::Roots(roots.to_vec()),
        None,
        None,
        Duration::from_secs(5),
        MAX_DOCUMENT_BYTES,
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

pub(super) fn read_json_file(path: &PathBuf, key: &str) -> Result<Value, PsatError> {
    let fail = |e: String| PsatError::Validator(format!("{key} {}: {e}", path.display()));
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_DOCUMENT_BYTES as u64 + 1).read_to_end(&mut text))
        .map_err(|e| fail(e.to_string()))?;
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(fail(format!("larger than {MAX_DOCUMENT_BYTES} bytes")));
    }
    serde_json::from_slice(&text).map_err(|e| fail(e.to_string()))
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
