//! Adversarial suite, k8s_psat: unauthenticated attestation attempts must not make the server
//! fetch the issuer's discovery document and JWKS on every request. A stand-in OIDC issuer over
//! real HTTPS counts the fetches the real server binary makes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::EcdsaKeyPair;
use continuity_tests::agent_client::attest_with;
use continuity_tests::k8s_standin::{es256_jwt, https_json, issuer, sa_claims};
use continuity_tests::server::{ServerOptions, TestServer};
use futures_util::StreamExt;
use tonic::Code;

const AUD: &str = "continuity-server";
const NS: &str = "continuity";
const SA: &str = "continuity-agent";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A stand-in OIDC issuer: discovery document and JWKS, counted.
struct Issuer {
    url: String,
    ca_pem: String,
    discovery: Arc<AtomicUsize>,
    jwks_fetches: Arc<AtomicUsize>,
    jwks: Arc<Mutex<serde_json::Value>>,
    down: Arc<AtomicBool>,
}

impl Issuer {
    /// Serves `jwks`; the discovery document names `named_issuer` (None: its own URL).
    async fn start(jwks: serde_json::Value, named_issuer: Option<String>) -> Self {
        let port_cell = Arc::new(OnceLock::<u16>::new());
        let (discovery, jwks_fetches) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let jwks = Arc::new(Mutex::new(jwks));
        let down = Arc::new(AtomicBool::new(false));
        let (pc, d, j, doc, dn) = (
            port_cell.clone(),
            discovery.clone(),
            jwks_fetches.clone(),
            jwks.clone(),
            down.clone(),
        );
        let (port, ca_pem) = https_json(move |method, path, _, _| {
            let base = format!("https://127.0.0.1:{}", pc.get().copied().unwrap_or_default());
            let answer = match (method, path) {
                ("GET", "/.well-known/openid-configuration") => {
                    d.fetch_add(1, Ordering::SeqCst);
                    let iss = named_issuer.clone().unwrap_or_else(|| base.clone());
                    (200, serde_json::json!({"issuer": iss, "jwks_uri": format!("{base}/openid/v1/jwks"),
                        "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                        "id_token_signing_alg_values_supported": ["ES256"]}))
                }
                ("GET", "/openid/v1/jwks") => {
                    j.fetch_add(1, Ordering::SeqCst);
                    (200, doc.lock().unwrap().clone())
                }
                _ => (404, serde_json::json!({})),
            };
            if dn.load(Ordering::SeqCst) {
                (503, serde_json::json!({"error": "down"}))
            } else {
                answer
            }
        })
        .await;
        port_cell.set(port).unwrap();
        Self {
            url: format!("https://127.0.0.1:{port}"),
            ca_pem,
            discovery,
            jwks_fetches,
            jwks,
            down,
        }
    }

    fn fetches(&self) -> (usize, usize) {
        (
            self.discovery.load(Ordering::SeqCst),
            self.jwks_fetches.load(Ordering::SeqCst),
        )
    }

    /// The `[node_attestors.k8s_psat.clusters.<name>]` table for this issuer.
    fn cluster_toml(&self, dir: &std::path::Path, name: &str, extra: &str) -> String {
        let ca = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca, &self.ca_pem).unwrap();
        format!(
            "[node_attestors.k8s_psat.clusters.{name}]\nservice_account_allow_list = [\"{NS}:{SA}\"]\noidc_discovery_url = \"{}\"\noidc_ca_path = \"{}\"\n{extra}\n",
            self.url,
            ca.display()
        )
    }
}

fn server(dir: &std::path::Path, toml: &str) -> TestServer {
    TestServer::start(
        &dir.join("server"),
        ServerOptions {
            extra_toml: toml.into(),
            ..Default::default()
        },
    )
}

async fn attest(s: &TestServer, payload: Vec<u8>) -> Result<String, tonic::Status> {
    attest_with(&s.addr, s.bundle_der(), "k8s_psat", payload)
        .await
        .map(|a| a.id)
}

fn payload(cluster: &str, token: &str) -> Vec<u8> {
    serde_json::json!({"cluster": cluster, "token": token})
        .to_string()
        .into_bytes()
}

/// A token for `iss` whose claims `edit` may change.
fn token(
    key: &EcdsaKeyPair,
    kid: &str,
    iss: &str,
    edit: impl Fn(&mut serde_json::Value),
) -> String {
    let mut c = sa_claims(iss, AUD, NS, SA, "node-uid-1", now() + 600);
    edit(&mut c);
    es256_jwt(key, kid, &c)
}

/// Pseudo-random bytes (a fixed LCG: reproducible junk).
fn junk_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// 200 junk attempts, 20 at a time, against a fresh server: every one is refused with
/// PermissionDenied and its reason, and together they cost at most one discovery and one
/// JWKS fetch. A valid token then attests from the cache, with no further fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_junk_psat_attempts_cost_at_most_one_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let (key, jwks) = issuer("k1");
    let iss = Issuer::start(jwks, None).await;
    let s = server(dir.path(), &iss.cluster_toml(dir.path(), "c1", ""));
    let url = iss.url.clone();
    let (stranger, _) = issuer("k-unknown");

    let mut cases: Vec<(Vec<u8>, &'static str)> = Vec::new();
    for i in 0..200u64 {
        let case = match i % 10 {
            // Not even JSON.
            0 => (junk_bytes(i, 64 + i as usize), "malformed k8s_psat payload"),
            // JSON, a token of random text.
            1 => (
                payload(
                    "c1",
                    &String::from_utf8_lossy(&junk_bytes(i, 40)).replace('"', ""),
                ),
                "not a signed JWT",
            ),
            // Three parts of garbage.
            2 => (payload("c1", "eyJhbGciOiJFUzI1NiJ9.e30.AAAA"), "kid"),
            // The right shape, signed by a key the issuer never had, a fresh kid each time.
            3 | 4 => (
                payload("c1", &token(&stranger, &format!("kid-{i}"), &url, |_| {})),
                "unknown key id",
            ),
            5 => (
                payload(
                    "c1",
                    &token(&key, "k1", &url, |c| {
                        c["exp"] = (now() - 3600).into();
                        c["iat"] = (now() - 7200).into();
                        c["nbf"] = (now() - 7200).into();
                    }),
                ),
                "expired",
            ),
            6 => (
                payload(
                    "c1",
                    &token(&key, "k1", &url, |c| c["nbf"] = (now() + 3600).into()),
                ),
                "not valid before",
            ),
            7 => (
                payload(
                    "c1",
                    &token(&key, "k1", &url, |c| c["iat"] = (now() + 3600).into()),
                ),
                "issued in the future",
            ),
            // An issuer other than the one discovery serves.
            8 => (
                payload("c1", &token(&key, "k1", "https://evil.example", |_| {})),
                "issuer",
            ),
            // alg none.
            _ => (
                payload(
                    "c1",
                    &format!(
                        "eyJhbGciOiJub25lIiwia2lkIjoiazEifQ.{}.",
                        token(&key, "k1", &url, |_| {}).split('.').nth(1).unwrap()
                    ),
                ),
                "algorithm",
            ),
        };
        cases.push(case);
    }
    let results: Vec<_> = futures_util::stream::iter(cases)
        .map(|(p, needle)| {
            let s = &s;
            async move { (attest(s, p).await, needle) }
        })
        .buffer_unordered(20)
        .collect()
        .await;
    let (d, j) = iss.fetches();
    assert!(
        d <= 1 && j <= 1,
        "200 junk attempts made {d} discovery and {j} JWKS fetches"
    );
    for (r, needle) in results {
        let e = r.expect_err(needle);
        assert_eq!(e.code(), Code::PermissionDenied, "{needle}: {e}");
        assert!(
            e.message().contains(needle),
            "{needle:?} in {:?}",
            e.message()
        );
    }

    // A valid token attests, from the cache.
    let good = token(&key, "k1", &url, |_| {});
    assert_eq!(
        attest(&s, payload("c1", &good)).await.unwrap(),
        "spiffe://example.org/continuity/agent/k8s_psat/c1/node-uid-1"
    );
    assert_eq!(iss.fetches(), (1, 1));
    // The offline limitation is logged once, at start.
    let log = s.log();
    assert_eq!(
        log.matches("validates tokens offline").count(),
        1,
        "server log:\n{log}"
    );
    assert!(log.contains("TokenReview"), "{log}");
}

/// The issuer rotates to a new kid: the bounded refresh picks it up, fetching no more than
/// once per `jwks_refresh_interval` however often agents retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_issuer_key_is_picked_up_by_the_bounded_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, jwks1) = issuer("k1");
    let iss = Issuer::start(jwks1, None).await;
    let s = server(
        dir.path(),
        &iss.cluster_toml(dir.path(), "c1", "jwks_refresh_interval = \"1s\""),
    );
    let url = iss.url.clone();
    attest(&s, payload("c1", &token(&k1, "k1", &url, |_| {})))
        .await
        .unwrap();
    assert_eq!(iss.fetches(), (1, 1));

    let (k2, jwks2) = issuer("k2");
    *iss.jwks.lock().unwrap() = jwks2;
    let rotated = token(&k2, "k2", &url, |_| {});
    let start = Instant::now();
    let deadline = start + Duration::from_secs(20);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match attest(&s, payload("c1", &rotated)).await {
            Ok(id) => {
                assert!(id.ends_with("/c1/node-uid-1"), "{id}");
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::PermissionDenied, "{e}");
                assert!(e.message().contains("unknown key id"), "{e}");
                assert!(Instant::now() < deadline, "k2 never picked up: {e}");
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (d, j) = iss.fetches();
    let bound = 2 + start.elapsed().as_secs() as usize;
    assert!(
        d <= bound && j <= bound && d >= 2,
        "{attempts} attempts over {:?} made {d} discovery and {j} JWKS fetches",
        start.elapsed()
    );
}

/// The cached keys outlive a failing issuer: past their TTL the refresh fails, and a valid
/// token still attests with the stale set (fetched once per interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_issuer_does_not_stop_attestation_with_cached_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (key, jwks) = issuer("k1");
    let iss = Issuer::start(jwks, None).await;
    let s = server(
        dir.path(),
        &iss.cluster_toml(
            dir.path(),
            "c1",
            "jwks_cache_ttl = \"1s\"\njwks_refresh_interval = \"1s\"",
        ),
    );
    let good = payload("c1", &token(&key, "k1", &iss.url, |_| {}));
    attest(&s, good.clone()).await.unwrap();
    iss.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let start = Instant::now();
    for _ in 0..10 {
        attest(&s, good.clone()).await.unwrap();
    }
    // Refreshes were tried (and failed) for the stale set at most once per interval, not once
    // per attempt; the JWKS was never reached again.
    let (d, j) = iss.fetches();
    assert!(
        d >= 2 && d <= 2 + start.elapsed().as_secs() as usize,
        "{d} discovery fetches in {:?}",
        start.elapsed()
    );
    assert_eq!(j, 1);
}

/// OpenID Connect Discovery: the document's `issuer` must be the issuer. A document naming
/// another issuer gives no keys (the token is not accepted), and a JWKS over 64 KiB is refused
/// unread beyond the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_document_for_another_issuer_or_an_oversized_jwks_gives_no_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (key, jwks) = issuer("k1");
    let liar = Issuer::start(jwks.clone(), Some("https://evil.example".into())).await;
    let mut big = jwks.clone();
    big["padding"] = "x".repeat(100 * 1024).into();
    let bloated = Issuer::start(big, None).await;
    let toml = format!(
        "{}{}",
        liar.cluster_toml(dir.path(), "liar", ""),
        bloated.cluster_toml(dir.path(), "bloated", "")
    );
    let s = server(dir.path(), &toml);
    let e = attest(&s, payload("liar", &token(&key, "k1", &liar.url, |_| {})))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(
        e.message()
            .contains("names issuer \"https://evil.example\""),
        "{e}"
    );
    let e = attest(
        &s,
        payload("bloated", &token(&key, "k1", &bloated.url, |_| {})),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("larger than"), "{e}");
}

