#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]
//! `agent_node_label:KEY:VALUE` and `agent_pod_label:KEY:VALUE` node selectors (SPIRE's
//! `allowed_node_label_keys` / `allowed_pod_label_keys`): real agents attested with k8s_psat
//! through a TokenReview stand-in that also serves their Node and Pod objects. A node alias
//! entry with `agent_node_label:zone:a` authorizes only the agent whose Node has that label; a
//! label whose key is not allowed makes no selector; a Node that cannot be read refuses the
//! attestation rather than making up selectors.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use continuity_tests::agent::TestAgent;
use continuity_tests::agent_client::attest_with;
use continuity_tests::k8s_standin::{es256_jwt, issuer, sa_claims};
use continuity_tests::psat_api::PsatApi;
use continuity_tests::server::{ServerOptions, TestServer};
use tonic::Code;

const REVIEWER: &str = "reviewer-token";
const ZONE_A: &str = "spiffe://example.org/k8s/demo/zone-a";
const RACK: &str = "spiffe://example.org/k8s/demo/rack-r1";
const WEB: &str = "spiffe://example.org/ns/prod/sa/web";
const RACKED: &str = "spiffe://example.org/ns/prod/sa/racked";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A projected token of the agent pod `agent-<node>` on `node` (UID `uid-<node>`).
fn token(key: &aws_lc_rs::signature::EcdsaKeyPair, node: &str) -> String {
    let mut claims = sa_claims(
        "https://k",
        "continuity-server",
        "continuity",
        "continuity-agent",
        &format!("uid-{node}"),
        now() + 600,
    );
    claims["kubernetes.io"]["node"]["name"] = node.into();
    claims["kubernetes.io"]["pod"]["name"] = format!("agent-{node}").into();
    claims["kubernetes.io"]["pod"]["uid"] = format!("pod-uid-{node}").into();
    es256_jwt(key, "k1", &claims)
}

fn agent(dir: &Path, s: &TestServer, token: &str, node: &str) -> TestAgent {
    let adir = dir.join(format!("agent-{node}"));
    std::fs::create_dir_all(&adir).unwrap();
    std::fs::write(adir.join("psat"), token).unwrap();
    let extra = format!(
        "[node_attestors.k8s_psat]\ncluster = \"demo\"\ntoken_path = \"{}\"",
        adir.join("psat").display()
    );
    TestAgent::start_with(&adir, s, "", &extra)
}

fn agent_id(node: &str) -> String {
    format!("spiffe://example.org/continuity/agent/k8s_psat/demo/uid-{node}")
}

