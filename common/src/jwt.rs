//! JWT-SVID validation (SPIFFE JWT-SVID spec): compact JWS, algorithm allow-list, `kid`
//! required, audience, expiry with a small leeway, key from the subject's trust domain bundle.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use x509_parser::prelude::FromDer;

use crate::SpiffeId;

/// Seconds of clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: i64 = 10;

/// Why a JWT-SVID is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts with JSON header and claims.
    #[error("malformed JWT-SVID: {0}")]
    Malformed(&'static str),
    /// The algorithm is not allowed.
    #[error("JWT-SVID algorithm {0:?} is not allowed")]
    Algorithm(String),
    /// No `kid` in the header.
    #[error("JWT-SVID header has no kid")]
    MissingKid,
    /// `sub` is not a SPIFFE ID.
    #[error("JWT-SVID sub is not a SPIFFE ID: {0}")]
    Subject(String),
    /// No bundle key with this kid for the subject's trust domain.
    #[error("no JWT authority {kid:?} in the bundle of {trust_domain}")]
    UnknownKey {
        /// The key id.
        kid: String,
        /// The trust domain.
        trust_domain: String,
    },
    /// The signature does not verify.
    #[error("JWT-SVID signature does not verify")]
    Signature,
    /// The audience does not contain the expected one.
    #[error("JWT-SVID audience {got:?} does not contain {want:?}")]
    Audience {
        /// Audiences in the token.
        got: Vec<String>,
        /// Expected.
        want: String,
    },
    /// Expired.
    #[error("JWT-SVID expired at {0}")]
    Expired(i64),
    /// `nbf` is still in the future.
    #[error("JWT-SVID is not valid before {0}")]
    NotYetValid(i64),
    /// `iat` is in the future.
    #[error("JWT-SVID was issued in the future ({0})")]
    IssuedInTheFuture(i64),
    /// The header's `typ` is present and neither `JWT` nor `JOSE`.
    #[error("JWT-SVID header typ {0:?} is neither JWT nor JOSE")]
    Type(String),
}

/// A validated JWT-SVID.
#[derive(Debug, Clone)]
pub struct Validated {
    /// The subject.
    pub spiffe_id: SpiffeId,
    /// All claims.
    pub claims: Map<String, Value>,
}

fn part(s: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JwtError::Malformed("bad base64url"))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(JwtError::Malformed(
            "header or claims are not a JSON object",
        )),
    }
}

/// A compact JWS taken apart and checked for shape (three parts, JSON header and claims, an
/// allowed `alg`, a `kid`), its signature not yet verified: callers check claims on it before
/// they spend anything (a key fetch) on the signature.
#[derive(Debug, Clone)]
pub struct Jws<'t> {
    /// The header's `alg` (one of the allowed algorithms).
    pub alg: String,
    /// The header's `kid`.
    pub kid: String,
    /// The claims.
    pub claims: Map<String, Value>,
    signing_input: &'t str,
    signature: Vec<u8>,
}

/// Parses a compact JWS without verifying it (see [`Jws`]).
pub fn parse_jws(token: &str) -> Result<Jws<'_>, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("a JWS has three dot-separated parts"));
    };
    let header = part(h)?;
    let claims = part(c)?;
    // The JWT-SVID spec: `typ`, when present, is `JWT` or `JOSE`.
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(other) => {
            return Err(JwtError::Type(match other {
                Value::String(t) => t.clone(),
                v => v.to_string(),
            }));
        }
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    algorithm(&alg)?;
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
        .ok_or(JwtError::MissingKid)?
        .to_string();
    let signature = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| JwtError::Malformed("bad signature encoding"))?;
    Ok(Jws {
        alg,
        kid,
        claims,
        signing_input: &token[..h.len() + 1 + c.len()],
        signature,
    })
}

impl Jws<'_> {
    /// Verifies the signature with the SubjectPublicKeyInfo DER `spki`.
    pub fn verify(&self, spki: &[u8]) -> Result<(), JwtError> {
        let verify_alg = algorithm(&self.alg)?;
        let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki)
            .map_err(|_| JwtError::Signature)?;
        aws_lc_rs::signature::UnparsedPublicKey::new(
            verify_alg,
            parsed.subject_public_key.data.as_ref(),
        )
        .verify(self.signing_input.as_bytes(), &self.signature)
        .map_err(|_| JwtError::Signature)
    }
}

