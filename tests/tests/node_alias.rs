//! Node alias entries (SPIRE's `entry create -node`) with real agents attested by k8s_psat,
//! and the pod-friendly unix attestor default.
//!
//! - Two agents of cluster `demo` (different nodes) both receive and get signed the SVID of a
//!   workload entry parented to a `--node --selector k8s_psat:cluster:demo` entry; an agent of
//!   cluster `other` does not. A node entry that also names one node's `agent_node_name`
//!   authorizes only that node's agent; deleting it takes the workload away again.
//! - `agent show` lists an agent's node selectors.
//! - An agent without CAP_SYS_PTRACE (as in a pod) attests a process of another uid through the
//!   k8s workload attestor with the default config; with `discover_workload_path = true` it
//!   cannot (it would need that process's `/proc/<pid>/exe`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use continuity_tests::agent::TestAgent;
use continuity_tests::k8s_standin::{es256_jwt, https_json, issuer, sa_claims};
use continuity_tests::pod_cgroup::PodCgroup;
use continuity_tests::server::{ServerOptions, TestServer};

const DEMO_ALIAS: &str = "spiffe://example.org/k8s/demo";
const NODE_A_ALIAS: &str = "spiffe://example.org/k8s/demo/node-a";
const WEB: &str = "spiffe://example.org/ns/prod/sa/web";
const ONLY_A: &str = "spiffe://example.org/only-on-node-a";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn uid() -> u32 {
    continuity_tests::uid()
}

/// Starts an agent attesting with a projected token of `cluster` for node `node` (UID
/// `uid-<node>`), signed by `key`.
fn psat_agent(
    dir: &Path,
    s: &TestServer,
    key: &aws_lc_rs::signature::EcdsaKeyPair,
    cluster: &str,
    node: &str,
) -> TestAgent {
    let adir = dir.join(format!("agent-{cluster}-{node}"));
    std::fs::create_dir_all(&adir).unwrap();
    let mut claims = sa_claims(
        "https://k",
        "continuity-server",
        "continuity",
        "continuity-agent",
        &format!("uid-{node}"),
        now() + 600,
    );
    claims["kubernetes.io"]["node"]["name"] = node.into();
    std::fs::write(adir.join("psat"), es256_jwt(key, "k1", &claims)).unwrap();
    let extra = format!(
        "[node_attestors.k8s_psat]\ncluster = \"{cluster}\"\ntoken_path = \"{}\"",
        adir.join("psat").display()
    );
    TestAgent::start_with(&adir, s, "", &extra)
}

/// The SPIFFE IDs `api fetch x509` gives this process from `agent` (empty when none).
fn ids(agent: &TestAgent) -> String {
    String::from_utf8_lossy(&agent.cli(&["api", "fetch", "x509"]).stdout).to_string()
}

/// Waits until `agent` serves `id` to this process.
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

