//! JSON the server takes from a Kubernetes cluster for k8s_psat: the issuer's JWKS (a
//! `jwks_path` file or what OIDC discovery points to), the OIDC discovery document, and the API
//! server's TokenReview answer. The first input byte picks which one the rest is.
//!
//! No panic. A JWKS validates a fixed, genuinely signed token only if the key it binds to the
//! token's `kid` is the signer's; every key read from it converts to a
//! SubjectPublicKeyInfo and back stably. A TokenReview answer attests only an authenticated,
//! allowed service account with the configured audience and a usable node UID.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use continuity_attestors::k8s_psat::{self, ClusterConfig, Validation};
use continuity_common::jwk;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const NOW: i64 = 1_800_000_000;
const AUDIENCE: &str = "continuity-server";
const ALLOWED: &str = "spire:spire-agent";

/// A PSAT-shaped token signed under kid "k1" by the key in `SIGNER` (fuzz/seeds/make_seeds.py;
/// only the public key is committed), valid until 2033.
const TOKEN: &str = include_str!("../seeds/keys/psat-token");
const SIGNER: &[u8] = include_bytes!("../seeds/keys/psat-signer.spki");

struct Fixture {
    /// The signer's public key (uncompressed point).
    point: Vec<u8>,
    /// An AttestAgent payload carrying `TOKEN`.
    payload: Vec<u8>,
    /// Where each JWKS input is written (the cluster's `jwks_path`).
    jwks_path: PathBuf,
    cluster: ClusterConfig,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("continuity-fuzz-oidc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let jwks_path = dir.join("jwks.json");
        Fixture {
            point: key_bits(SIGNER).expect("the committed signer key parses"),
            payload: json!({"cluster": "c1", "token": TOKEN.trim()})
                .to_string()
                .into_bytes(),
            cluster: ClusterConfig {
                name: "c1".into(),
                service_account_allow_list: vec![ALLOWED.into()],
                audience: AUDIENCE.into(),
                issuer: Some("https://kubernetes.default.svc.cluster.local".into()),
                validation: Validation::JwksFile(jwks_path.clone()),
                labels: Default::default(),
            },
            jwks_path,
        }
    })
}

/// The public key bytes inside a SubjectPublicKeyInfo.
fn key_bits(spki: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, s) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).ok()?;
    Some(s.subject_public_key.data.to_vec())
}

fn jwks(f: &Fixture, data: &[u8]) {
    let doc = serde_json::from_slice::<Value>(data).ok();
    let keys = doc.as_ref().map(k8s_psat::jwks_keys).unwrap_or_default();
    for (_, spki) in &keys {
        // JWK → SPKI → JWK → SPKI reaches a fixed point after one trip.
        if let Ok(m) = jwk::from_spki(spki) {
            let again = jwk::to_spki(&Value::Object(m.clone())).expect("a JWK we wrote");
            let m2 = jwk::from_spki(&again).expect("an SPKI we wrote");
            assert_eq!(m, m2);
        }
    }
    std::fs::write(&f.jwks_path, data).expect("write the JWKS");
    if k8s_psat::validate(&f.payload, std::slice::from_ref(&f.cluster), NOW).is_ok() {
        let (_, spki) = keys
            .iter()
            .find(|(kid, _)| kid == "k1")
            .expect("validated without a k1 key");
        assert_eq!(
            key_bits(spki).as_deref(),
            Some(f.point.as_slice()),
            "validated with another key"
        );
    }
}

fn discovery(data: &[u8]) {
    let Ok(doc) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    // TODO(integrator): after the psat branch lands, also run its discovery-document check
    // (issuer equality) here.
    match k8s_psat::jwks_uri(&doc) {
        Ok(uri) => assert_eq!(Some(uri), doc["jwks_uri"].as_str()),
        Err(_) => assert!(!doc["jwks_uri"].is_string()),
    }
}

fn token_review(f: &Fixture, data: &[u8]) {
    let Ok(a) = k8s_psat::token_review_status(&f.cluster, data) else {
        return;
    };
    let v: Value = serde_json::from_slice(data).expect("an answer that attested is JSON");
    let st = &v["status"];
    assert_eq!(st["authenticated"], true);
    assert!(
        st["audiences"]
            .as_array()
            .expect("audiences")
            .iter()
            .any(|x| x == AUDIENCE)
    );
    assert_eq!(format!("{}:{}", a.namespace, a.service_account), ALLOWED);
    assert_eq!(
        st["user"]["username"].as_str(),
        Some(format!("system:serviceaccount:{ALLOWED}").as_str())
    );
    assert!(!a.node_uid.is_empty());
    assert!(
        a.node_uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    );
    assert_eq!(a.cluster, "c1");
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    let f = fixture();
    match mode % 3 {
        0 => jwks(f, data),
        1 => discovery(data),
        _ => token_review(f, data),
    }
});
