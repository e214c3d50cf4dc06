//! The checks made on a projected service-account token before any key is looked up: shape
//! (size, compact JWS, allowed `alg`, a `kid`), `iss`, `aud`, `exp`/`nbf`/`iat` and the
//! `kubernetes.io` claims. Anything refused here costs no file read and no fetch.

use continuity_common::jwt::{self, Jws};
use serde_json::{Map, Value};

use super::{Attested, ClusterConfig, PsatError, check_shape};

/// Longest token accepted (projected tokens are about 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Longest `kid` accepted.
pub const MAX_KID_BYTES: usize = 256;
/// Seconds of clock skew tolerated on `exp`, `nbf` and `iat`.
pub const CLOCK_SKEW_SECS: i64 = 60;

/// Parses `token` and checks its claims for `cfg` at `now` (unix seconds), requiring `iss` to be
/// `issuer` when given. Returns the JWS, still to be verified, and what it says.
pub fn check<'t>(
    token: &'t str,
    cfg: &ClusterConfig,
    issuer: Option<&str>,
    now: i64,
) -> Result<(Jws<'t>, Attested), PsatError> {
    let bad = |m: String| PsatError::Token(m);
    if token.len() > MAX_TOKEN_BYTES {
        return Err(bad(format!(
            "token is {} bytes, more than {MAX_TOKEN_BYTES}",
            token.len()
        )));
    }
    let jws = jwt::parse_jws(token).map_err(|e| bad(format!("not a signed JWT: {e}")))?;
    if jws.kid.len() > MAX_KID_BYTES {
        return Err(bad(format!("kid is longer than {MAX_KID_BYTES} bytes")));
    }
    let c = &jws.claims;
    let iss = c
        .get("iss")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("no iss claim".into()))?;
    if let Some(want) = issuer
        && iss != want
    {
        return Err(bad(format!("issuer {iss:?} is not {want:?}")));
    }
    let aud = jwt::audiences(c);
    if !aud.contains(&cfg.audience) {
        return Err(bad(format!(
            "audience {aud:?} does not include {:?}",
            cfg.audience
        )));
    }
    check_times(c, now)?;
    let a = attested(cfg, c);
    check_shape(&a)?;
    Ok((jws, a))
}

/// `exp` (required), `iat` (required) and `nbf` (when present), with [`CLOCK_SKEW_SECS`].
pub fn check_times(c: &Map<String, Value>, now: i64) -> Result<(), PsatError> {
    let time = |name: &str| match c.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| PsatError::Token(format!("{name} is not a number of seconds: {v}"))),
    };
    // All three are the token's: saturate rather than overflow at the ends of i64.
    let exp = time("exp")?.ok_or_else(|| PsatError::Token("no exp claim".into()))?;
    if exp.saturating_add(CLOCK_SKEW_SECS) < now {
        return Err(PsatError::Token(format!("token expired at {exp}")));
    }
    let iat = time("iat")?.ok_or_else(|| PsatError::Token("no iat claim".into()))?;
    if iat.saturating_sub(CLOCK_SKEW_SECS) > now {
        return Err(PsatError::Token(format!(
            "token issued in the future (iat {iat}, now {now})"
        )));
    }
    if let Some(nbf) = time("nbf")?
        && nbf.saturating_sub(CLOCK_SKEW_SECS) > now
    {
        return Err(PsatError::Token(format!(
            "token not valid before {nbf} (now {now})"
        )));
    }
    Ok(())
}

fn attested(cfg: &ClusterConfig, c: &Map<String, Value>) -> Attested {
    let k = c.get("kubernetes.io").unwrap_or(&Value::Null);
    let str_at = |path: &[&str]| {
        path.iter()
            .fold(k, |v, p| &v[*p])
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    Attested {
        cluster: cfg.name.clone(),
        namespace: str_at(&["namespace"]),
        service_account: str_at(&["serviceaccount", "name"]),
        pod_name: str_at(&["pod", "name"]),
        pod_uid: str_at(&["pod", "uid"]),
        node_name: str_at(&["node", "name"]),
        node_uid: str_at(&["node", "uid"]),
        node_labels: Vec::new(),
        pod_labels: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000;

    fn times(v: Value) -> Result<(), PsatError> {
        check_times(v.as_object().unwrap(), NOW)
    }

    #[test]
    fn exp_iat_and_nbf_are_checked_with_a_small_skew() {
        times(serde_json::json!({"exp": NOW + 600, "iat": NOW - 10, "nbf": NOW - 10})).unwrap();
        // Within the skew either way.
        times(serde_json::json!({"exp": NOW - 30, "iat": NOW + 30, "nbf": NOW + 30})).unwrap();
        // nbf is optional, exp and iat are not.
        times(serde_json::json!({"exp": NOW + 600, "iat": NOW})).unwrap();
        for (claims, needle) in [
            (
                serde_json::json!({"exp": NOW - 61, "iat": NOW - 3600}),
                "expired",
            ),
            (
                serde_json::json!({"exp": NOW + 600, "iat": NOW + 61}),
                "issued in the future",
            ),
            (
                serde_json::json!({"exp": NOW + 600, "iat": NOW, "nbf": NOW + 61}),
                "not valid before",
            ),
            (serde_json::json!({"iat": NOW}), "no exp"),
            (serde_json::json!({"exp": NOW + 600}), "no iat"),
            (
                serde_json::json!({"exp": "soon", "iat": NOW}),
                "not a number",
            ),
            (
                serde_json::json!({"exp": NOW + 600, "iat": NOW, "nbf": 1.5}),
                "not a number",
            ),
            (
                serde_json::json!({"exp": i64::MIN, "iat": i64::MIN}),
                "expired",
            ),
            (
                serde_json::json!({"exp": i64::MAX, "iat": i64::MAX}),
                "issued in the future",
            ),
        ] {
            let e = times(claims.clone()).unwrap_err().to_string();
            assert!(e.contains(needle), "{claims}: {e}");
        }
    }
}
