//! Continuity proofs: each new version of an Engine sign key is endorsed by the previous
//! primary version with a compact JWS (`typ` [`TYP`]), and a relying party that pinned one
//! version's public key walks the endorsements to the newest version ([`verify_chain`]).
//! The format is documented in README.md, "Continuity proofs".

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};
use x509_parser::prelude::FromDer;

use crate::jwk::{from_spki, to_spki};

/// The JWS header `typ` of an endorsement.
pub const TYP: &str = "continuity-endorsement+jwt";

/// What an endorsement states: version `version` of `engine`/`key` in `trust_domain`, with
/// public key `jwk`, follows `previous_version`, which signs the statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// The trust domain name (no scheme).
    pub trust_domain: String,
    /// The Engine.
    pub engine: String,
    /// The key.
    pub key: String,
    /// The endorsed (new) version.
    pub version: u32,
    /// The endorsed version's kid.
    pub kid: String,
    /// The endorsed version's public JWK (`kty` and key members, `kid`, `alg`).
    pub jwk: Map<String, Value>,
    /// The endorsing version (the primary when the new one was made).
    pub previous_version: u32,
    /// The endorsing version's kid (also the JWS header `kid`).
    pub previous_kid: String,
    /// When it was made (Unix seconds).
    pub iat: i64,
}

/// A failed check, naming where: a link (`link v2 -> v3`), an entry, the pinned key, the
/// document or the final signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {reason}")]
pub struct ChainError {
    /// Where the check failed.
    pub at: String,
    /// Why.
    pub reason: String,
}

fn fail<T>(at: impl Into<String>, reason: impl Into<String>) -> Result<T, ChainError> {
    Err(ChainError {
        at: at.into(),
        reason: reason.into(),
    })
}

/// The JWS `alg` a key signs endorsements with: ES256 (P-256), ES384 (P-384), RS256 (RSA).
pub fn jws_alg(jwk: &Map<String, Value>) -> Result<&'static str, String> {
    match (jwk.get("kty").and_then(Value::as_str), jwk.get("crv")) {
        (Some("EC"), Some(Value::String(c))) if c == "P-256" => Ok("ES256"),
        (Some("EC"), Some(Value::String(c))) if c == "P-384" => Ok("ES384"),
        (Some("RSA"), _) => Ok("RS256"),
        _ => Err("unsupported JWK (only EC P-256, P-384 and RSA)".into()),
    }
}

/// The RFC 7638 JWK thumbprint (SHA-256, base64url): the required members in lexicographic
/// order, no whitespace.
pub fn thumbprint(jwk: &Map<String, Value>) -> Result<String, String> {
    let members: &[&str] = match jwk.get("kty").and_then(Value::as_str) {
        Some("EC") => &["crv", "kty", "x", "y"],
        Some("RSA") => &["e", "kty", "n"],
        _ => return Err("unsupported JWK kty".into()),
    };
    let mut required = Map::new();
    for m in members {
        let v = jwk.get(*m).and_then(Value::as_str);
        let v = v.ok_or_else(|| format!("JWK has no {m}"))?;
        required.insert((*m).into(), v.into());
    }
    // serde_json's Map keeps keys sorted, which is what RFC 7638 asks for.
    let canonical = Value::Object(required).to_string();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    Ok(URL_SAFE_NO_PAD.encode(digest.as_ref()))
}

impl Statement {
    /// The JWS claims.
    pub fn claims(&self) -> Result<Value, String> {
        Ok(json!({
            "trust_domain": self.trust_domain,
            "engine": self.engine,
            "key": self.key,
            "version": self.version,
            "kid": self.kid,
            "jwk": self.jwk,
            "jwk_thumbprint": thumbprint(&self.jwk)?,
            "previous_version": self.previous_version,
            "previous_kid": self.previous_kid,
            "iat": self.iat,
        }))
    }

    /// The JWS signing input (`BASE64URL(header) "." BASE64URL(claims)`) with `alg`, the
    /// previous version's algorithm.
    pub fn signing_input(&self, alg: &str) -> Result<String, String> {
        let header = json!({"alg": alg, "kid": self.previous_kid, "typ": TYP});
        Ok(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(self.claims()?.to_string())
        ))
    }
}

