//! The Workload API of a real agent, against a real server, with unmodified SPIFFE clients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use continuity_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use continuity_proto::workload::{X509svidRequest, X509svidResponse};
use continuity_tests::agent::TestAgent;
use continuity_tests::{Env, fetch_x509, uid, with_header};
use tonic::Code;

const ALIAS: &str = "spiffe://example.org/node/test";

fn env() -> Env {
    continuity_tests::env(ALIAS)
}

async fn workload_client(agent: &TestAgent) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    SpiffeWorkloadApiClient::new(
        continuity_common::grpc::uds_channel(&agent.socket)
            .await
            .unwrap(),
    )
}

/// Polls until `f` returns Some, for at most `secs`.
async fn eventually<T, F, Fut>(secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ids(r: &X509svidResponse) -> HashSet<String> {
    r.svids.iter().map(|s| s.spiffe_id.clone()).collect()
}

/// Splits concatenated DER certificates.
fn split(concat: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = concat;
    while !rest.is_empty() {
        let (_, _, tail) = continuity_common::der::read_tlv(rest).unwrap();
        out.push(rest[..rest.len() - tail.len()].to_vec());
        rest = tail;
    }
    out
}

/// True if the leaf of `chain` is signed by one of `bundle`'s CAs and valid now.
fn chain_valid(chain: &[u8], bundle: &[u8]) -> bool {
    use x509_parser::prelude::*;
    let chain = split(chain);
    let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if leaf.validity().not_after.timestamp() < now {
        return false;
    }
    split(bundle).iter().any(|ca| {
        let (_, ca) = parse_x509_certificate(ca).unwrap();
        leaf.verify_signature(Some(ca.public_key())).is_ok()
    })
}

#[tokio::test]
async fn py_spiffe_fetches_and_validates_everything() {
    let e = env();
    e.server.create_entry(
        "spiffe://example.org/py",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    eventually(10, || async { fetch_x509(&e.agent).await.ok() }).await;
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/fetch_all.py"))
        .arg(e.agent.endpoint())
        .arg("payments")
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "py-spiffe failed (is PyPI `spiffe` installed? scripts/setup does it):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["x509_spiffe_id"], "spiffe://example.org/py");
    assert_eq!(v["x509_chain_len"], 1);
    assert_eq!(v["x509_authorities"], 1);
    assert_eq!(v["jwt_spiffe_id"], "spiffe://example.org/py");
    assert_eq!(v["jwt_authorities"], 1);
    assert_eq!(v["validated_spiffe_id"], "spiffe://example.org/py");
    assert_eq!(v["validated_audience"], serde_json::json!(["payments"]));
    // The agent validates what the server signed, and refuses it for another audience.
    let token = v["jwt_token"].as_str().unwrap();
    let bad = e.agent.cli(&[
        "api",
        "validate",
        "jwt",
        "--audience",
        "other",
        "--svid",
        token,
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("InvalidArgument"));
}

#[tokio::test]
async fn rust_spiffe_crate_works_including_x509_source() {
    let e = env();
    e.server.create_entry(
        "spiffe://example.org/rs",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    eventually(10, || async { fetch_x509(&e.agent).await.ok() }).await;
    let endpoint = e.agent.endpoint();
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/rs");
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&td).is_some());
    let jwt = client.fetch_jwt_svid(["billing"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/rs");
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    assert!(jwt_bundles.get(&td).is_some());
    let validated = client
        .validate_jwt_token("billing", jwt.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id().to_string(), "spiffe://example.org/rs");

    let source = spiffe::X509Source::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .unwrap();
    assert_eq!(
        source.svid().unwrap().spiffe_id().to_string(),
        "spiffe://example.org/rs"
    );
    assert!(source.bundle_set().unwrap().get(&td).is_some());
}

#[tokio::test]
async fn security_header_missing_identity_and_unimplemented() {
    let e = env();
    let mut c = workload_client(&e.agent).await;
    // No header: InvalidArgument, before anything else.
    let err = c
        .fetch_x509svid(tonic::Request::new(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    // Header, but no entry for this uid: PermissionDenied (never an empty message).
    let err = fetch_x509(&e.agent).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    // Empty audience: InvalidArgument.
    let err = c
        .fetch_jwtsvid(with_header(continuity_proto::workload::JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .fetch_witsvid(with_header(continuity_proto::workload::WitsvidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    // gRPC health answers on the same socket.
    assert!(e.agent.cli(&["healthcheck"]).status.success());
}

/// Helper run as another uid by the test below: prints the SPIFFE IDs this process receives.
#[test]
#[ignore = "helper: run as another uid by two_uids_each_get_only_their_own_svid"]
fn workload_as_other_uid() {
    let socket = std::env::var("HELPER_SOCKET").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = continuity_common::grpc::uds_channel(std::path::Path::new(&socket))
            .await
            .unwrap();
        let mut c = SpiffeWorkloadApiClient::new(ch);
        match c.fetch_x509svid(with_header(X509svidRequest {})).await {
            Ok(s) => match s.into_inner().message().await {
                Ok(Some(r)) => println!(
                    "IDS {}",
                    r.svids
                        .iter()
                        .map(|s| s.spiffe_id.clone())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                Ok(None) => println!("ERR empty"),
                Err(e) => println!("ERR {:?}", e.code()),
            },
            Err(e) => println!("ERR {:?}", e.code()),
        }
    });
}

fn fetch_as(uid: u32, socket: &std::path::Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "workload_as_other_uid",
            "--ignored",
            "--nocapture",
        ])
        .env("HELPER_SOCKET", socket)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    stdout
        .lines()
        .find(|l| l.starts_with("IDS ") || l.starts_with("ERR "))
        .unwrap_or_else(|| {
            panic!(
                "helper printed nothing: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string()
}

#[tokio::test]
async fn two_uids_each_get_only_their_own_svid() {
    if uid() != 0 {
        panic!("this test needs root to run workloads as other uids (CI runs as root)");
    }
    let e = env();
    e.server
        .create_entry("spiffe://example.org/alice", ALIAS, &["unix:uid:1501"]);
    e.server
        .create_entry("spiffe://example.org/bob", ALIAS, &["unix:uid:1502"]);
    e.server.create_entry(
        "spiffe://example.org/bob-admin",
        ALIAS,
        &["unix:uid:1502", "unix:gid:0"],
    );
    let socket = e.agent.socket.clone();
    let alice = eventually(10, || {
        let s = socket.clone();
        async move { Some(fetch_as(1501, &s)).filter(|r| r.starts_with("IDS")) }
    })
    .await;
    assert_eq!(alice, "IDS spiffe://example.org/alice");
    let bob = fetch_as(1502, &socket);
    assert_eq!(
        bob, "IDS spiffe://example.org/bob",
        "bob's gid is not 0, so only one entry matches"
    );
    assert_eq!(fetch_as(1503, &socket), "ERR PermissionDenied");
}

#[tokio::test]
async fn stream_rotates_svids_before_expiry_at_least_five_times() {
    let e = env();
    let me = format!("unix:uid:{}", uid());
    e.server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/short",
        "--parent-id",
        ALIAS,
        "--selector",
        &me,
        "--x509-svid-ttl",
        "4",
    ]);
    eventually(10, || async { fetch_x509(&e.agent).await.ok() }).await;
    let mut c = workload_client(&e.agent).await;
    let mut stream = c
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let mut prev = first.svids[0].x509_svid.clone();
    assert!(chain_valid(&prev, &first.svids[0].bundle));
    let mut rotations = 0;
    while rotations < 5 {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a new SVID within 10s")
            .unwrap()
            .unwrap();
        let svid = &msg.svids[0];
        if svid.x509_svid == prev {
            continue;
        }
        // The old SVID had not expired yet when its successor arrived.
        assert!(
            chain_valid(&prev, &svid.bundle),
            "rotation {rotations}: previous SVID already expired"
        );
        assert!(
            chain_valid(&svid.x509_svid, &svid.bundle),
            "rotation {rotations}: new chain invalid"
        );
        assert_eq!(svid.spiffe_id, "spiffe://example.org/short");
        prev = svid.x509_svid.clone();
        rotations += 1;
    }
}

#[tokio::test]
async fn entries_appear_and_disappear_without_restarts() {
    let e = env();
    let me = format!("unix:uid:{}", uid());
    e.server
        .create_entry("spiffe://example.org/one", ALIAS, &[&me]);
    eventually(10, || async { fetch_x509(&e.agent).await.ok() }).await;
    let mut c = workload_client(&e.agent).await;
    let mut stream = c
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(
        ids(&first),
        HashSet::from(["spiffe://example.org/one".to_string()])
    );

    let two = e
        .server
        .create_entry("spiffe://example.org/two", ALIAS, &[&me]);
    let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        ids(&msg),
        HashSet::from([
            "spiffe://example.org/one".to_string(),
            "spiffe://example.org/two".to_string()
        ])
    );

    e.server.cli_ok(&["entry", "delete", "--id", &two]);
    let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        ids(&msg),
        HashSet::from(["spiffe://example.org/one".to_string()])
    );
}

#[tokio::test]
async fn serves_through_a_server_outage_and_an_agent_restart() {
    let mut e = env();
    let me = format!("unix:uid:{}", uid());
    e.server
        .create_entry("spiffe://example.org/steady", ALIAS, &[&me]);
    let before = eventually(10, || async { fetch_x509(&e.agent).await.ok() }).await;
    // A JWT-SVID fetched while the server is up stays available from the cache.
    let jwt = e.agent.cli(&[
        "api",
        "fetch",
        "jwt",
        "--audience",
        "db",
        "--output",
        "json",
    ]);
    assert!(
        jwt.status.success(),
        "{}",
        String::from_utf8_lossy(&jwt.stderr)
    );

    e.server.stop();
    let during = fetch_x509(&e.agent)
        .await
        .expect("served with the server down");
    assert_eq!(during.svids[0].x509_svid, before.svids[0].x509_svid);
    let jwt_down = e.agent.cli(&[
        "api",
        "fetch",
        "jwt",
        "--audience",
        "db",
        "--output",
        "json",
    ]);
    assert!(
        jwt_down.status.success(),
        "cached JWT-SVID served while the server is down"
    );
    let token: serde_json::Value = serde_json::from_slice(&jwt_down.stdout).unwrap();
    let token = token["svids"][0]["svid"].as_str().unwrap().to_string();
    let valid = e.agent.cli(&[
        "api",
        "validate",
        "jwt",
        "--audience",
        "db",
        "--svid",
        &token,
    ]);
    assert!(
        valid.status.success(),
        "validated locally: {}",
        String::from_utf8_lossy(&valid.stderr)
    );

    // Restart the agent with the server still down: it serves what it held.
    e.agent.restart();
    let ready = Instant::now();
    let after = eventually(1, || async { fetch_x509(&e.agent).await.ok() }).await;
    assert!(ready.elapsed() < Duration::from_secs(1));
    assert_eq!(ids(&after), ids(&before));
    assert_eq!(after.svids[0].x509_svid, before.svids[0].x509_svid);
    // The state file holds private keys: 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(e.agent.dir.join("data/agent-state.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The server returns: the agent reconciles and picks up new entries.
    e.server.restart();
    e.server
        .create_entry("spiffe://example.org/later", ALIAS, &[&me]);
    eventually(30, || async {
        let r = fetch_x509(&e.agent).await.ok()?;
        ids(&r).contains("spiffe://example.org/later").then_some(())
    })
    .await;
}

#[tokio::test]
async fn cli_fetch_writes_files_and_honours_spiffe_endpoint_socket() {
    let e = env();
    e.server.create_entry(
        "spiffe://example.org/cli",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    eventually(10, || async { fetch_x509(&e.agent).await.ok() }).await;
    let out_dir = e.agent.dir.join("out");
    let out = Command::new(continuity_tests::bin("continuity-agent"))
        .args(["api", "fetch", "x509", "--write"])
        .arg(&out_dir)
        .env("SPIFFE_ENDPOINT_SOCKET", e.agent.endpoint())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/cli"));
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(out_dir.join("bundle.0.pem"))
        .arg(out_dir.join("svid.0.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out_dir.join("svid.0.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let key_check = Command::new("openssl")
        .args(["pkey", "-noout", "-in"])
        .arg(out_dir.join("svid.0.key"))
        .output()
        .unwrap();
    assert!(key_check.status.success());
    let json = e.agent.cli(&["api", "fetch", "x509", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["svids"][0]["spiffe_id"], "spiffe://example.org/cli");
}