/// Waits until `agent` no longer serves `id`.
fn wait_gone(agent: &TestAgent, id: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ids(agent).contains(id) {
        assert!(
            Instant::now() < deadline,
            "{what}: {id} still served; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn node_entry(s: &TestServer, spiffe_id: &str, selectors: &[&str]) -> String {
    let mut args = vec!["entry", "create", "--node", "--spiffe-id", spiffe_id];
    for sel in selectors {
        args.extend(["--selector", sel]);
    }
    args.extend(["--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&s.cli_ok(&args)).unwrap();
    assert_eq!(
        v["parent_id"], "spiffe://example.org/continuity/server",
        "a node entry is parented to the server: {v}"
    );
    v["id"].as_str().unwrap().to_string()
}

#[test]
fn a_node_alias_entry_reaches_every_agent_of_the_cluster_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let (key, jwks) = issuer("k1");
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
    let mut clusters = String::new();
    for c in ["demo", "other"] {
        clusters.push_str(&format!(
            "[node_attestors.k8s_psat.clusters.{c}]\nservice_account_allow_list = [\"continuity:continuity-agent\"]\njwks_path = \"{}\"\n",
            dir.path().join("jwks.json").display()
        ));
    }
    let s = TestServer::start(
        &dir.path().join("server"),
        ServerOptions {
            extra_toml: clusters,
            ..Default::default()
        },
    );

    // A node entry must name a cluster and use only k8s_psat node selectors.
    for bad in [
        vec!["k8s_psat:agent_ns:continuity"],
        vec!["k8s_psat:cluster:demo", "unix:uid:0"],
        vec!["k8s_psat:cluster:demo", "k8s_psat:nonsense:x"],
    ] {
        let mut args = vec!["entry", "create", "--node", "--spiffe-id", DEMO_ALIAS];
        for sel in &bad {
            args.extend(["--selector", sel]);
        }
        let out = s.cli(&args);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("node entry"),
            "{bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let a = psat_agent(dir.path(), &s, &key, "demo", "node-a");
    let b = psat_agent(dir.path(), &s, &key, "demo", "node-b");
    let c = psat_agent(dir.path(), &s, &key, "other", "node-c");
    let agent_id =
        |cl: &str, n: &str| format!("spiffe://example.org/continuity/agent/k8s_psat/{cl}/uid-{n}");

    // agent show lists the node selectors from attestation.
    let shown: serde_json::Value = serde_json::from_str(&s.cli_ok(&[
        "agent",
        "show",
        "--spiffe-id",
        &agent_id("demo", "node-a"),
        "--output",
        "json",
    ]))
    .unwrap();
    let sel: Vec<&str> = shown["selectors"]
        .as_array()
        .unwrap_or_else(|| panic!("no selectors in {shown}"))
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for want in [
        "k8s_psat:cluster:demo",
        "k8s_psat:agent_ns:continuity",
        "k8s_psat:agent_sa:continuity-agent",
        "k8s_psat:agent_node_name:node-a",
        "k8s_psat:agent_node_uid:uid-node-a",
    ] {
        assert!(sel.contains(&want), "{want} in {sel:?}");
    }
    let text = s.cli_ok(&["agent", "show", "--spiffe-id", &agent_id("demo", "node-a")]);
    assert!(text.contains("k8s_psat:agent_node_name:node-a"), "{text}");

    // The workload entry first, the node entry after it: the node entry's arrival (not the
    // workload entry's) is what brings the workload to agents that already synced.
    let me = format!("unix:uid:{}", uid());
    s.create_entry(WEB, DEMO_ALIAS, &[&me]);
    let own_c = "spiffe://example.org/own-of-c";
    s.create_entry(own_c, &agent_id("other", "node-c"), &[&me]);
    wait_for(&c, own_c, "agent of cluster other, own entry");
    assert!(!ids(&a).contains(WEB), "no node entry yet: {}", ids(&a));
    let demo = node_entry(&s, DEMO_ALIAS, &["k8s_psat:cluster:demo"]);
    wait_for(&a, WEB, "agent on node-a of demo");
    wait_for(&b, WEB, "agent on node-b of demo");

    // The agent of cluster other: synced past both entries (it gets a later entry of its own),
    // never the workload (the registry test checks that its SVID requests are refused too).
    let own_c2 = "spiffe://example.org/own-of-c-2";
    s.create_entry(own_c2, &agent_id("other", "node-c"), &[&me]);
    wait_for(&c, own_c2, "agent of cluster other, later entry");
    assert!(
        !ids(&c).contains(WEB),
        "an agent of another cluster got the demo workload: {}",
        ids(&c)
    );

    // A node entry with one node's name authorizes only that node's agent.
    node_entry(
        &s,
        NODE_A_ALIAS,
        &["k8s_psat:cluster:demo", "k8s_psat:agent_node_name:node-a"],
    );
    s.create_entry(ONLY_A, NODE_A_ALIAS, &[&me]);
    wait_for(&a, ONLY_A, "agent on node-a, node-a alias");
    let later = "spiffe://example.org/ns/prod/sa/later";
    s.create_entry(later, DEMO_ALIAS, &[&me]);
    wait_for(&b, later, "agent on node-b, later demo entry");
    assert!(
        !ids(&b).contains(ONLY_A),
        "node-b got node-a's workload: {}",
        ids(&b)
    );

    // Deleting the cluster-wide node entry takes its workloads from both agents; node-a keeps
    // what its own node entry gives it.
    s.cli_ok(&["entry", "delete", "--id", &demo]);
    wait_gone(&a, WEB, "agent on node-a after the node entry was deleted");
    wait_gone(&b, WEB, "agent on node-b after the node entry was deleted");
    assert!(ids(&a).contains(ONLY_A), "{}", ids(&a));
}

const POD_UID: &str = "3e9a7c51-0b2d-4f6e-9a18-c2d4e6f80a1b";
const CID: &str = "5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b";
const POD_ID: &str = "spiffe://example.org/ns/shop/sa/cart";
const ALIAS: &str = "spiffe://example.org/node/pod-default";

fn pod_list() -> serde_json::Value {
    serde_json::json!({
        "kind": "PodList", "apiVersion": "v1", "metadata": {},
        "items": [{
            "metadata": {"name": "cart-7d9f", "namespace": "shop", "uid": POD_UID, "labels": {}},
            "spec": {"serviceAccountName": "cart", "nodeName": "node-a",
                     "containers": [{"name": "app", "image": "registry.example/cart:2"}]},
            "status": {"phase": "Running", "containerStatuses": [{
                "name": "app", "image": "registry.example/cart:2", "ready": true,
                "containerID": format!("containerd://{CID}")}]}
        }]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_of_another_uid_is_attested_by_an_agent_without_ptrace_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    s.create_entry(POD_ID, ALIAS, &["k8s:ns:shop", "k8s:sa:cart"]);
    let (port, ca) = https_json(|method, path, _, _| match (method, path) {
        ("GET", "/pods") => (200, pod_list()),
        _ => (404, serde_json::json!({"kind": "Status", "code": 404})),
    })
    .await;
    let start = |name: &str, unix: &str| {
        let adir = dir.path().join(name);
        std::fs::create_dir_all(&adir).unwrap();
        std::fs::write(adir.join("kubelet-ca.pem"), &ca).unwrap();
        std::fs::write(adir.join("sa-token"), "t").unwrap();
        let extra = format!(
            "[workload_attestors.unix]\n{unix}[workload_attestors.k8s]\nkubelet_url = \"https://127.0.0.1:{port}\"\nkubelet_ca_path = \"{}\"\ntoken_path = \"{}\"\nmax_poll_attempts = 2\npoll_retry_interval = \"100ms\"",
            adir.join("kubelet-ca.pem").display(),
            adir.join("sa-token").display()
        );
        TestAgent::start_without_ptrace(&adir, &s, &s.token(Some(ALIAS)), &extra)
    };
    let cli = continuity_tests::bin("continuity-agent");
    let pod = PodCgroup::at(&format!("kubepods/besteffort/pod{POD_UID}/{CID}"));

    // The default config: the workload (uid 65534, the agent root without CAP_SYS_PTRACE) is
    // attested through its cgroup and the kubelet, and gets its SVID.
    let agent = start("agent-default", "");
    let socket = agent.socket.to_str().unwrap().to_string();
    let fetch = ["api", "fetch", "x509", "--socket-path", socket.as_str()];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = pod.run_as(65534, &cli, &fetch);
        if out.status.success() {
            let got = String::from_utf8_lossy(&out.stdout);
            assert!(got.contains(POD_ID), "{got}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a pod of another uid got nothing with the default config: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The old default, for contrast: the same agent with discover_workload_path = true needs
    // /proc/<pid>/exe of that process, which it cannot read, so the pod gets nothing.
    // A process of the agent's own uid and capabilities in the pod shows the agent synced and
    // attests pods.
    let strict = start("agent-path", "discover_workload_path = true\n");
    let socket = strict.socket.to_str().unwrap().to_string();
    let fetch = ["api", "fetch", "x509", "--socket-path", socket.as_str()];
    let cli_str = cli.to_str().unwrap();
    let own = [
        "--bounding-set=-sys_ptrace",
        "--inh-caps=-sys_ptrace",
        cli_str,
        "api",
        "fetch",
        "x509",
        "--socket-path",
        socket.as_str(),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pod.run_as(0, Path::new("setpriv"), &own).status.success() {
        assert!(
            Instant::now() < deadline,
            "the agent's own uid in the pod got nothing:\n{}",
            strict.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..5 {
        let out = pod.run_as(65534, &cli, &fetch);
        assert!(
            !out.status.success(),
            "discover_workload_path = true without CAP_SYS_PTRACE attested another uid: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let log = strict.log();
    assert!(
        log.contains("could not be recorded when it connected"),
        "the refusal names the executable it could not read:\n{log}"
    );
}