/// The compact JWS: the signing input, a dot, the base64url signature (JOSE form: r‖s for
/// ECDSA, the PKCS#1 v1.5 bytes for RSA).
pub fn compact(signing_input: &str, signature: &[u8]) -> String {
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// Verifies `signature` over `message` with the key `spki` (DER) under JWS `alg`. ECDSA
/// signatures are r‖s, or DER when `der_ok` (what `engine sign` writes).
pub fn verify_signature(
    spki: &[u8],
    alg: &str,
    message: &[u8],
    signature: &[u8],
    der_ok: bool,
) -> bool {
    use aws_lc_rs::signature as sig;
    let (fixed, asn1): (&'static dyn sig::VerificationAlgorithm, _) = match alg {
        "ES256" => (
            &sig::ECDSA_P256_SHA256_FIXED,
            Some(&sig::ECDSA_P256_SHA256_ASN1),
        ),
        "ES384" => (
            &sig::ECDSA_P384_SHA384_FIXED,
            Some(&sig::ECDSA_P384_SHA384_ASN1),
        ),
        "RS256" => (&sig::RSA_PKCS1_2048_8192_SHA256, None),
        _ => return false,
    };
    let Ok((_, parsed)) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki) else {
        return false;
    };
    let key = parsed.subject_public_key.data.as_ref();
    let verifies = |a: &'static dyn sig::VerificationAlgorithm| {
        sig::UnparsedPublicKey::new(a, key)
            .verify(message, signature)
            .is_ok()
    };
    // Both encodings are tried when DER is allowed: an r‖s signature may begin with 0x30 too.
    verifies(fixed) || (der_ok && asn1.is_some_and(|a| verifies(a)))
}

/// One endorsement of a published document, taken apart (signature not yet verified).
struct Entry {
    state: String,
    header: Map<String, Value>,
    claims: Map<String, Value>,
    signing_input: String,
    signature: Vec<u8>,
}

fn b64_json(part: &str) -> Option<Map<String, Value>> {
    match serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

fn parse_entry(item: &Value, at: &str) -> Result<Entry, ChainError> {
    let jws = item["jws"].as_str().unwrap_or_default();
    let parts: Vec<&str> = jws.split('.').collect();
    let [h, c, s] = parts[..] else {
        return fail(at, "jws is not a compact JWS (three dot-separated parts)");
    };
    let (Some(header), Some(claims)) = (b64_json(h), b64_json(c)) else {
        return fail(at, "jws header or claims are not base64url JSON objects");
    };
    let Ok(signature) = URL_SAFE_NO_PAD.decode(s) else {
        return fail(at, "jws signature is not base64url");
    };
    Ok(Entry {
        state: item["state"].as_str().unwrap_or("UNKNOWN").to_string(),
        header,
        claims,
        signing_input: format!("{h}.{c}"),
        signature,
    })
}

fn claim_u32(m: &Map<String, Value>, name: &str) -> Option<u32> {
    m.get(name)?.as_u64().and_then(|v| u32::try_from(v).ok())
}

fn claim_str<'a>(m: &'a Map<String, Value>, name: &str) -> &'a str {
    m.get(name).and_then(Value::as_str).unwrap_or_default()
}

/// The endorsements of `key` in a published document, by the version they endorse. Each
/// entry's listed `version` must be the one its claims state, and appear once.
fn entries(doc: &Value, key: &str) -> Result<BTreeMap<u32, Entry>, ChainError> {
    let Some(list) = doc.get("endorsements").and_then(Value::as_array) else {
        return fail(
            "document",
            "no \"endorsements\" array (not an Engine JWKS with continuity proofs)",
        );
    };
    let mut out = BTreeMap::new();
    for item in list.iter().filter(|i| i["key"].as_str() == Some(key)) {
        let Some(listed) = item["version"].as_u64().and_then(|v| u32::try_from(v).ok()) else {
            return fail(
                "document",
                format!("an endorsement of key {key} has no version"),
            );
        };
        let at = format!("endorsement of v{listed}");
        let entry = parse_entry(item, &at)?;
        let stated = claim_u32(&entry.claims, "version");
        if stated != Some(listed) || claim_str(&entry.claims, "key") != key {
            return fail(
                at,
                format!(
                    "listed as {key} v{listed} but its claims state {} v{}",
                    claim_str(&entry.claims, "key"),
                    stated.map_or("?".into(), |v| v.to_string())
                ),
            );
        }
        if out.insert(listed, entry).is_some() {
            return fail(at, "listed twice");
        }
    }
    Ok(out)
}