/// The agent's node selectors as `agent show` lists them.
fn selectors(s: &TestServer, node: &str) -> Vec<String> {
    let shown: serde_json::Value = serde_json::from_str(&s.cli_ok(&[
        "agent",
        "show",
        "--spiffe-id",
        &agent_id(node),
        "--output",
        "json",
    ]))
    .unwrap();
    shown["selectors"]
        .as_array()
        .unwrap_or_else(|| panic!("no selectors in {shown}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// The SPIFFE IDs `api fetch x509` gives this process from `agent`.
fn ids(agent: &TestAgent) -> String {
    String::from_utf8_lossy(&agent.cli(&["api", "fetch", "x509"]).stdout).to_string()
}

fn wait_for(agent: &TestAgent, id: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ids(agent).contains(id) {
        assert!(
            Instant::now() < deadline,
            "{what}: {id} never served; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn node_entry(s: &TestServer, spiffe_id: &str, selectors: &[&str]) {
    let mut args = vec!["entry", "create", "--node", "--spiffe-id", spiffe_id];
    for sel in selectors {
        args.extend(["--selector", sel]);
    }
    s.cli_ok(&args);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_label_selector_authorizes_only_the_agent_whose_node_has_the_label() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _jwks) = issuer("k1");
    let api = PsatApi::start(REVIEWER).await;
    for (node, zone) in [("node-a", "a"), ("node-b", "b")] {
        api.put_node(
            node,
            &format!("uid-{node}"),
            &[("zone", zone), ("rack", "r1")],
        );
        api.put_pod(
            "continuity",
            &format!("agent-{node}"),
            &format!("pod-uid-{node}"),
            node,
            &[("pool", "blue"), ("app", "continuity-agent")],
        );
    }
    std::fs::write(dir.path().join("api-ca.pem"), &api.ca_pem).unwrap();
    std::fs::write(dir.path().join("reviewer"), REVIEWER).unwrap();
    let cluster = format!(
        "[node_attestors.k8s_psat.clusters.demo]\nservice_account_allow_list = [\"continuity:continuity-agent\"]\n\
         token_review_api_server = \"https://127.0.0.1:{}\"\ntoken_review_ca_path = \"{}\"\ntoken_review_token_path = \"{}\"\n\
         allowed_node_label_keys = [\"zone\"]\nallowed_pod_label_keys = [\"pool\"]\n",
        api.port,
        dir.path().join("api-ca.pem").display(),
        dir.path().join("reviewer").display()
    );
    let s = TestServer::start(
        &dir.path().join("server"),
        ServerOptions {
            extra_toml: cluster,
            ..Default::default()
        },
    );
    let a = agent(dir.path(), &s, &token(&key, "node-a"), "node-a");
    let b = agent(dir.path(), &s, &token(&key, "node-b"), "node-b");

    // Allowed keys become selectors; `rack` and `app` are not allowed, so they do not.
    let sa = selectors(&s, "node-a");
    for want in [
        "k8s_psat:agent_node_label:zone:a",
        "k8s_psat:agent_pod_label:pool:blue",
        "k8s_psat:agent_node_name:node-a",
    ] {
        assert!(sa.contains(&want.to_string()), "{want} in {sa:?}");
    }
    assert!(
        sa.iter()
            .all(|x| !x.contains("rack") && !x.contains(":app:")),
        "only allowed label keys: {sa:?}"
    );
    assert!(selectors(&s, "node-b").contains(&"k8s_psat:agent_node_label:zone:b".to_string()));
    let reqs = api.requests();
    for want in [
        "GET /api/v1/nodes/node-a",
        "GET /api/v1/namespaces/continuity/pods/agent-node-a",
    ] {
        assert!(reqs.iter().any(|r| r == want), "{want} in {reqs:?}");
    }

    // zone:a reaches the agent on node-a only.
    let me = format!("unix:uid:{}", continuity_tests::uid());
    node_entry(
        &s,
        ZONE_A,
        &["k8s_psat:cluster:demo", "k8s_psat:agent_node_label:zone:a"],
    );
    s.create_entry(WEB, ZONE_A, &[&me]);
    // A node entry on the label whose key is not allowed matches no agent.
    node_entry(
        &s,
        RACK,
        &["k8s_psat:cluster:demo", "k8s_psat:agent_node_label:rack:r1"],
    );
    s.create_entry(RACKED, RACK, &[&me]);
    wait_for(&a, WEB, "agent on the zone-a node");
    // Entries made after those, straight for each agent: once b serves its own, it has synced
    // everything before it.
    let own_a = "spiffe://example.org/own-of-a";
    let own_b = "spiffe://example.org/own-of-b";
    s.create_entry(own_a, &agent_id("node-a"), &[&me]);
    s.create_entry(own_b, &agent_id("node-b"), &[&me]);
    wait_for(&a, own_a, "agent a, own entry");
    wait_for(&b, own_b, "agent b, own entry");
    let (ia, ib) = (ids(&a), ids(&b));
    assert!(!ib.contains(WEB), "node-b is in zone b: {ib}");
    assert!(
        !ia.contains(RACKED) && !ib.contains(RACKED),
        "rack is not an allowed key: {ia} {ib}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_or_pod_that_cannot_be_read_refuses_the_attestation() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _jwks) = issuer("k1");
    let api = PsatApi::start(REVIEWER).await;
    api.put_node("node-a", "uid-node-a", &[("zone", "a")]);
    // A Node whose UID is not the one in the token (the node was replaced under its name).
    api.put_node("node-r", "uid-someone-else", &[("zone", "a")]);
    std::fs::write(dir.path().join("api-ca.pem"), &api.ca_pem).unwrap();
    std::fs::write(dir.path().join("reviewer"), REVIEWER).unwrap();
    let cluster = format!(
        "[node_attestors.k8s_psat.clusters.demo]\nservice_account_allow_list = [\"continuity:continuity-agent\"]\n\
         token_review_api_server = \"https://127.0.0.1:{}\"\ntoken_review_ca_path = \"{}\"\ntoken_review_token_path = \"{}\"\n\
         allowed_node_label_keys = [\"zone\"]\n",
        api.port,
        dir.path().join("api-ca.pem").display(),
        dir.path().join("reviewer").display()
    );
    let s = TestServer::start(
        &dir.path().join("server"),
        ServerOptions {
            extra_toml: cluster,
            ..Default::default()
        },
    );
    let attest = |node: &str| {
        let payload = serde_json::json!({"cluster": "demo", "token": token(&key, node)})
            .to_string()
            .into_bytes();
        attest_with(&s.addr, s.bundle_der(), "k8s_psat", payload)
    };
    let ok = attest("node-a").await.expect("node-a attests");
    assert_eq!(ok.id, agent_id("node-a"));

    let e = attest("node-gone").await.err().expect("no Node: refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("/api/v1/nodes/node-gone") && e.message().contains("not found"),
        "{e:?}"
    );
    let e = attest("node-r").await.err().expect("other UID: refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("uid-someone-else"), "{e:?}");

    // The API server failing is "try again", not a verdict on the agent.
    api.delete_node("node-a");
    let e = attest("node-a").await.err().expect("Node deleted: refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    std::fs::write(dir.path().join("reviewer"), "wrong-token").unwrap();
    let e = attest("node-a")
        .await
        .err()
        .expect("reviewer refused: unavailable");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        !s.cli_ok(&["agent", "list"]).contains("node-gone"),
        "no agent was made for a refused attestation"
    );
}
