use super::*;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

/// base64url without padding (attestors has no base64 dependency of its own).
fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

const NOW: i64 = 1_700_000_000;

fn signed(kp: &EcdsaKeyPair, header: &str, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        b64url(header.as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let sig = kp.sign(&rng, input.as_bytes()).unwrap();
    format!("{input}.{}", b64url(sig.as_ref()))
}

fn good_claims() -> Value {
    serde_json::json!({"iss": "https://k", "aud": ["continuity-server"], "exp": NOW + 600,
            "iat": NOW - 60, "nbf": NOW - 60,
            "kubernetes.io": {"namespace": "spire", "serviceaccount": {"name": "agent"},
            "pod": {"name": "p", "uid": "u"}, "node": {"name": "n",
            "uid": "0b3c2a44-59d0-4c3b-8c6f-5f0c8d1a2e3f"}}})
}

fn cluster(path: PathBuf) -> ClusterConfig {
    ClusterConfig {
        name: "c".into(),
        service_account_allow_list: vec!["spire:agent".into()],
        audience: DEFAULT_AUDIENCE.into(),
        issuer: Some("https://k".into()),
        validation: Validation::JwksFile(path),
        labels: LabelLookup::default(),
    }
}

fn payload(token: &str) -> Vec<u8> {
    serde_json::to_vec(&Payload {
        cluster: "c".into(),
        token: token.into(),
    })
    .unwrap()
}

#[test]
fn a_psat_whose_exp_is_i64_max_does_not_overflow() {
    let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let point = kp.public_key().as_ref();
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k",
            "x": b64url(&point[1..33]), "y": b64url(&point[33..])}]});
    let path = std::env::temp_dir().join(format!("psat-jwks-{}.json", std::process::id()));
    std::fs::write(&path, jwks.to_string()).unwrap();
    let mut claims = good_claims();
    claims["exp"] = i64::MAX.into();
    let token = signed(&kp, r#"{"alg":"ES256","kid":"k"}"#, &claims);
    let r = validate(&payload(&token), &[cluster(path.clone())], NOW);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(r.unwrap().service_account, "agent");
}

/// Tokens (with what the refusal names) that are not a usable signed JWT: too long, not three
/// parts, no or a wrong algorithm, a missing, empty or overlong kid.
fn malformed_tokens(kp: &EcdsaKeyPair) -> Vec<(String, &'static str)> {
    vec![
        ("x".repeat(MAX_TOKEN_BYTES + 1), "more than"),
        ("not a token".into(), "three dot-separated parts"),
        ("a.b.c".into(), "not a signed JWT"),
        (
            signed(kp, r#"{"alg":"none","kid":"k"}"#, &good_claims()),
            "algorithm",
        ),
        (
            signed(kp, r#"{"alg":"HS256","kid":"k"}"#, &good_claims()),
            "algorithm",
        ),
        (signed(kp, r#"{"alg":"ES256"}"#, &good_claims()), "kid"),
        (
            signed(kp, r#"{"alg":"ES256","kid":""}"#, &good_claims()),
            "kid",
        ),
        (
            signed(
                kp,
                &format!(r#"{{"alg":"ES256","kid":"{}"}}"#, "k".repeat(300)),
                &good_claims(),
            ),
            "kid is longer",
        ),
    ]
}

/// Signed tokens (with what the refusal names) whose claims are wrong: issuer, audience,
/// times, node binding, shape.
fn tokens_with_bad_claims(kp: &EcdsaKeyPair) -> Vec<(String, &'static str)> {
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = good_claims();
        f(&mut c);
        signed(kp, r#"{"alg":"ES256","kid":"k"}"#, &c)
    };
    vec![
        (with(&|c| c["iss"] = "https://evil".into()), "issuer"),
        (
            with(&|c| {
                c.as_object_mut().unwrap().remove("iss");
            }),
            "no iss",
        ),
        (with(&|c| c["aud"] = "api".into()), "audience"),
        (with(&|c| c["exp"] = (NOW - 3600).into()), "expired"),
        (
            with(&|c| c["nbf"] = (NOW + 3600).into()),
            "not valid before",
        ),
        (
            with(&|c| c["iat"] = (NOW + 3600).into()),
            "issued in the future",
        ),
        (
            with(&|c| c["kubernetes.io"]["node"] = Value::Null),
            "not bound to a node",
        ),
        (
            with(&|c| c["kubernetes.io"]["node"]["uid"] = "../x".into()),
            "not bound to a node",
        ),
        (
            with(&|c| c["kubernetes.io"] = "x".into()),
            "not a service-account token",
        ),
    ]
}

/// Each of these is refused from its shape and claims alone: the JWKS file does not exist,
/// so reaching it would be a Validator error instead of a Token one.
#[test]
fn junk_is_refused_before_any_key_is_looked_up() {
    let cfg = cluster("/nonexistent/jwks.json".into());
    let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let es = r#"{"alg":"ES256","kid":"k"}"#;
    let mut cases = malformed_tokens(&kp);
    cases.extend(tokens_with_bad_claims(&kp));
    for (token, needle) in cases {
        let e = validate(&payload(&token), std::slice::from_ref(&cfg), NOW).unwrap_err();
        assert!(matches!(e, PsatError::Token(_)), "{needle}: {e}");
        assert!(e.to_string().contains(needle), "{needle:?} in {e}");
    }
    let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
    let e = validate(&big, std::slice::from_ref(&cfg), NOW).unwrap_err();
    assert!(matches!(e, PsatError::Payload(_)), "{e}");
    // A well-formed token does reach the keys.
    let e = validate(&payload(&signed(&kp, es, &good_claims())), &[cfg], NOW).unwrap_err();
    assert!(matches!(e, PsatError::Validator(_)), "{e}");
}
