//! Kubernetes without a cluster: a pod attested end to end through a real cgroup and a
//! kubelet stand-in over HTTPS; k8s_psat node attestation with offline JWKS and with a
//! TokenReview stand-in; pods recorded as Engine incarnations.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use continuity_tests::agent::TestAgent;
use continuity_tests::agent_client::attest_with;
use continuity_tests::k8s_standin::{es256_jwt, https_json, issuer, sa_claims};
use continuity_tests::pod_cgroup::PodCgroup;
use continuity_tests::server::{ServerOptions, TestServer};
use tonic::Code;

const POD_UID: &str = "6f2c1a8e-9b3d-4e1f-8a2b-3c4d5e6f7a8b";
const CID: &str = "4a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
const ALIAS: &str = "spiffe://example.org/node/k8s";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn pod_list() -> serde_json::Value {
    pod_list_for(POD_UID, CID)
}

/// The payments pod with this UID and container ID.
fn pod_list_for(pod_uid: &str, cid: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "PodList", "apiVersion": "v1", "metadata": {},
        "items": [{
            "metadata": {"name": "payments-5f7d8", "namespace": "prod", "uid": pod_uid, "labels": {"app": "payments"}},
            "spec": {"serviceAccountName": "payments", "nodeName": "node-a",
                     "containers": [{"name": "app", "image": "registry.example/payments:1.4"}]},
            "status": {"phase": "Running", "containerStatuses": [{
                "name": "app", "image": "registry.example/payments:1.4", "ready": true,
                "containerID": format!("containerd://{cid}")}]}
        }]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_is_attested_through_its_cgroup_and_the_kubelet() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    s.cli_ok(&["engine", "create", "payments", "--tier", "2"]);
    s.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/ns/prod/sa/payments",
        "--parent-id",
        ALIAS,
        "--selector",
        "k8s:ns:prod",
        "--selector",
        "k8s:sa:payments",
        "--engine",
        "payments",
    ]);
    s.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/ns/other",
        "--parent-id",
        ALIAS,
        "--selector",
        "k8s:ns:other",
    ]);

    let token = "kubelet-reader-token";
    let (port, ca) = https_json(move |method, path, bearer, _| {
        if bearer != Some(token) {
            return (401, serde_json::json!({"kind": "Status", "code": 401}));
        }
        match (method, path) {
            ("GET", "/pods") => (200, pod_list()),
            _ => (404, serde_json::json!({"kind": "Status", "code": 404})),
        }
    })
    .await;
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    std::fs::write(adir.join("kubelet-ca.pem"), ca).unwrap();
    std::fs::write(adir.join("sa-token"), token).unwrap();
    let extra = format!(
        "[workload_attestors.unix]\n[workload_attestors.k8s]\nkubelet_url = \"https://127.0.0.1:{port}\"\nkubelet_ca_path = \"{}\"\ntoken_path = \"{}\"\nmax_poll_attempts = 2\npoll_retry_interval = \"100ms\"",
        adir.join("kubelet-ca.pem").display(),
        adir.join("sa-token").display()
    );
    let agent = TestAgent::start_with(&adir, &s, &s.token(Some(ALIAS)), &extra);
    let cg = PodCgroup::at(&format!("kubepods/besteffort/pod{POD_UID}/{CID}"));

    let run_in_pod = || {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/list_ids.py");
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec python3 {script} {}",
                cg.dir.display(),
                agent.endpoint()
            ))
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let ids = loop {
        let out = run_in_pod();
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "py-spiffe in the pod got nothing: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default(),
            agent
                .log()
                .lines()
                .filter(|l| l.contains("attest") || l.contains("WARN") || l.contains("ERROR"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let ids: Vec<&str> = ids.lines().collect();
    assert_eq!(
        ids,
        vec!["spiffe://example.org/ns/prod/sa/payments"],
        "only the entry whose k8s selectors match"
    );

    // The same process outside the pod cgroup gets neither entry.
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/list_ids.py"))
        .arg(agent.endpoint())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a process outside the pod has no k8s identity"
    );

    // The pod is an incarnation of the Engine, with its pod name, UID, namespace and node.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v: serde_json::Value = serde_json::from_str(&s.cli_ok(&[
            "engine",
            "incarnations",
            "payments",
            "--output",
            "json",
        ]))
        .unwrap();
        if let Some(inc) = v["incarnations"].as_array().and_then(|a| a.first()) {
            assert_eq!(inc["workload_id"], format!("pod:{POD_UID}"));
            let sel: Vec<&str> = inc["selectors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap())
                .collect();
            for want in [
                "k8s:pod-name:payments-5f7d8",
                "k8s:ns:prod",
                "k8s:node-name:node-a",
            ] {
                assert!(sel.contains(&want), "{want} in {sel:?}");
            }
            assert!(sel.contains(&format!("k8s:pod-uid:{POD_UID}").as_str()));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no incarnation recorded; agent: {}\nserver: {}",
            agent
                .log()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect::<Vec<_>>()
                .join("\n"),
            s.log()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("ncarnation"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

const VICTIM_UID: &str = "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6";
const VICTIM_CID: &str = "b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c";
const VICTIM_ID: &str = "spiffe://example.org/ns/bank/sa/vault";

fn victim_pod_list() -> serde_json::Value {
    serde_json::json!({
        "kind": "PodList", "apiVersion": "v1", "metadata": {},
        "items": [{
            "metadata": {"name": "vault-0", "namespace": "bank", "uid": VICTIM_UID},
            "spec": {"serviceAccountName": "vault", "nodeName": "node-a",
                     "containers": [{"name": "vault", "image": "registry.example/vault:1"}]},
            "status": {"phase": "Running", "containerStatuses": [{
                "name": "vault", "image": "registry.example/vault:1", "ready": true,
                "containerID": format!("containerd://{VICTIM_CID}")}]}
        }]
    })
}

/// Issue 9: an unprivileged user creates `pod<victim-uid>/<victim-cid>` cgroups in places they
/// could own (a systemd user@.service delegation, a service's subtree, or shapes the kubelet
/// never makes), moves a workload into each, and asks for the victim pod's SVID. Only the real
/// kubepods placement gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_pod_cgroup_gets_no_pod_identity() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    s.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        VICTIM_ID,
        "--parent-id",
        ALIAS,
        "--selector",
        "k8s:ns:bank",
        "--selector",
        "k8s:sa:vault",
    ]);
    let (port, ca) = https_json(|method, path, _, _| match (method, path) {
        ("GET", "/pods") => (200, victim_pod_list()),
        _ => (404, serde_json::json!({"kind": "Status", "code": 404})),
    })
    .await;
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    std::fs::write(adir.join("kubelet-ca.pem"), ca).unwrap();
    std::fs::write(adir.join("sa-token"), "t").unwrap();
    let extra = format!(
        "[workload_attestors.unix]\n[workload_attestors.k8s]\nkubelet_url = \"https://127.0.0.1:{port}\"\nkubelet_ca_path = \"{}\"\ntoken_path = \"{}\"\nmax_poll_attempts = 2\npoll_retry_interval = \"100ms\"",
        adir.join("kubelet-ca.pem").display(),
        adir.join("sa-token").display()
    );
    let agent = TestAgent::start_with(&adir, &s, &s.token(Some(ALIAS)), &extra);
    let socket = agent.socket.to_str().unwrap().to_string();
    let cli = continuity_tests::bin("continuity-agent");
    let fetch = ["api", "fetch", "x509", "--socket-path", socket.as_str()];

    // The victim's real placement (cgroupfs driver, burstable QoS) gets the victim's SVID, also
    // for a workload running as nobody: this is what the forgeries below try to obtain.
    {
        let real = PodCgroup::at(&format!("kubepods/burstable/pod{VICTIM_UID}/{VICTIM_CID}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = real.run_as(65534, &cli, &fetch);
            if out.status.success() {
                assert!(String::from_utf8_lossy(&out.stdout).contains(VICTIM_ID));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the real pod placement got nothing: {}\nagent log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    let u = VICTIM_UID.replace('-', "_");
    let delegated = "user.slice/user-1000.slice/user@1000.service";
    let forgeries = [
        format!("{delegated}/app.slice/pod{VICTIM_UID}/{VICTIM_CID}"),
        format!(
            "{delegated}/app.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{VICTIM_CID}.scope"
        ),
        format!("{delegated}/kubepods/burstable/pod{VICTIM_UID}/{VICTIM_CID}"),
        format!(
            "{delegated}/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{VICTIM_CID}.scope"
        ),
        format!("system.slice/evil.service/pod{VICTIM_UID}/{VICTIM_CID}"),
        format!("system.slice/evil.service/kubepods/pod{VICTIM_UID}/{VICTIM_CID}"),
        format!("kubepods/burstable/extra/pod{VICTIM_UID}/{VICTIM_CID}"),
        format!("kubepods/burstable/pod{VICTIM_UID}/{VICTIM_CID}/sub"),
        format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{VICTIM_CID}.scope"
        ),
    ];
    for rel in &forgeries {
        let forged = PodCgroup::at(rel);
        if rel.starts_with(delegated) {
            // Delegated as systemd does it: the user owns their subtree.
            for d in &forged.made {
                std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap();
            }
        }
        let out = forged.run_as(65534, &cli, &fetch);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            !out.status.success() && !stdout.contains(VICTIM_ID),
            "a workload in the forged cgroup {rel} got the victim's SVID: {stdout}"
        );
        assert!(
            stderr.contains("PermissionDenied"),
            "{rel}: want PermissionDenied, got: {stderr}"
        );
    }
}

/// A process killed and reaped on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Issue 9 follow-up: containerd gives the non-privileged agent pod a private cgroup namespace
/// on cgroup v2, so the agent sees its neighbours as `0::/../../pod<uid>/<id>`. Here the agent
/// runs in its own pod cgroup (`kubepods/besteffort/pod<agent>/<container>`) inside a new
/// cgroup namespace: a pod in the same QoS level and one in another still get their identity,
/// and a forged placement in a user's delegated subtree still gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_in_a_private_cgroup_namespace_attests_pods_next_to_it() {
    const AGENT_UID: &str = "3e4f5a6b-7c8d-4e9f-a0b1-c2d3e4f5a6b7";
    const AGENT_CID: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";
    // Not the other tests' pods: tests run in parallel and may share a cgroup hierarchy.
    const POD_UID: &str = "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d";
    const CID: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    s.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/ns/prod/sa/payments",
        "--parent-id",
        ALIAS,
        "--selector",
        "k8s:ns:prod",
        "--selector",
        "k8s:sa:payments",
    ]);
    let (port, ca) = https_json(|method, path, _, _| match (method, path) {
        ("GET", "/pods") => (200, pod_list_for(POD_UID, CID)),
        _ => (404, serde_json::json!({"kind": "Status", "code": 404})),
    })
    .await;
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    std::fs::write(adir.join("kubelet-ca.pem"), ca).unwrap();
    std::fs::write(adir.join("sa-token"), "t").unwrap();
    let extra = format!(
        "[workload_attestors.unix]\n[workload_attestors.k8s]\nkubelet_url = \"https://127.0.0.1:{port}\"\nkubelet_ca_path = \"{}\"\ntoken_path = \"{}\"\nmax_poll_attempts = 2\npoll_retry_interval = \"100ms\"",
        adir.join("kubelet-ca.pem").display(),
        adir.join("sa-token").display()
    );
    let agent = TestAgent::configure(&adir, &s, &s.token(Some(ALIAS)), &extra);
    // The agent's own pod cgroup; it enters it, then a new cgroup namespace rooted there.
    let agent_cg = PodCgroup::in_v2(&format!("kubepods/besteffort/pod{AGENT_UID}/{AGENT_CID}"));
    let log = std::fs::File::create(adir.join("agent.log")).unwrap();
    let _running = KillOnDrop(
        Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$0\" && exec unshare --cgroup \"$@\"")
            .arg(agent_cg.dir.join("cgroup.procs"))
            .arg(continuity_tests::bin("continuity-agent"))
            .args(["run", "--config"])
            .arg(adir.join("agent.toml"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sh and unshare (util-linux)"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(agent.socket.exists() && agent.cli(&["healthcheck"]).status.success()) {
        assert!(
            Instant::now() < deadline,
            "agent not ready:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        agent.log().contains("private cgroup namespace"),
        "the agent did not see its namespace:\n{}",
        agent.log()
    );
    let socket = agent.socket.to_str().unwrap().to_string();
    let cli = continuity_tests::bin("continuity-agent");
    let fetch = ["api", "fetch", "x509", "--socket-path", socket.as_str()];

    // Same QoS level as the agent (`../../pod<uid>/<id>`), then another (`../../../burstable/…`).
    for rel in [
        format!("kubepods/besteffort/pod{POD_UID}/{CID}"),
        format!("kubepods/burstable/pod{POD_UID}/{CID}"),
    ] {
        let pod = PodCgroup::in_v2(&rel);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = pod.run_as(65534, &cli, &fetch);
            if out.status.success() {
                assert!(
                    String::from_utf8_lossy(&out.stdout)
                        .contains("spiffe://example.org/ns/prod/sa/payments")
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the pod at {rel} got nothing from a namespaced agent: {}\nagent log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // A user's delegated cgroups share only the root with the agent: still judged from the root.
    let u = POD_UID.replace('-', "_");
    let delegated = "user.slice/user-1001.slice/user@1001.service";
    for rel in [
        format!("{delegated}/app.slice/pod{POD_UID}/{CID}"),
        format!("{delegated}/app.slice/besteffort/pod{POD_UID}/{CID}"),
        format!(
            "{delegated}/app.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
        ),
    ] {
        let forged = PodCgroup::in_v2(&rel);
        for d in &forged.made {
            std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap();
        }
        let out = forged.run_as(65534, &cli, &fetch);
        assert!(
            !out.status.success(),
            "a workload in the forged cgroup {rel} got an SVID from a namespaced agent: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"),
            "{rel}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn psat_server(dir: &std::path::Path, cluster_toml: &str) -> TestServer {
    TestServer::start(
        &dir.join("server"),
        ServerOptions {
            extra_toml: cluster_toml.into(),
            ..Default::default()
        },
    )
}

async fn psat(s: &TestServer, cluster: &str, token: &str) -> Result<String, tonic::Status> {
    let payload = serde_json::json!({"cluster": cluster, "token": token})
        .to_string()
        .into_bytes();
    attest_with(&s.addr, s.bundle_der(), "k8s_psat", payload)
        .await
        .map(|a| a.id)
}

#[tokio::test]
async fn k8s_psat_with_the_issuer_jwks_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (key, jwks) = issuer("k1");
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
    let iss = "https://kubernetes.default.svc";
    let s = psat_server(
        dir.path(),
        &format!(
            "[node_attestors.k8s_psat.clusters.c1]\nservice_account_allow_list = [\"continuity:continuity-agent\"]\nissuer = \"{iss}\"\njwks_path = \"{}\"\n",
            dir.path().join("jwks.json").display()
        ),
    );
    let good = |node: &str| {
        es256_jwt(
            &key,
            "k1",
            &sa_claims(
                iss,
                "continuity-server",
                "continuity",
                "continuity-agent",
                node,
                now() + 600,
            ),
        )
    };
    let id = psat(&s, "c1", &good("node-uid-1")).await.unwrap();
    assert_eq!(
        id,
        "spiffe://example.org/continuity/agent/k8s_psat/c1/node-uid-1"
    );
    // A new agent pod on the same node presents a fresh token and keeps the agent ID.
    assert_eq!(psat(&s, "c1", &good("node-uid-1")).await.unwrap(), id);
    let agents: serde_json::Value =
        serde_json::from_str(&s.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    assert_eq!(agents["agents"].as_array().unwrap().len(), 1);
    assert_eq!(agents["agents"][0]["attestation_type"], "k8s_psat");

    let refused = |token: String, needle: &'static str| {
        let s = &s;
        async move {
            let e = psat(s, "c1", &token).await.unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{e}");
            assert!(
                e.message().contains(needle),
                "{needle:?} in {:?}",
                e.message()
            );
        }
    };
    refused(
        es256_jwt(
            &key,
            "k1",
            &sa_claims(
                iss,
                "someone-else",
                "continuity",
                "continuity-agent",
                "n",
                now() + 600,
            ),
        ),
        "audience",
    )
    .await;
    refused(
        es256_jwt(
            &key,
            "k1",
            &sa_claims(
                iss,
                "continuity-server",
                "continuity",
                "continuity-agent",
                "n",
                now() - 600,
            ),
        ),
        "expired",
    )
    .await;
    refused(
        es256_jwt(
            &key,
            "k1",
            &sa_claims(
                iss,
                "continuity-server",
                "default",
                "default",
                "n",
                now() + 600,
            ),
        ),
        "not allowed",
    )
    .await;
    let (other, _) = issuer("k1");
    refused(
        es256_jwt(
            &other,
            "k1",
            &sa_claims(
                iss,
                "continuity-server",
                "continuity",
                "continuity-agent",
                "n",
                now() + 600,
            ),
        ),
        "signature",
    )
    .await;
    refused(
        es256_jwt(
            &key,
            "k1",
            &sa_claims(
                "https://evil.example",
                "continuity-server",
                "continuity",
                "continuity-agent",
                "n",
                now() + 600,
            ),
        ),
        "issuer",
    )
    .await;
    let e = psat(&s, "c9", &good("n")).await.unwrap_err();
    assert!(e.message().contains("not configured"), "{e}");
}

#[tokio::test]
async fn k8s_psat_with_a_token_review_stand_in() {
    let dir = tempfile::tempdir().unwrap();
    // Projected-token-shaped JWTs (the server checks shape and claims before it asks the API
    // server); the stand-in answers by the kid, which names the case.
    let (key, _) = issuer("k");
    let jwt = |case: &str| {
        es256_jwt(
            &key,
            case,
            &sa_claims(
                "https://k",
                "continuity-server",
                "continuity",
                "continuity-agent",
                "node-uid-2",
                now() + 600,
            ),
        )
    };
    let (good, bogus, wrong_aud, wrong_sa) =
        (jwt("good"), jwt("bogus"), jwt("wrong-aud"), jwt("wrong-sa"));
    let case_of = |token: &str| -> String {
        use base64::Engine;
        let h = token.split('.').next().unwrap_or_default();
        let h = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(h)
            .unwrap_or_default();
        let h: serde_json::Value = serde_json::from_slice(&h).unwrap_or_default();
        h["kid"].as_str().unwrap_or_default().to_string()
    };
    let (port, ca) = https_json(move |method, path, bearer, body| {
        assert_eq!((method, path), ("POST", "/apis/authentication.k8s.io/v1/tokenreviews"));
        assert_eq!(bearer, Some("reviewer-token"));
        let req: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(req["kind"], "TokenReview");
        let token = case_of(req["spec"]["token"].as_str().unwrap());
        let (ok, user, aud) = match token.as_str() {
            "good" => (true, "system:serviceaccount:continuity:continuity-agent", "continuity-server"),
            "wrong-aud" => (true, "system:serviceaccount:continuity:continuity-agent", "api"),
            "wrong-sa" => (true, "system:serviceaccount:default:default", "continuity-server"),
            _ => (false, "", ""),
        };
        let status = if ok {
            serde_json::json!({"authenticated": true, "audiences": [aud], "user": {"username": user, "uid": "u",
                "groups": ["system:serviceaccounts"], "extra": {
                    "authentication.kubernetes.io/pod-name": ["continuity-agent-x7"],
                    "authentication.kubernetes.io/pod-uid": ["pod-uid-1"],
                    "authentication.kubernetes.io/node-name": ["node-b"],
                    "authentication.kubernetes.io/node-uid": ["node-uid-2"]}}})
        } else {
            serde_json::json!({"authenticated": false, "error": "invalid bearer token"})
        };
        (201, serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": req["spec"], "status": status}))
    })
    .await;
    std::fs::write(dir.path().join("api-ca.pem"), ca).unwrap();
    std::fs::write(dir.path().join("reviewer"), "reviewer-token").unwrap();
    let s = psat_server(
        dir.path(),
        &format!(
            "[node_attestors.k8s_psat.clusters.c2]\nservice_account_allow_list = [\"continuity:continuity-agent\"]\ntoken_review_api_server = \"https://127.0.0.1:{port}\"\ntoken_review_ca_path = \"{}\"\ntoken_review_token_path = \"{}\"\n",
            dir.path().join("api-ca.pem").display(),
            dir.path().join("reviewer").display()
        ),
    );
    assert_eq!(
        psat(&s, "c2", &good).await.unwrap(),
        "spiffe://example.org/continuity/agent/k8s_psat/c2/node-uid-2"
    );
    for (token, needle) in [
        (&bogus, "invalid bearer token"),
        (&wrong_aud, "audience"),
        (&wrong_sa, "not allowed"),
    ] {
        let e = psat(&s, "c2", token).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(
            e.message().contains(needle),
            "{needle:?} in {:?}",
            e.message()
        );
    }
}

#[test]
fn an_agent_attests_with_its_projected_token_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (key, jwks) = issuer("k1");
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
    let s = psat_server(
        dir.path(),
        &format!(
            "[node_attestors.k8s_psat.clusters.c1]\nservice_account_allow_list = [\"continuity:continuity-agent\"]\njwks_path = \"{}\"\n",
            dir.path().join("jwks.json").display()
        ),
    );
    let node_agent = "spiffe://example.org/continuity/agent/k8s_psat/c1/node-uid-9";
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    s.create_entry(
        "spiffe://example.org/on-node",
        node_agent,
        &[&format!("unix:uid:{uid}")],
    );
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    let token = es256_jwt(
        &key,
        "k1",
        &sa_claims(
            "https://k",
            "continuity-server",
            "continuity",
            "continuity-agent",
            "node-uid-9",
            now() + 600,
        ),
    );
    std::fs::write(adir.join("psat"), token).unwrap();
    let extra = format!(
        "[node_attestors.k8s_psat]\ncluster = \"c1\"\ntoken_path = \"{}\"",
        adir.join("psat").display()
    );
    let agent = TestAgent::start_with(&adir, &s, "", &extra);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&agent.cli(&["api", "fetch", "x509"]).stdout)
        .contains("spiffe://example.org/on-node")
    {
        assert!(Instant::now() < deadline, "agent log:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_psat_with_keys_found_by_oidc_discovery() {
    let dir = tempfile::tempdir().unwrap();
    let (key, jwks) = issuer("oidc-k1");
    let port_cell = std::sync::Arc::new(std::sync::OnceLock::<u16>::new());
    let pc = port_cell.clone();
    let (port, ca) = https_json(move |method, path, _, _| {
        let base = format!(
            "https://127.0.0.1:{}",
            pc.get().copied().unwrap_or_default()
        );
        match (method, path) {
            ("GET", "/.well-known/openid-configuration") => (
                200,
                serde_json::json!({"issuer": base, "jwks_uri": format!("{base}/keys")}),
            ),
            ("GET", "/keys") => (200, jwks.clone()),
            _ => (404, serde_json::json!({})),
        }
    })
    .await;
    port_cell.set(port).unwrap();
    std::fs::write(dir.path().join("oidc-ca.pem"), ca).unwrap();
    let iss = format!("https://127.0.0.1:{port}");
    let s = psat_server(
        dir.path(),
        &format!(
            "[node_attestors.k8s_psat.clusters.c3]\nservice_account_allow_list = [\"continuity:continuity-agent\"]\noidc_discovery_url = \"{iss}\"\noidc_ca_path = \"{}\"\nissuer = \"{iss}\"\n",
            dir.path().join("oidc-ca.pem").display()
        ),
    );
    let token = es256_jwt(
        &key,
        "oidc-k1",
        &sa_claims(
            &iss,
            "continuity-server",
            "continuity",
            "continuity-agent",
            "node-uid-3",
            now() + 600,
        ),
    );
    assert_eq!(
        psat(&s, "c3", &token).await.unwrap(),
        "spiffe://example.org/continuity/agent/k8s_psat/c3/node-uid-3"
    );
    let (other, _) = issuer("oidc-k1");
    let forged = es256_jwt(
        &other,
        "oidc-k1",
        &sa_claims(
            &iss,
            "continuity-server",
            "continuity",
            "continuity-agent",
            "node-uid-3",
            now() + 600,
        ),
    );
    assert_eq!(
        psat(&s, "c3", &forged).await.unwrap_err().code(),
        Code::PermissionDenied
    );
}
