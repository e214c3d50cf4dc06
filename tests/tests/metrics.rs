//! `/metrics` of a real server and a real agent during real calls: the per-RPC counts equal
//! the calls made (with gRPC status names), every histogram is cumulative with `_count` equal
//! to `+Inf`, and the cache, expiry, sync-lag, CA-expiry and integrity gauges are sane.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use continuity_common::metrics::code_name;
use continuity_proto::engine::GetPublicKeyRequest;
use continuity_proto::engine::engine_api_client::EngineApiClient;
use continuity_proto::workload::JwtsvidRequest;
use continuity_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use continuity_tests::agent::TestAgent;
use continuity_tests::prom::{Scrape, scrape};
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::{fetch_x509, free_port, uid, with_header};

const ALIAS: &str = "spiffe://example.org/node/metrics";
const WORKLOAD_API: &str = "SpiffeWorkloadAPI";
const AGENT_API: &str = "continuity.agent.v1.AgentAPI";

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A calls counter of `prefix` (0 when the series does not exist yet).
fn calls(s: &Scrape, prefix: &str, service: &str, method: &str, code: &str) -> f64 {
    s.value(
        &format!("{prefix}_rpc_requests_total"),
        &[("service", service), ("method", method), ("code", code)],
    )
    .unwrap_or(0.0)
}

fn grpc_code_name(status: &tonic::Status) -> &'static str {
    code_name((status.code() as i32).to_string().as_bytes())
}

