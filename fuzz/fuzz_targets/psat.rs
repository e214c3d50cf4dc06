//! k8s_psat attestation payloads as hostile agents send them, validated offline against a fixed
//! JWKS file (no network: only `jwks_path` clusters are configured).
//!
//! The first input byte picks the mode:
//! - 0: the rest is the whole AttestAgent payload (`{"cluster", "token"}` JSON, or junk).
//! - 1: the rest is `<JOSE header>\n<claims>`: the harness signs it with the cluster's key
//!   (ES256, made at start; only its public half is in the JWKS), so the fuzzer reaches every
//!   claim check, not only the signature check.
//!
//! No panic; a token that validates was signed by the key under its `kid` (the same token is
//! refused by a cluster whose JWKS binds that kid to another key), and what it attests is what
//! its claims say: an allowed service account, the configured audience, an unexpired `exp`, a
//! node UID usable in a SPIFFE ID.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use continuity_attestors::k8s_psat::{self, Attested, ClusterConfig, Validation};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

/// What `exp`, `nbf` and `iat` are checked against.
const NOW: i64 = 1_800_000_000;
const AUDIENCE: &str = "continuity-server";
const ALLOWED: &str = "spire:spire-agent";

struct Fixture {
    key: EcdsaKeyPair,
    right: ClusterConfig,
    wrong: ClusterConfig,
}

fn ec_jwk(kp: &EcdsaKeyPair, kid: &str) -> Value {
    let point = kp.public_key().as_ref();
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])})
}

fn cluster(jwks: PathBuf) -> ClusterConfig {
    ClusterConfig {
        name: "c1".into(),
        service_account_allow_list: vec![ALLOWED.into(), "kube-system:agent".into()],
        audience: AUDIENCE.into(),
        issuer: Some("https://kubernetes.default.svc.cluster.local".into()),
        validation: Validation::JwksFile(jwks),
        labels: Default::default(),
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("a key");
        let other = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("a key");
        let dir = std::env::temp_dir().join(format!("continuity-fuzz-psat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let right = dir.join("jwks.json");
        let wrong = dir.join("jwks-other.json");
        // The real key under "k1" beside an unrelated RSA-shaped key; the other JWKS binds
        // "k1" to another key.
        let jwks = json!({"keys": [ec_jwk(&key, "k1"), {"kty": "RSA", "kid": "r1", "n": "AQAB", "e": "AQAB"}]});
        std::fs::write(&right, jwks.to_string()).expect("write the JWKS");
        let jwks = json!({"keys": [ec_jwk(&other, "k1")]});
        std::fs::write(&wrong, jwks.to_string()).expect("write the JWKS");
        Fixture {
            key,
            right: cluster(right),
            wrong: cluster(wrong),
        }
    })
}

/// The claims of a compact JWS, if its middle part decodes to a JSON object.
fn claims_of(token: &str) -> Option<serde_json::Map<String, Value>> {
    let c = token.split('.').nth(1)?;
    match serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).ok()?).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

fn check_attested(a: &Attested, token: &str) {
    assert_eq!(a.cluster, "c1");
    let who = format!("{}:{}", a.namespace, a.service_account);
    assert!(
        fixture().right.service_account_allow_list.contains(&who),
        "{who} attested"
    );
    assert!(!a.node_uid.is_empty());
    assert!(
        a.node_uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    );
    let claims = claims_of(token).expect("a token that validated has JSON claims");
    assert!(continuity_common::jwt::audiences(&claims).contains(&AUDIENCE.to_string()));
    let exp = claims["exp"].as_i64().expect("an exp");
    assert!(exp.saturating_add(continuity_common::jwt::LEEWAY_SECS) >= NOW);
    let k = &claims["kubernetes.io"];
    assert_eq!(k["namespace"].as_str(), Some(a.namespace.as_str()));
    assert_eq!(
        k["serviceaccount"]["name"].as_str(),
        Some(a.service_account.as_str())
    );
    assert_eq!(k["node"]["uid"].as_str(), Some(a.node_uid.as_str()));
    assert!(a.agent_path().starts_with("/continuity/agent/k8s_psat/c1/"));
    // Same token, same kid, another key: refused.
    let payload = json!({"cluster": "c1", "token": token}).to_string();
    assert!(
        k8s_psat::validate(
            payload.as_bytes(),
            std::slice::from_ref(&fixture().wrong),
            NOW
        )
        .is_err(),
        "validated against the wrong key"
    );
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    let f = fixture();
    let clusters = std::slice::from_ref(&f.right);
    match mode % 2 {
        0 => {
            if let Ok(a) = k8s_psat::validate(data, clusters, NOW) {
                // Read as the attestor reads it (serde also takes a struct as a JSON array).
                let p: k8s_psat::Payload = serde_json::from_slice(data).expect("a payload");
                check_attested(&a, &p.token);
            }
        }
        _ => {
            let (header, claims) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], &data[i + 1..]),
                None => (&br#"{"alg":"ES256","kid":"k1"}"#[..], data),
            };
            let input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode(claims)
            );
            let sig = f
                .key
                .sign(&SystemRandom::new(), input.as_bytes())
                .expect("signing");
            let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
            let payload = json!({"cluster": "c1", "token": token}).to_string();
            if let Ok(a) = k8s_psat::validate(payload.as_bytes(), clusters, NOW) {
                let h: Value = serde_json::from_slice(header).expect("a JSON header");
                assert_eq!(h["alg"], "ES256");
                assert_eq!(h["kid"], "k1");
                check_attested(&a, &token);
            }
        }
    }
});
