#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]
//! The registration controller against an API-server stand-in speaking the real list and
//! watch JSON over HTTPS: ClusterSPIFFEIDs and pods become entries, deletions remove them,
//! IDs follow the templates, operator entries are left alone, and watches that end or expire
//! (410 Gone) are resumed without losing or duplicating entries.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use continuity_tests::cluster::{Cluster, ClusterOptions};
use continuity_tests::kube_api::{CLUSTER_SPIFFE_IDS, KubeApi, NAMESPACES, PODS, TOKEN};
use continuity_tests::server::{ServerOptions, TestServer};
use serde_json::{Value, json};

const ALIAS: &str = "spiffe://example.org/node/k8s/demo";
const OWNER: &str = "k8s-controller/demo/";

fn namespace(name: &str, team: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": {"team": team}}})
}

fn pod(ns: &str, name: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": uid(name), "labels": {"app": app}},
           "spec": {"serviceAccountName": format!("{app}-sa"), "nodeName": "node-a",
                    "containers": [{"name": "app", "image": "registry.example/app:1"}]},
           "status": {"phase": "Running"}})
}

fn uid(pod: &str) -> String {
    format!("uid-{pod}")
}

fn resource(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "continuity.dev/v1alpha1", "kind": "ClusterSPIFFEID",
           "metadata": {"name": name, "uid": format!("csid-{name}")}, "spec": spec})
}

fn web_resource() -> Value {
    resource(
        "web",
        json!({
            "spiffeIDTemplate": "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}",
            "podSelector": {"matchLabels": {"app": "web"}},
            "namespaceSelector": {"matchLabels": {"team": "a"}},
            "dnsNameTemplates": ["{{ .PodMeta.Name }}.{{ .PodMeta.Namespace }}.svc"]
        }),
    )
}

/// The `[controller]` table pointing at `api` (its CA and token written under `dir`).
fn controller_toml(dir: &Path, api: &KubeApi) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let (ca, token) = (dir.join("kube-ca.pem"), dir.join("kube-token"));
    std::fs::write(&ca, &api.ca_pem).unwrap();
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    format!(
        "[controller]\napi_server = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\ncluster_name = \"demo\"\nnode_alias_id = \"{ALIAS}\"\n",
        api.port,
        ca.display(),
        token.display()
    )
}

/// A server whose `[controller]` points at `api`.
fn server(dir: &Path, api: &KubeApi) -> TestServer {
    TestServer::start(
        dir,
        ServerOptions {
            extra_toml: controller_toml(dir, api),
            ..ServerOptions::default()
        },
    )
}

/// Every entry, by id.
fn entries(s: &TestServer) -> Vec<Value> {
    let out: Value =
        serde_json::from_str(&s.cli_ok(&["entry", "show", "--output", "json"])).unwrap();
    out["entries"].as_array().unwrap().clone()
}

/// The SPIFFE ID resource `resource` of these tests gives `pod`.
fn id_of(resource: &str, pod: &str) -> String {
    match resource {
        "web" => "spiffe://example.org/ns/shop/sa/web-sa".into(),
        "by-label" => format!("spiffe://example.org/demo/app/db/{pod}"),
        other => panic!("no resource {other} in these tests"),
    }
}

/// The key of `owned` for `resource`'s entry for `pod`.
fn k(resource: &str, pod: &str) -> (String, String) {
    (id_of(resource, pod), uid(pod))
}

/// Whether `e` is the controller's node alias entry (checked to be exactly what it should be).
fn is_node_alias(e: &Value) -> bool {
    if e["spiffe_id"] != ALIAS {
        return false;
    }
    assert_eq!(
        e["parent_id"], "spiffe://example.org/continuity/server",
        "{e}"
    );
    assert_eq!(
        e["selectors"],
        json!([{"type": "k8s_psat", "value": "cluster:demo"}]),
        "{e}"
    );
    true
}

/// The controller's workload entries: (SPIFFE ID, pod UID) → entry (panics on two for one
/// pod). Every one is marked by its id, never by a hint workloads would see.
fn owned(s: &TestServer) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for e in entries(s) {
        if !e["id"].as_str().unwrap().starts_with(OWNER) || is_node_alias(&e) {
            continue;
        }
        assert_eq!(e["hint"], "", "no ownership mark in the hint: {e}");
        let pod = e["selectors"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|sel| sel["value"].as_str().unwrap().strip_prefix("pod-uid:"))
            .expect("a controller entry names its pod")
            .to_string();
        let key = (e["spiffe_id"].as_str().unwrap().to_string(), pod.clone());
        let old = out.insert(key, e);
        assert!(old.is_none(), "two controller entries for pod {pod}");
    }
    out
}