/// One version on a verified path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Version number (0 when the pinned key's version cannot be told: no endorsement names it).
    pub version: u32,
    /// Its kid (empty when unknown, as for a pinned key nothing endorses).
    pub kid: String,
    /// Its state as published (ENABLED, DISABLED, DESTROY_SCHEDULED, DESTROYED; PINNED for
    /// the pinned key).
    pub state: String,
    /// Its JWK thumbprint (RFC 7638).
    pub thumbprint: String,
}

/// A verified chain: from the pinned key to the newest version of the key.
#[derive(Debug, Clone)]
pub struct Chain {
    /// The versions walked, the pinned one first, the reached (newest) one last.
    pub path: Vec<Step>,
    /// The reached version's public key (SubjectPublicKeyInfo DER).
    pub reached_spki: Vec<u8>,
    /// The reached version's JWS algorithm.
    pub reached_alg: &'static str,
    /// The trust domain every link names (empty when the pinned version is the newest: no
    /// link). A relying party checks it is the one it expects.
    pub trust_domain: String,
    /// The Engine every link names (empty without a link); checked like `trust_domain`.
    pub engine: String,
}

/// The endorsed versions to check, oldest first, from the pinned version (or the oldest
/// version no endorsement endorses, taken to be the pinned key's) to the newest.
fn path_back(
    map: &BTreeMap<u32, Entry>,
    pinned: Option<u32>,
) -> Result<(u32, Vec<u32>), ChainError> {
    let Some(&newest) = map.keys().next_back() else {
        return Ok((pinned.unwrap_or(0), vec![]));
    };
    let mut path = vec![];
    let mut cur = newest;
    loop {
        if Some(cur) == pinned {
            break;
        }
        let Some(e) = map.get(&cur) else {
            if let Some(p) = pinned {
                let next = path.last().copied().unwrap_or(newest);
                return fail(
                    format!("link v{cur} -> v{next}"),
                    format!(
                        "v{cur} has no endorsement: the chain from the pinned key (v{p}) does not reach v{newest}"
                    ),
                );
            }
            break;
        };
        let prev = claim_u32(&e.claims, "previous_version").unwrap_or(u32::MAX);
        if prev >= cur {
            return fail(
                format!("link v? -> v{cur}"),
                "previous_version is missing or not lower than version",
            );
        }
        path.push(cur);
        cur = prev;
    }
    path.reverse();
    Ok((cur, path))
}

/// The version whose endorsed `jwk` has thumbprint `tp`, if any.
fn endorsed_version(map: &BTreeMap<u32, Entry>, tp: &str) -> Option<u32> {
    map.iter().find_map(|(v, e)| {
        let jwk = e.claims.get("jwk")?.as_object()?;
        (thumbprint(jwk).ok()? == tp).then_some(*v)
    })
}

/// How a failing link names the key that should have signed it.
fn signer_name(prev: u32, assumed: bool, pinned: bool) -> String {
    if assumed {
        // Nothing endorses the pinned key: it was taken to be the oldest version that has no
        // endorsement.
        format!(
            "the pinned key (taken as v{prev}, the oldest version without an endorsement: either the pinned key is not v{prev}, or v{prev}'s own endorsement is missing)"
        )
    } else if pinned {
        "the pinned key".into()
    } else {
        format!("v{prev}'s key")
    }
}

