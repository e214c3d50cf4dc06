//! `continuity-agent` start-up and operation: config errors, join tokens, bootstrap modes,
//! agent SVID renewal, restart without a token, reflection and watch.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::process::Command;
use std::time::{Duration, Instant};

use continuity_tests::agent::TestAgent;
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::uid;

const ALIAS: &str = "spiffe://example.org/node/cli";

fn wait_for<F: FnMut() -> bool>(secs: u64, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {secs}s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bad_config_and_bad_tokens_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    let cases = [
        ("sokcet_path = \"/x\"", "sokcet_path"),
        ("sync_interval = \"often\"", "sync_interval"),
        (
            "[workload_attestors.k8s]\nkubelet = 1",
            "unknown field `kubelet`",
        ),
        (
            "[workload_attestors.k8s]\nkubelet_url = \"https://127.0.0.1:10250\"",
            "workload_attestors.k8s.kubelet_ca_path",
        ),
        (
            "[node_attestors.k8s_psat]\ntoken_path = \"/t\"",
            "node_attestors.k8s_psat.cluster",
        ),
    ];
    for (extra, key) in cases {
        let a = TestAgent::configure(&dir.path().join("a1"), &server, "x", extra);
        let (ok, err) = a.run_to_exit();
        assert!(!ok && err.contains(key), "{extra}: {err}");
    }
    // First start without a token.
    let a = TestAgent::configure(&dir.path().join("a2"), &server, "", "");
    let (ok, err) = a.run_to_exit();
    assert!(!ok && err.contains("join token"), "{err}");
    // A token the server does not know.
    let a = TestAgent::configure(&dir.path().join("a3"), &server, "not-a-token", "");
    let (ok, err) = a.run_to_exit();
    assert!(!ok && err.contains("PermissionDenied"), "{err}");
    assert!(
        !dir.path().join("a3/data/agent-state.json").exists(),
        "nothing persisted on failure"
    );
}

#[test]
fn insecure_bootstrap_attests_and_then_follows_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    server.create_entry(
        "spiffe://example.org/insecure",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    let agent = TestAgent::start_with(
        &dir.path().join("agent"),
        &server,
        &server.token(Some(ALIAS)),
        "insecure_bootstrap = true",
    );
    wait_for(10, || agent.cli(&["api", "fetch", "x509"]).status.success());
    assert!(
        agent.log().contains("insecure_bootstrap"),
        "the insecure mode is logged"
    );
}

#[test]
fn agent_svid_renews_and_a_restart_needs_no_new_token() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ServerOptions {
        x509_ttl: "6s".into(),
        ..Default::default()
    };
    let server = TestServer::start(&dir.path().join("server"), opts);
    server.create_entry(
        "spiffe://example.org/renew",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    let token = server.token(Some(ALIAS));
    let mut agent = TestAgent::start(&dir.path().join("agent"), &server, &token);
    let agents: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    let serial = agents["agents"][0]["serial_number"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for(15, || agent.log().contains("agent SVID renewed"));
    let agents: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    assert_ne!(
        agents["agents"][0]["serial_number"].as_str().unwrap(),
        serial,
        "server recorded the renewed SVID"
    );
    wait_for(10, || agent.cli(&["api", "fetch", "x509"]).status.success());

    // The token in agent.toml is spent; a restart runs on the persisted agent SVID.
    agent.restart();
    assert!(agent.cli(&["api", "fetch", "x509"]).status.success());
    let agents: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    assert_eq!(
        agents["agents"].as_array().unwrap().len(),
        1,
        "no second attestation"
    );
    // And it keeps talking to the server: new entries still arrive.
    server.create_entry(
        "spiffe://example.org/renew2",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    wait_for(15, || {
        String::from_utf8_lossy(&agent.cli(&["api", "fetch", "x509"]).stdout).contains("renew2")
    });
}

#[tokio::test]
async fn reflection_lists_the_workload_api_and_watch_streams() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    server.create_entry(
        "spiffe://example.org/watch",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    let agent = TestAgent::start(
        &dir.path().join("agent"),
        &server,
        &server.token(Some(ALIAS)),
    );

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let ch = continuity_common::grpc::uds_channel(&agent.socket)
        .await
        .unwrap();
    let mut c = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut s = c
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let resp = s.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.clone()).collect();
    assert!(
        names.contains(&"SpiffeWorkloadAPI".to_string()),
        "{names:?}"
    );

    // `api watch` prints the current SVID and keeps streaming (once the agent holds it: before
    // that the Workload API answers PermissionDenied, as SPIRE's does).
    wait_for(15, || agent.cli(&["api", "fetch", "x509"]).status.success());
    let mut child = Command::new(continuity_tests::bin("continuity-agent"))
        .args(["api", "watch", "--socket-path"])
        .arg(&agent.socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut got = String::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !got.contains("spiffe://example.org/watch") && Instant::now() < deadline {
        let mut buf = [0u8; 512];
        let n = std::io::Read::read(&mut out, &mut buf).unwrap();
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.contains("spiffe://example.org/watch"), "{got}");
    assert!(child.try_wait().unwrap().is_none(), "watch keeps running");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn socket_path_is_one_global_flag_with_the_env_fallback() {
    let agent = |args: &[&str], env: Option<&str>| {
        let mut c = Command::new(continuity_tests::bin("continuity-agent"));
        c.args(args).env_remove("SPIFFE_ENDPOINT_SOCKET");
        if let Some(e) = env {
            c.env("SPIFFE_ENDPOINT_SOCKET", e);
        }
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let flag = "/nonexistent/flag.sock";
    // Accepted where each command took it before, and before the command too.
    for args in [
        &["healthcheck", "--socket-path", flag][..],
        &["api", "fetch", "x509", "--socket-path", flag],
        &[
            "api",
            "fetch",
            "jwt",
            "--audience",
            "a",
            "--socket-path",
            flag,
        ],
        &[
            "api",
            "validate",
            "jwt",
            "--audience",
            "a",
            "--svid",
            "x",
            "--socket-path",
            flag,
        ],
        &["api", "watch", "--socket-path", flag],
        &["engine", "jwks", "--socket-path", flag],
        &[
            "engine",
            "sign",
            "--key",
            "k",
            "--digest",
            "00",
            "--socket-path",
            flag,
        ],
        &["--socket-path", flag, "api", "fetch", "x509"],
        &["engine", "--socket-path", flag, "jwks"],
    ] {
        let (code, err) = agent(args, Some("unix:///nonexistent/env.sock"));
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains("cannot reach the Workload API at /nonexistent/flag.sock"),
            "{args:?}: the flag wins over the environment: {err}"
        );
    }
    let (_, err) = agent(
        &["api", "fetch", "x509"],
        Some("unix:///nonexistent/env.sock"),
    );
    assert!(err.contains("at /nonexistent/env.sock"), "{err}");
    let (_, err) = agent(&["engine", "jwks"], Some("unix:/nonexistent/env2.sock"));
    assert!(err.contains("at /nonexistent/env2.sock"), "{err}");
    // `run` serves the socket its config names; the client flag is refused there.
    let (code, err) = agent(
        &[
            "run",
            "--config",
            "/nonexistent.toml",
            "--socket-path",
            flag,
        ],
        None,
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("--socket-path"), "{err}");
}