/// TokenReview (the recommended mode) is a network call to the API server: junk attempts —
/// not a JWT, expired, for another audience, not bound to a node — are refused from their
/// shape and claims and make no TokenReview request; a well-formed token makes exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_psat_attempts_make_no_token_review_request() {
    let dir = tempfile::tempdir().unwrap();
    let reviews = Arc::new(AtomicUsize::new(0));
    let r = reviews.clone();
    let (port, ca) = https_json(move |_, _, _, body| {
        r.fetch_add(1, Ordering::SeqCst);
        let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let status = serde_json::json!({"authenticated": true, "audiences": [AUD],
            "user": {"username": format!("system:serviceaccount:{NS}:{SA}"), "extra": {
                "authentication.kubernetes.io/node-uid": ["node-uid-1"]}}});
        (
            201,
            serde_json::json!({"kind": "TokenReview", "spec": req["spec"], "status": status}),
        )
    })
    .await;
    std::fs::write(dir.path().join("api-ca.pem"), ca).unwrap();
    std::fs::write(dir.path().join("reviewer"), "reviewer-token").unwrap();
    let s = server(
        dir.path(),
        &format!(
            "[node_attestors.k8s_psat.clusters.c1]\nservice_account_allow_list = [\"{NS}:{SA}\"]\ntoken_review_api_server = \"https://127.0.0.1:{port}\"\ntoken_review_ca_path = \"{}\"\ntoken_review_token_path = \"{}\"\n",
            dir.path().join("api-ca.pem").display(),
            dir.path().join("reviewer").display()
        ),
    );
    let (key, _) = issuer("k1");
    let iss = "https://kubernetes.default.svc";
    let mut cases: Vec<(Vec<u8>, &'static str)> = Vec::new();
    for i in 0..200u64 {
        cases.push(match i % 5 {
            0 => (
                payload(
                    "c1",
                    &String::from_utf8_lossy(&junk_bytes(i, 40)).replace('"', ""),
                ),
                "not a signed JWT",
            ),
            1 => (
                payload(
                    "c1",
                    &token(&key, "k1", iss, |c| {
                        c["exp"] = (now() - 3600).into();
                        c["iat"] = (now() - 7200).into();
                    }),
                ),
                "expired",
            ),
            2 => (
                payload("c1", &token(&key, "k1", iss, |c| c["aud"] = "api".into())),
                "audience",
            ),
            3 => (
                payload(
                    "c1",
                    &token(&key, "k1", iss, |c| c["kubernetes.io"]["node"] = "x".into()),
                ),
                "not bound to a node",
            ),
            _ => (payload("c1", "a.b.c"), "not a signed JWT"),
        });
    }
    let results: Vec<_> = futures_util::stream::iter(cases)
        .map(|(p, needle)| {
            let s = &s;
            async move { (attest(s, p).await, needle) }
        })
        .buffer_unordered(20)
        .collect()
        .await;
    for (r, needle) in results {
        let e = r.expect_err(needle);
        assert_eq!(e.code(), Code::PermissionDenied, "{needle}: {e}");
        assert!(
            e.message().contains(needle),
            "{needle:?} in {:?}",
            e.message()
        );
    }
    assert_eq!(
        reviews.load(Ordering::SeqCst),
        0,
        "junk attempts made TokenReview requests"
    );
    assert_eq!(
        attest(&s, payload("c1", &token(&key, "k1", iss, |_| {})))
            .await
            .unwrap(),
        "spiffe://example.org/continuity/agent/k8s_psat/c1/node-uid-1"
    );
    assert_eq!(reviews.load(Ordering::SeqCst), 1);
}
