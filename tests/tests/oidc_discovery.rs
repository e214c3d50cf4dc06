//! The OIDC discovery provider (`[oidc_discovery]`) of a real server, with PyJWT as the
//! relying party: it is given only the issuer URL, reads the discovery document, follows its
//! `jwks_uri` and validates JWT-SVIDs minted through a real agent, before and after a JWT key
//! rotation; a token signed by another key is refused.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use continuity_tests::agent::TestAgent;
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::{free_port, http_get, uid};
use serde_json::Value;

const ALIAS: &str = "spiffe://example.org/node/oidc";
const WORKLOAD: &str = "spiffe://example.org/oidc-workload";
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/py/oidc_relying_party.py");

/// Polls `f` until it returns Some, for at most `limit`; panics naming `what`.
fn within<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the PyJWT helper with `args`; its JSON line.
fn python(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(SCRIPT)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "PyJWT helper failed (is PyPI `pyjwt` + `cryptography` installed? scripts/setup does it):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// What PyJWT concluded about `token` for `audience`, knowing only `issuer`.
fn relying_party(issuer: &str, audience: &str, token: &str) -> Value {
    serde_json::from_str(&python(&[issuer, audience, token])).unwrap()
}

/// A JWT-SVID for `audience` from the agent's Workload API (`api fetch jwt`).
fn fetch_jwt(agent: &TestAgent, audience: &str) -> Option<String> {
    let out = agent.cli(&[
        "api",
        "fetch",
        "jwt",
        "--audience",
        audience,
        "--output",
        "json",
    ]);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    Some(v["svids"][0]["svid"].as_str().unwrap().to_string())
}

/// The `kid` in a JWT's header.
fn kid(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let v: Value = serde_json::from_slice(&header).unwrap();
    v["kid"].as_str().unwrap().to_string()
}

/// The JWKS at `/keys`, parsed.
fn keys(port: u16) -> Vec<Value> {
    let (status, body) = http_get(port, "/keys");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["keys"].as_array().unwrap().clone()
}

#[test]
fn pyjwt_validates_jwt_svids_from_the_discovery_document_across_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let issuer = format!("http://127.0.0.1:{port}");
    let server = TestServer::start(
        &dir.path().join("server"),
        ServerOptions {
            extra_toml: format!(
                "jwt_issuer = \"{issuer}\"\ndefault_jwt_svid_ttl = \"20s\"\n[oidc_discovery]\nbind_address = \"127.0.0.1:{port}\"\n"
            ),
            // The next JWT key is prepared (published) 30 s after start, then activated.
            ca_ttl: "1m".into(),
            x509_ttl: "20s".into(),
            ..ServerOptions::default()
        },
    );
    let token = server.token(Some(ALIAS));
    let agent = TestAgent::start(&dir.path().join("agent"), &server, &token);
    server.create_entry(WORKLOAD, ALIAS, &[&format!("unix:uid:{}", uid())]);

    // The document, as SPIRE's oidc-discovery-provider serves it.
    let (status, body) = http_get(port, "/.well-known/openid-configuration");
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["issuer"], issuer.as_str());
    assert_eq!(doc["jwks_uri"], format!("{issuer}/keys").as_str());
    assert_eq!(
        doc["response_types_supported"],
        serde_json::json!(["id_token"])
    );
    assert!(doc["subject_types_supported"].is_array(), "{doc}");
    let algs = doc["id_token_signing_alg_values_supported"]
        .as_array()
        .unwrap();
    assert!(algs.contains(&"ES256".into()), "{doc}");
    assert_eq!(http_get(port, "/nope").0, 404);

    // Every published key says what it is for.
    let first_keys = keys(port);
    assert_eq!(first_keys.len(), 1, "{first_keys:?}");
    for k in &first_keys {
        assert_eq!(k["use"], "sig", "{k}");
        assert_eq!(k["alg"], "ES256", "{k}");
        assert_eq!(k["kty"], "EC", "{k}");
        assert!(k["kid"].as_str().is_some_and(|s| !s.is_empty()), "{k}");
    }

    // PyJWT, knowing only the issuer URL, accepts a JWT-SVID minted through the agent.
    let jwt = within(Duration::from_secs(20), "a JWT-SVID from the agent", || {
        fetch_jwt(&agent, "vault")
    });
    assert_eq!(kid(&jwt), first_keys[0]["kid"].as_str().unwrap());
    let v = relying_party(&issuer, "vault", &jwt);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["sub"], WORKLOAD);
    // ... and refuses it for another audience, and a token signed by another key (same kid).
    assert_eq!(relying_party(&issuer, "other", &jwt)["ok"], false);
    let forged = python(&["forge", &jwt]);
    let v = relying_party(&issuer, "vault", &forged);
    assert_eq!(
        v["ok"], false,
        "a token signed by another key was accepted: {v}"
    );
    assert_eq!(v["error"], "InvalidSignatureError", "{v}");

    // Rotation: the next key is published before it signs, and what it signs validates.
    let rotated = within(Duration::from_secs(90), "next JWT key published", || {
        let k = keys(port);
        (k.len() == 2).then_some(k)
    });
    let new_kid = rotated
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .find(|k| k != first_keys[0]["kid"].as_str().unwrap())
        .unwrap();
    let mut n = 0;
    let jwt2 = within(
        Duration::from_secs(90),
        "a JWT-SVID signed by the next key",
        || {
            n += 1;
            fetch_jwt(&agent, &format!("vault-{n}")).filter(|t| kid(t) == new_kid)
        },
    );
    let v = relying_party(&issuer, &format!("vault-{n}"), &jwt2);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["kid"], new_kid.as_str());
}

#[test]
fn bad_oidc_discovery_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[oidc_discovery]\nbind_address = \"127.0.0.1:1\"\n",
            "jwt_issuer",
        ),
        (
            "jwt_issuer = \"spiffe://example.org\"\n[oidc_discovery]\nbind_address = \"127.0.0.1:1\"\n",
            "jwt_issuer",
        ),
        (
            "jwt_issuer = \"https://oidc.example.org\"\n[oidc_discovery]\nbind_address = \"nowhere\"\n",
            "oidc_discovery.bind_address",
        ),
        (
            "jwt_issuer = \"https://oidc.example.org\"\n[oidc_discovery]\nbind_address = \"127.0.0.1:1\"\njwks_uri = \"file:///k\"\n",
            "oidc_discovery.jwks_uri",
        ),
    ];
    for (i, (toml, key)) in cases.into_iter().enumerate() {
        let s = TestServer::configure(
            &dir.path().join(format!("s{i}")),
            ServerOptions {
                extra_toml: toml.into(),
                ..ServerOptions::default()
            },
        );
        let (ok, err) = s
            .run_until_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("server with {toml:?} kept running"));
        assert!(!ok, "server with {toml:?} started");
        assert!(err.contains(key), "{toml:?}: {err:?} should name {key}");
    }
}