/// Polls until the controller's entries are, by (resource, pod UID), exactly `want`.
fn wait_for(
    s: &TestServer,
    want: &[(&str, &str)],
    limit: Duration,
    what: &str,
) -> BTreeMap<(String, String), Value> {
    let want: Vec<(String, String)> = want.iter().map(|(r, p)| k(r, p)).collect();
    let mut want = want;
    want.sort();
    let start = Instant::now();
    loop {
        let got = owned(s);
        if got.keys().cloned().collect::<Vec<_>>() == want {
            return got;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: after {limit:?} the controller's entries are {:?}, want {want:?}\n{}",
            got.keys().collect::<Vec<_>>(),
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the controller has listed and is watching all three collections.
fn wait_watching(api: &KubeApi, s: &TestServer) {
    let start = Instant::now();
    while api.open_watches() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the controller never watched pods, namespaces and ClusterSPIFFEIDs; requests: {:?}\n{}",
            api.requests(),
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count(api: &KubeApi, prefix: &str) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.starts_with(prefix))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_and_pods_become_entries_and_deletions_remove_them() {
    let d = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    api.put(NAMESPACES, namespace("shop", "a"));
    api.put(NAMESPACES, namespace("other", "b"));
    for (ns, name, app) in [
        ("shop", "web-1", "web"),
        ("shop", "web-2", "web"),
        ("shop", "db-1", "db"),
        ("other", "web-3", "web"),
    ] {
        api.put(PODS, pod(ns, name, app));
    }
    let mut finished = pod("shop", "web-done", "web");
    finished["status"]["phase"] = json!("Succeeded");
    api.put(PODS, finished);
    let s = server(d.path(), &api);
    // An operator's entry under the same parent, with a hint that is not the controller's.
    let operator = s.create_entry(
        "spiffe://example.org/ns/shop/sa/web-sa",
        ALIAS,
        &["k8s:ns:shop", "k8s:pod-label:app:web"],
    );
    wait_watching(&api, &s);
    assert!(
        api.requests()
            .iter()
            .all(|r| !r.contains("watch=true") || r.contains("resourceVersion=")),
        "every watch starts from a list's resourceVersion: {:?}",
        api.requests()
    );

    api.put(CLUSTER_SPIFFE_IDS, web_resource());
    api.put(
        CLUSTER_SPIFFE_IDS,
        resource(
            "by-label",
            json!({
                "spiffeIDTemplate": "spiffe://{{ .TrustDomain }}/{{ .ClusterName }}/app/{{ index .PodMeta.Labels \"app\" }}/{{ .PodMeta.Name }}",
                "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]}
            }),
        ),
    );
    // A template the controller cannot render makes no entry and does not stop the others.
    api.put(
        CLUSTER_SPIFFE_IDS,
        resource(
            "broken",
            json!({"spiffeIDTemplate": "spiffe://{{ .TrustDomain }}/{{ .PodMeta.Secret }}"}),
        ),
    );
    let got = wait_for(
        &s,
        &[("by-label", "db-1"), ("web", "web-1"), ("web", "web-2")],
        Duration::from_secs(2),
        "two resources and their matching live pods",
    );
    let web1 = &got[&k("web", "web-1")];
    assert_eq!(web1["spiffe_id"], "spiffe://example.org/ns/shop/sa/web-sa");
    assert_eq!(web1["parent_id"], ALIAS);
    assert_eq!(web1["dns_names"], json!(["web-1.shop.svc"]));
    let mut selectors: Vec<String> = web1["selectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}:{}",
                s["type"].as_str().unwrap(),
                s["value"].as_str().unwrap()
            )
        })
        .collect();
    selectors.sort();
    assert_eq!(
        selectors,
        [
            "k8s:ns:shop",
            format!("k8s:pod-uid:{}", uid("web-1")).as_str()
        ]
    );
    let db = &got[&k("by-label", "db-1")];
    assert_eq!(db["spiffe_id"], "spiffe://example.org/demo/app/db/db-1");
    assert_eq!(
        web1["engine"], "",
        "no Engine unless the resource names one"
    );
    let web1_id = web1["id"].as_str().unwrap().to_string();

    // A new pod is registered; a deleted pod's entry goes; the others keep their ids.
    api.put(PODS, pod("shop", "web-4", "web"));
    api.delete(PODS, "shop", "web-2");
    let got = wait_for(
        &s,
        &[("by-label", "db-1"), ("web", "web-1"), ("web", "web-4")],
        Duration::from_secs(2),
        "web-2 deleted, web-4 added",
    );
    assert_eq!(got[&k("web", "web-1")]["id"], web1_id.as_str());

    // Editing the resource updates its entries in place.
    let mut edited = web_resource();
    edited["spec"]["dnsNameTemplates"] = json!(["{{ .PodMeta.Name }}.internal"]);
    api.put(CLUSTER_SPIFFE_IDS, edited);
    let start = Instant::now();
    loop {
        let e = &owned(&s)[&k("web", "web-1")];
        if e["dns_names"] == json!(["web-1.internal"]) {
            assert_eq!(e["id"], web1_id.as_str(), "an update keeps the entry");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "DNS names never updated: {e}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Binding the resource to an Engine binds its entries; an Engine that does not exist
    // makes no entry (the registry's rules apply) rather than a dangling binding.
    s.cli_ok(&["engine", "create", "shopfront", "--tier", "1"]);
    let mut bound = web_resource();
    bound["spec"]["dnsNameTemplates"] = json!(["{{ .PodMeta.Name }}.internal"]);
    bound["spec"]["engine"] = json!("shopfront");
    api.put(CLUSTER_SPIFFE_IDS, bound.clone());
    let start = Instant::now();
    while owned(&s)[&k("web", "web-1")]["engine"] != "shopfront" {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "Engine binding never applied"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    bound["spec"]["engine"] = json!("no-such-engine");
    api.put(CLUSTER_SPIFFE_IDS, bound);
    wait_for(
        &s,
        &[("by-label", "db-1")],
        Duration::from_secs(10),
        "unknown Engine",
    );
    api.put(CLUSTER_SPIFFE_IDS, web_resource());
    wait_for(
        &s,
        &[("by-label", "db-1"), ("web", "web-1"), ("web", "web-4")],
        Duration::from_secs(10),
        "Engine binding removed",
    );

    // A namespace relabelled out of the selector takes its pods' entries with it.
    api.put(NAMESPACES, namespace("shop", "z"));
    wait_for(
        &s,
        &[("by-label", "db-1")],
        Duration::from_secs(2),
        "namespace no longer selected",
    );
    api.put(NAMESPACES, namespace("shop", "a"));
    wait_for(
        &s,
        &[("by-label", "db-1"), ("web", "web-1"), ("web", "web-4")],
        Duration::from_secs(2),
        "namespace selected again",
    );

    // Deleting the resources removes every entry they made, and only those.
    api.delete(CLUSTER_SPIFFE_IDS, "", "web");
    api.delete(CLUSTER_SPIFFE_IDS, "", "by-label");
    wait_for(&s, &[], Duration::from_secs(2), "resources deleted");
    let left: Vec<String> = entries(&s)
        .iter()
        .filter(|e| !is_node_alias(e))
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, [operator], "the operator's entry is untouched");
    // The node alias entry stays while the controller runs, marked by its id.
    let alias: Vec<Value> = entries(&s).into_iter().filter(is_node_alias).collect();
    assert_eq!(alias.len(), 1, "{alias:?}");
    assert!(
        alias[0]["id"].as_str().unwrap().starts_with(OWNER),
        "{alias:?}"
    );
    assert_eq!(alias[0]["hint"], "");
    let audit = s.cli_ok(&["audit", "show", "--output", "json"]);
    assert!(
        audit.contains("\"controller\""),
        "controller writes are audited: {audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_that_end_or_expire_are_resumed_without_losing_or_duplicating_entries() {
    let d = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    api.put(NAMESPACES, namespace("shop", "a"));
    api.put(PODS, pod("shop", "web-1", "web"));
    api.put(PODS, pod("shop", "web-2", "web"));
    api.put(CLUSTER_SPIFFE_IDS, web_resource());
    let s = server(d.path(), &api);
    let got = wait_for(
        &s,
        &[("web", "web-1"), ("web", "web-2")],
        Duration::from_secs(10),
        "initial",
    );
    wait_watching(&api, &s);
    let web1_id = got[&k("web", "web-1")]["id"].clone();
    let lists = || {
        api.requests()
            .iter()
            .filter(|r| r.starts_with(&format!("GET {PODS}")) && !r.contains("watch=true"))
            .count()
    };
    assert_eq!(lists(), 1, "{:?}", api.requests());

    // The watch ends, and changes happen before the controller is watching again: it resumes
    // from the last resourceVersion it saw and gets them from the history, without a list.
    api.refuse_watches(true);
    api.end_watches();
    api.put(PODS, pod("shop", "web-3", "web"));
    api.delete(PODS, "shop", "web-2");
    let refused_before = count(&api, &format!("GET {PODS}?watch=true"));
    let start = Instant::now();
    while count(&api, &format!("GET {PODS}?watch=true")) == refused_before {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no new pod watch: {:?}",
            api.requests()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    api.refuse_watches(false);
    let got = wait_for(
        &s,
        &[("web", "web-1"), ("web", "web-3")],
        Duration::from_secs(10),
        "after a resumed watch",
    );
    assert_eq!(got[&k("web", "web-1")]["id"], web1_id);
    assert_eq!(
        lists(),
        1,
        "a watch that ends is resumed, not re-listed: {:?}",
        api.requests()
    );

    // The history is compacted while the controller is away: its resume gets 410 Gone, so it
    // lists again and reconciles to exactly the current pods.
    api.refuse_watches(true);
    api.end_watches();
    api.put(PODS, pod("shop", "web-5", "web"));
    api.delete(PODS, "shop", "web-1");
    api.compact();
    api.refuse_watches(false);
    let got = wait_for(
        &s,
        &[("web", "web-3"), ("web", "web-5")],
        Duration::from_secs(10),
        "after 410 Gone",
    );
    assert_eq!(
        lists(),
        2,
        "410 Gone makes the controller list again: {:?}",
        api.requests()
    );
    assert_eq!(got.len(), 2);
    wait_watching(&api, &s);
    // Still exactly these two once the dust settles (nothing created twice by the re-list).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        owned(&s).keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    assert!(s.log().contains("410"), "the server logs the expiry");
}

/// Whether server `s` has logged that it took the controller's lease.
fn leads(s: &TestServer) -> bool {
    s.log().contains("controller: leading")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_servers_one_controller_writes_and_the_other_takes_over_when_it_dies() {
    let d = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    api.put(NAMESPACES, namespace("shop", "a"));
    api.put(PODS, pod("shop", "web-1", "web"));
    api.put(PODS, pod("shop", "web-2", "web"));
    api.put(CLUSTER_SPIFFE_IDS, web_resource());
    let mut opts = ClusterOptions::on(&continuity_tests::postgres::database());
    opts.extra_toml = controller_toml(&d.path().join("kube"), &api);
    // [cluster] lease_ttl = 10s for both servers (set by Cluster).
    let mut c = Cluster::launch(d.path(), 2, &opts);

    // Both servers run the controller (six watches: three collections each)...
    let start = Instant::now();
    while api.open_watches() < 6 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "both controllers must watch; requests: {:?}\n{}",
            api.requests(),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // ...but the entries are made once: `owned` panics on two entries for one pod.
    let want = [("web", "web-1"), ("web", "web-2")];
    for i in 0..2 {
        wait_for(
            c.server(i),
            &want,
            Duration::from_secs(10),
            "initial entries",
        );
    }
    // Several lease renewals later, still exactly one entry per pod, and one leader.
    std::thread::sleep(Duration::from_secs(4));
    for i in 0..2 {
        // Two pods' entries and the node alias entry, each once.
        assert_eq!(entries(c.server(i)).len(), 3, "no duplicates\n{}", c.logs());
    }
    let leaders: Vec<usize> = (0..2).filter(|&i| leads(c.server(i))).collect();
    assert_eq!(leaders.len(), 1, "exactly one leader\n{}", c.logs());
    let (leader, other) = (leaders[0], 1 - leaders[0]);
    assert!(
        c.server(other).log().contains("controller: standing by"),
        "the other server stands by\n{}",
        c.logs()
    );

    // The leader dies without releasing its lease; a new pod still gets its entry once the
    // lease expires (10 s) and the other server takes it.
    c.kill(leader);
    api.put(PODS, pod("shop", "web-3", "web"));
    api.delete(PODS, "shop", "web-1");
    let survivor = c.server(other);
    wait_for(
        survivor,
        &[("web", "web-2"), ("web", "web-3")],
        Duration::from_secs(40),
        "the surviving server took over the controller",
    );
    assert!(
        leads(survivor),
        "the survivor logs that it leads\n{}",
        survivor.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        entries(survivor).len(),
        3,
        "no duplicates after the take-over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_marked_by_hint_are_replaced_by_id_marked_ones_without_the_hint() {
    let d = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    api.put(NAMESPACES, namespace("shop", "a"));
    api.put(PODS, pod("shop", "web-1", "web"));
    let s = server(d.path(), &api);
    wait_watching(&api, &s);
    // What an older controller made: its mark in the hint, which workloads are sent.
    let old: Value = serde_json::from_str(&s.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/ns/shop/sa/web-sa",
        "--parent-id",
        ALIAS,
        "--selector",
        "k8s:ns:shop",
        "--selector",
        &format!("k8s:pod-uid:{}", uid("web-1")),
        "--dns-name",
        "web-1.shop.svc",
        "--hint",
        "k8s-controller/demo/web",
        "--output",
        "json",
    ]))
    .unwrap();
    let old_id = old["id"].as_str().unwrap().to_string();
    assert!(!old_id.starts_with(OWNER));
    // An operator's entry registering what the resource also asks for stays the operator's.
    api.put(PODS, pod("shop", "web-2", "web"));
    let operator = s.create_entry(
        "spiffe://example.org/ns/shop/sa/web-sa",
        ALIAS,
        &["k8s:ns:shop", &format!("k8s:pod-uid:{}", uid("web-2"))],
    );
    api.put(CLUSTER_SPIFFE_IDS, web_resource());
    let got = wait_for(&s, &[("web", "web-1")], Duration::from_secs(10), "migrated");
    let e = &got[&k("web", "web-1")];
    assert_ne!(
        e["id"],
        old_id.as_str(),
        "the hint-marked entry was replaced"
    );
    assert_eq!(e["dns_names"], json!(["web-1.shop.svc"]));
    let all = entries(&s);
    assert!(all.iter().all(|e| e["id"] != old_id.as_str()), "{all:?}");
    assert!(
        all.iter().all(|e| e["hint"] == ""),
        "no hint marks left: {all:?}"
    );
    assert!(all.iter().any(|e| e["id"] == operator.as_str()), "{all:?}");
    // Settled: no retries against the operator's entry.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !s.log().contains("entry write failed"),
        "the operator's duplicate is skipped, not fought: {}",
        s.log()
    );
}

/// The `ClusterSPIFFEID` tests/e2e-kind/run.sh applies, as JSON (PyYAML via python3).
fn e2e_resource() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e-kind/payments-clusterspiffeid.yaml");
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(&path)
        .output()
        .expect("python3 with PyYAML (kubernetes-validate brings it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kind_e2e_resource_registers_its_three_replicas_under_the_node_alias() {
    let d = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    let mut default_ns = namespace("default", "x");
    default_ns["metadata"]["labels"] = json!({"kubernetes.io/metadata.name": "default"});
    api.put(NAMESPACES, default_ns);
    let mut other_ns = namespace("other", "x");
    other_ns["metadata"]["labels"] = json!({"kubernetes.io/metadata.name": "other"});
    api.put(NAMESPACES, other_ns);
    // The Deployment's three replicas on two nodes, as deploy/k8s/workload.yaml makes them.
    for (name, node) in [
        ("payments-1", "w1"),
        ("payments-2", "w2"),
        ("payments-3", "w1"),
    ] {
        let mut p = pod("default", name, "payments");
        p["spec"]["serviceAccountName"] = json!("payments");
        p["spec"]["nodeName"] = json!(node);
        api.put(PODS, p);
    }
    api.put(PODS, pod("other", "payments-elsewhere", "payments"));
    let s = server(d.path(), &api);
    s.cli_ok(&["engine", "create", "payments", "--tier", "1"]);
    api.put(CLUSTER_SPIFFE_IDS, e2e_resource());
    let id = "spiffe://example.org/ns/default/sa/payments";
    let start = Instant::now();
    let mine = loop {
        let mine: Vec<Value> = entries(&s)
            .into_iter()
            .filter(|e| e["id"].as_str().unwrap().starts_with(OWNER) && !is_node_alias(e))
            .collect();
        if mine.len() == 3 {
            break mine;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "three replicas' entries: {mine:?}\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    for e in &mine {
        assert_eq!(e["spiffe_id"], id, "{e}");
        assert_eq!(e["parent_id"], ALIAS, "parented to the node alias: {e}");
        assert_eq!(e["engine"], "payments", "{e}");
    }
    // The node alias the e2e relies on (no `entry create --node` in the script).
    assert_eq!(entries(&s).iter().filter(|e| is_node_alias(e)).count(), 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        owned(&s).len(),
        3,
        "the pod in namespace other is not selected"
    );
}