/// Walks the endorsements of `key` in `doc` (an Engine JWKS with an `endorsements` array)
/// from the pinned public key `pinned_spki` to the newest version, checking every link's
/// signature with the previous version's key and its claims against the link before.
pub fn verify_chain(doc: &Value, key: &str, pinned_spki: &[u8]) -> Result<Chain, ChainError> {
    let map = entries(doc, key)?;
    let mut jwk = from_spki(pinned_spki).map_err(|e| ChainError {
        at: "pinned key".into(),
        reason: e.to_string(),
    })?;
    let pinned_tp = thumbprint(&jwk).map_err(|r| ChainError {
        at: "pinned key".into(),
        reason: r,
    })?;
    let pinned = endorsed_version(&map, &pinned_tp);
    let (root, path) = path_back(&map, pinned)?;
    let mut kid = pinned.map(|v| claim_str(&map[&v].claims, "kid").to_string());
    let mut steps = vec![Step {
        version: root,
        kid: kid.clone().unwrap_or_default(),
        state: "PINNED".into(),
        thumbprint: pinned_tp,
    }];
    let mut spki = pinned_spki.to_vec();
    let mut scope: Option<(String, String)> = None;
    let mut prev = root;
    for n in path {
        let e = &map[&n];
        let at = format!("link v{prev} -> v{n}");
        let (new_jwk, tp) = check_link(e, &at, &jwk, kid.as_deref(), &mut scope)?;
        let alg = jws_alg(&jwk).unwrap_or("");
        if !verify_signature(&spki, alg, e.signing_input.as_bytes(), &e.signature, false) {
            let signer = signer_name(prev, prev == root && pinned.is_none(), prev == root);
            return fail(at, format!("signature does not verify with {signer}"));
        }
        spki = to_spki(&Value::Object(new_jwk.clone())).map_err(|err| ChainError {
            at: at.clone(),
            reason: format!("jwk: {err}"),
        })?;
        let new_kid = claim_str(&e.claims, "kid").to_string();
        steps.push(Step {
            version: n,
            kid: new_kid.clone(),
            state: e.state.clone(),
            thumbprint: tp,
        });
        jwk = new_jwk;
        kid = Some(new_kid);
        prev = n;
    }
    let reached_alg = jws_alg(&jwk).map_err(|r| ChainError {
        at: "reached key".into(),
        reason: r,
    })?;
    let (trust_domain, engine) = scope.unwrap_or_default();
    Ok(Chain {
        path: steps,
        reached_spki: spki,
        reached_alg,
        trust_domain,
        engine,
    })
}

/// The checks of one link before its signature: header (`typ`, `alg` of the previous key,
/// `kid` = `previous_kid` = the previous version's kid), the same trust domain and Engine
/// as the links before, and the endorsed JWK with its thumbprint. Returns (JWK, thumbprint).
fn check_link(
    e: &Entry,
    at: &str,
    prev_jwk: &Map<String, Value>,
    prev_kid: Option<&str>,
    scope: &mut Option<(String, String)>,
) -> Result<(Map<String, Value>, String), ChainError> {
    if claim_str(&e.header, "typ") != TYP {
        return fail(at, format!("header typ is not {TYP}"));
    }
    let expected = jws_alg(prev_jwk).map_err(|r| ChainError {
        at: at.into(),
        reason: r,
    })?;
    let alg = claim_str(&e.header, "alg");
    if alg != expected {
        return fail(
            at,
            format!("header alg {alg:?} is not the previous key's ({expected})"),
        );
    }
    let (hkid, pkid) = (
        claim_str(&e.header, "kid"),
        claim_str(&e.claims, "previous_kid"),
    );
    if hkid != pkid || prev_kid.is_some_and(|k| k != pkid) {
        return fail(
            at,
            format!(
                "endorsed by kid {hkid:?} / previous_kid {pkid:?}, not the previous version's {prev_kid:?}"
            ),
        );
    }
    let this = (
        claim_str(&e.claims, "trust_domain").to_string(),
        claim_str(&e.claims, "engine").to_string(),
    );
    match scope {
        Some(s) if *s != this => {
            return fail(
                at,
                format!(
                    "names trust domain {} engine {}, not {} {} as the links before",
                    this.0, this.1, s.0, s.1
                ),
            );
        }
        _ => *scope = Some(this),
    }
    let Some(jwk) = e.claims.get("jwk").and_then(Value::as_object) else {
        return fail(at, "claims have no jwk object");
    };
    let tp = thumbprint(jwk).map_err(|r| ChainError {
        at: at.into(),
        reason: format!("jwk: {r}"),
    })?;
    if claim_str(&e.claims, "jwk_thumbprint") != tp {
        return fail(at, "jwk_thumbprint is not the thumbprint of jwk");
    }
    Ok((jwk.clone(), tp))
}

#[cfg(test)]
#[path = "endorsement_tests.rs"]
mod tests;
