//! The Workload API details the SPIFFE spec fixes, against a real agent and server: unique
//! hints, argument checks, the security header, and JWT-SVID claim rules.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::time::{Duration, Instant};

use continuity_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use continuity_proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest, X509svidRequest};
use continuity_tests::{fetch_x509, uid, with_header};
use tonic::Code;

const ALIAS: &str = "spiffe://example.org/node/test";

async fn client(
    agent: &continuity_tests::agent::TestAgent,
) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    SpiffeWorkloadApiClient::new(
        continuity_common::grpc::uds_channel(&agent.socket)
            .await
            .unwrap(),
    )
}

/// `r` with the security header sent a second time.
fn twice<T>(mut r: tonic::Request<T>) -> tonic::Request<T> {
    r.metadata_mut()
        .append("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// Creates an entry for this uid with `hint`; returns its id.
fn entry_with_hint(e: &continuity_tests::Env, spiffe_id: &str, hint: &str) -> String {
    let me = format!("unix:uid:{}", uid());
    let out = e.server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--parent-id",
        ALIAS,
        "--selector",
        &me,
        "--hint",
        hint,
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn hints_are_unique_per_response_and_the_oldest_entry_keeps_its_hint() {
    let e = continuity_tests::env(ALIAS);
    entry_with_hint(&e, "spiffe://example.org/first", "db");
    // created_at has one-second resolution: the second "db" entry is strictly younger.
    std::thread::sleep(Duration::from_millis(1100));
    entry_with_hint(&e, "spiffe://example.org/second", "db");
    entry_with_hint(&e, "spiffe://example.org/other", "cache");
    let deadline = Instant::now() + Duration::from_secs(15);
    // Wait until the agent holds all three (the third is served, so sync has caught up).
    let resp = loop {
        if let Ok(r) = fetch_x509(&e.agent).await
            && r.svids.iter().any(|s| s.spiffe_id.ends_with("/other"))
        {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never served the entries"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut ids: Vec<_> = resp
        .svids
        .iter()
        .map(|s| (s.spiffe_id.as_str(), s.hint.as_str()))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            ("spiffe://example.org/first", "db"),
            ("spiffe://example.org/other", "cache")
        ]
    );
    let jwts = client(&e.agent)
        .await
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["aud".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut ids: Vec<_> = jwts.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        ["spiffe://example.org/first", "spiffe://example.org/other"]
    );
    // The younger one is not served even when asked for by name (as SPIRE does).
    let err = client(&e.agent)
        .await
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["aud".into()],
            spiffe_id: "spiffe://example.org/second".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
}

#[tokio::test]
async fn malformed_arguments_and_a_repeated_security_header_are_invalid_argument() {
    let e = continuity_tests::env(ALIAS);
    let me = format!("unix:uid:{}", uid());
    e.server
        .create_entry("spiffe://example.org/w", ALIAS, &[&me]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while fetch_x509(&e.agent).await.is_err() {
        assert!(Instant::now() < deadline, "no SVID");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = client(&e.agent).await;
    for bad in [
        "not a spiffe id",
        "spiffe://example.org/a//b",
        "spiffe://Example.org/w",
    ] {
        let err = c
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["aud".into()],
                spiffe_id: bad.into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err}");
    }
    // The header twice, on a stream and on a unary call.
    let err = c
        .fetch_x509svid(twice(with_header(X509svidRequest {})))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("more than once"), "{err}");
    let err = c
        .validate_jwtsvid(twice(with_header(ValidateJwtsvidRequest {
            audience: "aud".into(),
            svid: "a.b.c".into(),
        })))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    // A real JWT-SVID (typ JWT, iat now, one audience as a string) validates.
    let token = c
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["aud".into()],
            spiffe_id: "spiffe://example.org/w".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids
        .remove(0)
        .svid;
    let v = c
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: "aud".into(),
            svid: token,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.spiffe_id, "spiffe://example.org/w");
}