/// Verifies a compact JWS signed with an allowed algorithm by the key `key(kid)` returns;
/// returns its claims. No claim is checked here.
pub fn verify_jws<'k>(
    token: &str,
    key: impl Fn(&str) -> Option<&'k [u8]>,
) -> Result<Map<String, Value>, JwtError> {
    let jws = parse_jws(token)?;
    let spki = key(&jws.kid).ok_or_else(|| JwtError::UnknownKey {
        kid: jws.kid.clone(),
        trust_domain: String::new(),
    })?;
    jws.verify(spki)?;
    Ok(jws.claims)
}

fn algorithm(
    alg: &str,
) -> Result<&'static dyn aws_lc_rs::signature::VerificationAlgorithm, JwtError> {
    Ok(match alg {
        "ES256" => &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        "ES384" => &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED,
        "RS256" => &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        "RS384" => &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA384,
        "RS512" => &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA512,
        "PS256" => &aws_lc_rs::signature::RSA_PSS_2048_8192_SHA256,
        "PS384" => &aws_lc_rs::signature::RSA_PSS_2048_8192_SHA384,
        "PS512" => &aws_lc_rs::signature::RSA_PSS_2048_8192_SHA512,
        _ => return Err(JwtError::Algorithm(alg.to_string())),
    })
}

/// The audiences of a claim set (`aud` as a string or an array).
pub fn audiences(claims: &Map<String, Value>) -> Vec<String> {
    match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => vec![],
    }
}

