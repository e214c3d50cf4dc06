//! JWT-SVIDs as workloads hand them to ValidateJWTSVID, validated against a fixed bundle.
//!
//! The bundle holds one EC (P-256) and one RSA key for `example.org`, under the kids the seed
//! tokens use (fuzz/seeds/make_seeds.py signs them; only the public keys are committed). A
//! second bundle has the same kids bound to other keys. A token must never validate against
//! both, nor for a trust domain other than the one whose keys were consulted. JWK and ECDSA
//! signature-form conversions get the same input when it looks like theirs.
#![no_main]

use std::cell::RefCell;

use continuity_common::{der, jwk, jwt};
use libfuzzer_sys::fuzz_target;

/// What the seed tokens' `exp` is checked against (before their exp of 2_000_000_000).
const NOW: i64 = 1_800_000_000;
const AUDIENCE: &str = "spiffe://example.org/fuzz-audience";

const EC: &[u8] = include_bytes!("../seeds/keys/ec1.spki");
const RSA: &[u8] = include_bytes!("../seeds/keys/rsa1.spki");
const EC_OTHER: &[u8] = include_bytes!("../seeds/keys/ec-other.spki");
const RSA_OTHER: &[u8] = include_bytes!("../seeds/keys/rsa-other.spki");

fn bundle(right: bool) -> impl Fn(&str, &str) -> Option<&'static [u8]> {
    move |td, kid| match (td, kid, right) {
        ("example.org", "ec1", true) => Some(EC),
        ("example.org", "rsa1", true) => Some(RSA),
        ("example.org", "ec1", false) => Some(EC_OTHER),
        ("example.org", "rsa1", false) => Some(RSA_OTHER),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let token = String::from_utf8_lossy(data);
    let asked = RefCell::new(Vec::new());
    let right = bundle(true);
    let result = jwt::validate(&token, AUDIENCE, NOW, |td, kid| {
        asked.borrow_mut().push(td.to_string());
        right(td, kid)
    });
    if let Ok(v) = &result {
        let td = v.spiffe_id.trust_domain();
        assert_eq!(td.name(), "example.org");
        assert_eq!(*asked.borrow(), vec!["example.org".to_string()]);
        assert!(jwt::audiences(&v.claims).iter().any(|a| a == AUDIENCE));
        let wrong = jwt::validate(&token, AUDIENCE, NOW, bundle(false));
        assert!(wrong.is_err(), "validated with the right and the wrong key");
    }
    // The signature check alone, without the SPIFFE rules.
    let by_kid = |right: bool| {
        let b = bundle(right);
        move |kid: &str| b("example.org", kid)
    };
    if jwt::verify_jws(&token, by_kid(true)).is_ok() {
        assert!(jwt::verify_jws(&token, by_kid(false)).is_err());
    }

    // A JWKS document (what jwks_path / OIDC discovery / Engines serve).
    if let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) {
        for key in doc["keys"].as_array().into_iter().flatten() {
            if let Ok(spki) = jwk::to_spki(key) {
                let _ = jwk::from_spki(&spki);
            }
        }
        let _ = jwk::to_spki(&doc);
    }
    // ECDSA signature forms: DER → fixed → DER → fixed is stable.
    for width in [32, 48] {
        if let Ok(fixed) = der::ecdsa_der_to_fixed(data, width) {
            assert_eq!(fixed.len(), 2 * width);
            let again = der::ecdsa_fixed_to_der(&fixed).expect("even, non-empty");
            assert_eq!(der::ecdsa_der_to_fixed(&again, width).as_ref(), Ok(&fixed));
        }
    }
    let _ = jwk::from_spki(data);
});
