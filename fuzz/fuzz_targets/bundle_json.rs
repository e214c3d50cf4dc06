//! The SPIFFE bundle document (`bundle show --format spiffe`, and the JWKS the Workload API's JWT
//! bundles carry), built from what the server holds and read back as a relying party reads it.
//! Neither the server nor the agent parses a bundle document from a peer today (bundles travel
//! as protobuf); the JSON they emit is made by `continuity_common::jwk` from CA certificates and
//! JWT keys out of the datastore, so the harness feeds those and reads the result back.
//!
//! The first input byte picks the mode:
//! - 0: a `GetBundle` answer (protobuf, what `bundle show` receives) through the CLI's
//!   conversion; whatever document comes out has one key per authority, in order, each with
//!   `use`, the x509-svid ones carrying their certificate in `x5c`, the jwt-svid ones their `kid`,
//!   and every key reading back to the same JWK members.
//! - 1: a bundle document or JWKS from elsewhere (JSON): every key through the JWK parser, with
//!   JWK → SPKI → JWK stable after one trip, and `x5c` certificates parsed.
//!
//! No panic in either.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use continuity_common::jwk;
use continuity_proto::types::Bundle;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use serde_json::{Map, Value};

/// The JWK members that describe the key itself.
fn key_members(m: &Map<String, Value>) -> Vec<(String, Value)> {
    ["kty", "crv", "x", "y", "n", "e"]
        .iter()
        .filter_map(|k| m.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect()
}

/// JWK → SPKI → JWK → SPKI: the second trip changes nothing.
fn stable(key: &Value) {
    let Ok(spki) = jwk::to_spki(key) else {
        return;
    };
    let Ok(m) = jwk::from_spki(&spki) else {
        return;
    };
    let again = jwk::to_spki(&Value::Object(m.clone())).expect("a JWK from_spki wrote");
    let m2 = jwk::from_spki(&again).expect("an SPKI to_spki wrote from a parsed key");
    assert_eq!(key_members(&m), key_members(&m2));
}

fn from_proto(data: &[u8]) {
    let Ok(b) = Bundle::decode(data) else {
        return;
    };
    // As server/src/cli.rs does for `bundle show --format spiffe`.
    let jwt: Vec<_> = b
        .jwt_authorities
        .iter()
        .map(|k| jwk::JwtAuthority {
            key_id: &k.key_id,
            public_key: &k.public_key,
        })
        .collect();
    let Ok(doc) = jwk::spiffe_bundle(&b.x509_authorities, &jwt, b.sequence_number, b.refresh_hint)
    else {
        return;
    };
    let text = serde_json::to_string_pretty(&doc).expect("a document prints");
    let doc: Value = serde_json::from_str(&text).expect("the printed document reads back");
    assert_eq!(doc["spiffe_sequence"], b.sequence_number);
    assert_eq!(doc["spiffe_refresh_hint"], b.refresh_hint);
    let keys = doc["keys"].as_array().expect("keys");
    assert_eq!(
        keys.len(),
        b.x509_authorities.len() + b.jwt_authorities.len()
    );
    let (x509, jwts) = keys.split_at(b.x509_authorities.len());
    for (key, cert) in x509.iter().zip(&b.x509_authorities) {
        assert_eq!(key["use"], "x509-svid");
        let x5c = key["x5c"].as_array().expect("x5c");
        assert_eq!(x5c.len(), 1);
        let der = STANDARD
            .decode(x5c[0].as_str().expect("x5c[0]"))
            .expect("base64");
        assert_eq!(&der, cert);
        let (_, parsed) = x509_parser::parse_x509_certificate(cert).expect("it was parsed");
        let from_cert =
            jwk::from_spki(parsed.tbs_certificate.subject_pki.raw).expect("it was converted");
        let members = key.as_object().expect("a JWK is an object");
        assert_eq!(key_members(&from_cert), key_members(members));
        stable(key);
    }
    for (key, a) in jwts.iter().zip(&b.jwt_authorities) {
        assert_eq!(key["use"], "jwt-svid");
        assert_eq!(key["kid"].as_str(), Some(a.key_id.as_str()));
        let from_key = jwk::from_spki(&a.public_key).expect("it was converted");
        assert_eq!(
            key_members(&from_key),
            key_members(key.as_object().expect("an object"))
        );
        stable(key);
    }
}

fn from_json(data: &[u8]) {
    let Ok(doc) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    for key in doc["keys"].as_array().into_iter().flatten() {
        stable(key);
        // A certificate in x5c, as a relying party reads it (the JWK may disagree: it is
        // the document's word, not ours).
        if let Some(first) = key["x5c"][0].as_str()
            && let Ok(der) = STANDARD.decode(first)
            && let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der)
        {
            let _ = jwk::from_spki(cert.tbs_certificate.subject_pki.raw);
        }
    }
    let _ = jwk::to_spki(&doc);
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    match mode % 2 {
        0 => from_proto(data),
        _ => from_json(data),
    }
});