/// Validates `token` for `audience` at `now`; `key` finds SubjectPublicKeyInfo DER by
/// (trust domain, kid).
pub fn validate<'k>(
    token: &str,
    audience: &str,
    now: i64,
    key: impl Fn(&str, &str) -> Option<&'k [u8]>,
) -> Result<Validated, JwtError> {
    // The subject names the trust domain whose bundle holds the key: read it, then verify.
    let claims_part = token.split('.').nth(1).ok_or(JwtError::Malformed(
        "a JWT-SVID has three dot-separated parts",
    ))?;
    let sub = part(claims_part)?
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let spiffe_id = SpiffeId::new(&sub).map_err(|e| JwtError::Subject(e.to_string()))?;
    let td = spiffe_id.trust_domain();
    let claims = verify_jws(token, |kid| key(td.name(), kid)).map_err(|e| match e {
        JwtError::UnknownKey { kid, .. } => JwtError::UnknownKey {
            kid,
            trust_domain: td.to_string(),
        },
        other => other,
    })?;
    let aud = audiences(&claims);
    if !aud.iter().any(|a| a == audience) {
        return Err(JwtError::Audience {
            got: aud,
            want: audience.to_string(),
        });
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or(JwtError::Malformed("no exp claim"))?;
    // `exp` is the token's: saturate rather than overflow on i64::MAX.
    if exp.saturating_add(LEEWAY_SECS) < now {
        return Err(JwtError::Expired(exp));
    }
    check_not_in_future(&claims, now)?;
    Ok(Validated { spiffe_id, claims })
}

/// `nbf` and `iat`, when present, must be numbers no later than `now` (with the leeway).
fn check_not_in_future(claims: &Map<String, Value>, now: i64) -> Result<(), JwtError> {
    let time = |name: &'static str| -> Result<Option<i64>, JwtError> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
                .map(Some)
                .ok_or(JwtError::Malformed("nbf and iat must be numbers")),
        }
    };
    let latest = now.saturating_add(LEEWAY_SECS);
    if let Some(nbf) = time("nbf")?
        && nbf > latest
    {
        return Err(JwtError::NotYetValid(nbf));
    }
    if let Some(iat) = time("iat")?
        && iat > latest
    {
        return Err(JwtError::IssuedInTheFuture(iat));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    /// A P-256 key, its SubjectPublicKeyInfo, and an ES256 token over `claims`.
    fn signed(claims: &Value) -> (Vec<u8>, String) {
        signed_with(br#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#, claims)
    }

    /// As [`signed`], with the given JOSE header.
    fn signed_with(header: &[u8], claims: &Value) -> (Vec<u8>, String) {
        let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        // SPKI = SEQUENCE { SEQUENCE { ecPublicKey, prime256v1 }, BIT STRING point }.
        let mut spki = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        spki.extend_from_slice(kp.public_key().as_ref());
        let header = URL_SAFE_NO_PAD.encode(header);
        let body = URL_SAFE_NO_PAD.encode(claims.to_string());
        let input = format!("{header}.{body}");
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = kp.sign(&rng, input.as_bytes()).unwrap();
        (
            spki,
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())),
        )
    }

    #[test]
    fn an_exp_at_i64_max_does_not_overflow() {
        let (spki, token) = signed(&serde_json::json!({
            "sub": "spiffe://example.org/w", "aud": "a", "exp": i64::MAX,
        }));
        let v = validate(&token, "a", 1_700_000_000, |_, _| Some(spki.as_slice())).unwrap();
        assert_eq!(v.spiffe_id.as_str(), "spiffe://example.org/w");
        // And the other end: a token that expired at i64::MIN is expired, not a panic.
        let (spki, token) = signed(&serde_json::json!({
            "sub": "spiffe://example.org/w", "aud": "a", "exp": i64::MIN,
        }));
        assert_eq!(
            validate(&token, "a", 1_700_000_000, |_, _| Some(spki.as_slice())).unwrap_err(),
            JwtError::Expired(i64::MIN)
        );
    }

    #[test]
    fn a_token_signed_by_another_key_is_refused() {
        let claims = serde_json::json!({"sub": "spiffe://example.org/w", "aud": "a", "exp": 2_000_000_000i64});
        let (_, token) = signed(&claims);
        let (other, _) = signed(&claims);
        assert_eq!(
            validate(&token, "a", 1_700_000_000, |_, _| Some(other.as_slice())).unwrap_err(),
            JwtError::Signature
        );
    }

    const NOW: i64 = 1_700_000_000;

    fn check(header: &[u8], claims: &Value) -> Result<Validated, JwtError> {
        let (spki, token) = signed_with(header, claims);
        validate(&token, "a", NOW, |_, _| Some(spki.as_slice()))
    }

    #[test]
    fn typ_is_optional_and_only_jwt_or_jose_when_present() {
        let claims =
            serde_json::json!({"sub": "spiffe://example.org/w", "aud": "a", "exp": NOW + 60});
        check(br#"{"alg":"ES256","kid":"k1"}"#, &claims).unwrap();
        check(br#"{"alg":"ES256","kid":"k1","typ":"JOSE"}"#, &claims).unwrap();
        check(br#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#, &claims).unwrap();
        for bad in [
            &br#"{"alg":"ES256","kid":"k1","typ":"at+jwt"}"#[..],
            br#"{"alg":"ES256","kid":"k1","typ":"jwt"}"#,
            br#"{"alg":"ES256","kid":"k1","typ":7}"#,
        ] {
            assert!(
                matches!(check(bad, &claims), Err(JwtError::Type(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn nbf_and_iat_in_the_future_are_refused_beyond_the_leeway() {
        let h = br#"{"alg":"ES256","kid":"k1"}"#;
        let with = |k: &str, v: Value| {
            let mut c =
                serde_json::json!({"sub": "spiffe://example.org/w", "aud": "a", "exp": NOW + 600});
            c[k] = v;
            c
        };
        check(h, &with("nbf", (NOW + LEEWAY_SECS).into())).unwrap();
        check(h, &with("iat", (NOW - 5).into())).unwrap();
        assert_eq!(
            check(h, &with("nbf", (NOW + 120).into())).unwrap_err(),
            JwtError::NotYetValid(NOW + 120)
        );
        assert_eq!(
            check(h, &with("iat", (NOW + 120).into())).unwrap_err(),
            JwtError::IssuedInTheFuture(NOW + 120)
        );
        assert!(matches!(
            check(h, &with("nbf", "soon".into())).unwrap_err(),
            JwtError::Malformed(_)
        ));
    }

    #[test]
    fn aud_may_be_a_single_string_or_an_array() {
        let h = br#"{"alg":"ES256","kid":"k1"}"#;
        let one = serde_json::json!({"sub": "spiffe://example.org/w", "aud": "a", "exp": NOW + 60});
        let many = serde_json::json!({"sub": "spiffe://example.org/w", "aud": ["b", "a"], "exp": NOW + 60});
        check(h, &one).unwrap();
        check(h, &many).unwrap();
        let other =
            serde_json::json!({"sub": "spiffe://example.org/w", "aud": "b", "exp": NOW + 60});
        assert!(matches!(
            check(h, &other).unwrap_err(),
            JwtError::Audience { .. }
        ));
    }
}