#[tokio::test]
async fn metrics_count_every_call_and_gauges_are_sane() {
    let dir = tempfile::tempdir().unwrap();
    let (server_port, agent_port) = (free_port(), free_port());
    let server = TestServer::start(
        &dir.path().join("server"),
        ServerOptions {
            extra_toml: format!("[metrics]\nbind_address = \"127.0.0.1:{server_port}\"\n"),
            ..ServerOptions::default()
        },
    );
    let token = server.token(Some(ALIAS));
    let agent = TestAgent::start_with(
        &dir.path().join("agent"),
        &server,
        &token,
        &format!("[metrics]\nbind_address = \"127.0.0.1:{agent_port}\"\n"),
    );
    server.cli_ok(&["engine", "create", "metered", "--tier", "1"]);
    server.cli_ok(&[
        "engine",
        "key",
        "create",
        "metered",
        "k",
        "--purpose",
        "sign",
    ]);
    server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/metrics",
        "--parent-id",
        ALIAS,
        "--selector",
        &format!("unix:uid:{}", uid()),
        "--engine",
        "metered",
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while fetch_x509(&agent).await.is_err() {
        assert!(Instant::now() < deadline, "no X509-SVID within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let before_agent = scrape(agent_port);
    let before_server = scrape(server_port);
    let channel = continuity_common::grpc::uds_channel(&agent.socket)
        .await
        .unwrap();
    let mut workload = SpiffeWorkloadApiClient::new(channel.clone());
    // Three JWT-SVIDs for three audiences: three Workload API calls answered OK, three
    // NewJWTSVID calls to the server (nothing cached yet for these audiences).
    for aud in ["m1", "m2", "m3"] {
        let r = workload
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec![aud.into()],
                spiffe_id: String::new(),
            }))
            .await
            .unwrap();
        assert_eq!(r.into_inner().svids.len(), 1);
    }
    // Two calls without the security header: refused, and counted under their status.
    let mut refused = "";
    for _ in 0..2 {
        let e = workload
            .fetch_jwtsvid(tonic::Request::new(JwtsvidRequest {
                audience: vec!["m1".into()],
                spiffe_id: String::new(),
            }))
            .await
            .unwrap_err();
        refused = grpc_code_name(&e);
    }
    assert_ne!(refused, "OK");
    // One EngineAPI call for an Engine this workload is not bound to.
    let public_key = |engine: &'static str| {
        let mut client = EngineApiClient::new(channel.clone());
        async move {
            client
                .get_public_key(with_header(GetPublicKeyRequest {
                    key: "k".into(),
                    version: 0,
                    engine: engine.into(),
                }))
                .await
        }
    };
    let e = public_key("nope").await.unwrap_err();
    let engine_code = grpc_code_name(&e);
    // One for the Engine it is bound to: answered by the server's EngineBroker.
    let public = public_key("metered").await.unwrap();
    assert!(public.into_inner().pem.contains("PUBLIC KEY"));

    let a = scrape(agent_port);
    let s = scrape(server_port);
    let p = "continuity_agent";
    let delta = |svc, method, code| {
        calls(&a, p, svc, method, code) - calls(&before_agent, p, svc, method, code)
    };
    assert_eq!(delta(WORKLOAD_API, "FetchJWTSVID", "OK"), 3.0);
    assert_eq!(delta(WORKLOAD_API, "FetchJWTSVID", refused), 2.0);
    assert_eq!(
        delta(
            "continuity.engine.v1.EngineAPI",
            "GetPublicKey",
            engine_code
        ),
        1.0
    );
    // The FetchX509SVID streams the harness opened and dropped: counted as cancelled.
    assert!(calls(&a, p, WORKLOAD_API, "FetchX509SVID", "CANCELLED") >= 1.0);
    let server_jwt = |x: &Scrape| calls(x, "continuity_server", AGENT_API, "NewJWTSVID", "OK");
    assert_eq!(server_jwt(&s) - server_jwt(&before_server), 3.0);
    assert!(
        calls(
            &s,
            "continuity_server",
            AGENT_API,
            "SyncAuthorizedEntries",
            "OK"
        ) >= 1.0
    );
    let broker = |x: &Scrape| {
        calls(
            x,
            "continuity_server",
            "continuity.engine.v1.EngineBroker",
            "GetPublicKey",
            "OK",
        )
    };
    assert_eq!(
        broker(&s) - broker(&before_server),
        1.0,
        "EngineBroker calls"
    );
    assert_eq!(
        s.value("continuity_server_jwt_svids_signed_total", &[]),
        Some(3.0)
    );

    // Histograms: cumulative, `+Inf` = `_count`, and the count is every finished call.
    assert!(a.check_histograms() >= 3, "agent histograms");
    assert!(s.check_histograms() >= 3, "server histograms");
    let jwt_labels = [("service", WORKLOAD_API), ("method", "FetchJWTSVID")];
    let finished: f64 = a
        .samples
        .iter()
        .filter(|x| {
            x.name == "continuity_agent_rpc_requests_total"
                && x.labels["service"] == WORKLOAD_API
                && x.labels["method"] == "FetchJWTSVID"
        })
        .map(|x| x.value)
        .sum();
    assert_eq!(
        a.value(
            "continuity_agent_rpc_request_duration_seconds_count",
            &jwt_labels
        ),
        Some(finished)
    );
    assert_eq!(
        a.types["continuity_agent_rpc_request_duration_seconds"],
        "histogram"
    );
    assert_eq!(a.types["continuity_agent_rpc_requests_total"], "counter");

    // Gauges.
    let t = now();
    assert_eq!(a.value("continuity_agent_cached_svids", &[]), Some(1.0));
    assert_eq!(a.value("continuity_agent_cached_bundles", &[]), Some(1.0));
    let expiry = a
        .value(
            "continuity_agent_svid_earliest_expiry_timestamp_seconds",
            &[],
        )
        .unwrap();
    assert!(
        expiry > t && expiry <= t + 3600.0 + 60.0,
        "earliest SVID expiry {expiry} not within the 1h TTL from {t}"
    );
    let lag = a.value("continuity_agent_sync_lag_seconds", &[]).unwrap();
    assert!(
        (0.0..=10.0).contains(&lag),
        "sync lag {lag}s with a 500ms sync interval"
    );
    assert_eq!(a.value("continuity_agent_server_connected", &[]), Some(1.0));
    for purpose in ["x509", "jwt"] {
        let ca = s
            .value(
                "continuity_server_ca_expiry_timestamp_seconds",
                &[("purpose", purpose)],
            )
            .unwrap_or_else(|| panic!("no {purpose} CA expiry"));
        assert!(
            ca > t + 3600.0 && ca <= t + 2.0 * 86_400.0,
            "{purpose} CA expiry {ca} vs now {t} (ca_ttl 24h)"
        );
    }
    assert_eq!(s.value("continuity_integrity_bad_rows", &[]), Some(0.0));
}
