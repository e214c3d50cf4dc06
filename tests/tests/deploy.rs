//! deploy/: every manifest validates offline with `kubernetes-validate --strict`, the configs
//! embedded in its ConfigMaps are accepted by the real config parsers, and the kind e2e script
//! says SKIPPED where no container engine runs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

fn manifests() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(k8s_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn manifests_validate_strictly_offline() {
    let files = manifests();
    assert!(files.len() >= 7, "{files:?}");
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(&files)
        .output()
        .expect("kubernetes-validate (PyPI) is installed by scripts/setup");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("ERROR"), "{text}");
    // Every file is named in the kustomization.
    let kustomization = std::fs::read_to_string(k8s_dir().join("kustomization.yaml")).unwrap();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(
            kustomization.contains(&*name),
            "{name} missing from kustomization.yaml"
        );
    }
}

/// The block scalar under `key: |` in a ConfigMap manifest.
fn embedded(file: &str, key: &str) -> String {
    let text = std::fs::read_to_string(k8s_dir().join(file)).unwrap();
    let mut lines = text.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    lines.next().expect("key present");
    lines
        .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
        .map(|l| l.strip_prefix("    ").unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn configmaps_hold_configs_the_binaries_accept() {
    let server = embedded("server-config.yaml", "server.toml");
    continuity_server::Config::parse(&server, Path::new("server-config.yaml")).unwrap();
    let agent = embedded("agent-config.yaml", "agent.toml");
    let cfg = continuity_agent::Config::parse(&agent, Path::new("agent-config.yaml")).unwrap();
    assert!(cfg.k8s.is_some(), "the k8s workload attestor is on");
    assert!(matches!(
        cfg.node_attestor,
        continuity_agent::config::NodeAttestor::K8sPsat { .. }
    ));
}

#[test]
fn kind_e2e_says_skipped_without_a_container_engine() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e-kind/run.sh");
    let engine = ["docker", "podman"].iter().any(|e| {
        Command::new(e)
            .arg("info")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if engine {
        // Where an engine exists, CI runs the script itself (.ci/run); nothing to assert here.
        return;
    }
    let out = Command::new("bash").arg(&script).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("SKIPPED: "), "{stdout}");
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `kubectl kustomize DIR` as JSON documents (PyYAML, which kubernetes-validate brings, turns
/// the YAML stream into JSON), after checking the stream validates strictly.
fn kustomize(dir: &str) -> Vec<serde_json::Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join(dir))
        .output()
        .expect("kubectl is installed");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tmp = tempfile::tempdir().unwrap();
    let built = tmp.path().join("built.yaml");
    std::fs::write(&built, &out.stdout).unwrap();
    let v = Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&built)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(
        v.status.success() && !text.contains("ERROR"),
        "{dir}: {text}"
    );
    let json = Command::new("python3")
        .args([
            "-c",
            "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(std::fs::File::open(&built).unwrap())
        .output()
        .unwrap();
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    serde_json::from_slice(&json.stdout).unwrap()
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} missing"))
}

#[test]
fn the_base_builds_and_the_server_may_keep_the_bundle_config_map_the_agents_mount() {
    let docs = kustomize("deploy/k8s");
    // The server publishes into the ConfigMap the agent DaemonSet mounts, under the key the
    // agent reads as its trust bundle.
    let server = embedded("server-config.yaml", "server.toml");
    let server =
        continuity_server::Config::parse(&server, Path::new("server-config.yaml")).unwrap();
    let pub_cfg = server.k8s_bundle.expect("[k8s_bundle] is on in deploy/");
    let agent = find(&docs, "DaemonSet", "continuity-agent");
    let spec = &agent["spec"]["template"]["spec"];
    let volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == pub_cfg.config_map.as_str())
        .expect("the agent mounts the bundle ConfigMap");
    let mount = spec["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .unwrap();
    assert_eq!(agent["metadata"]["namespace"], pub_cfg.namespace.as_str());
    let agent_toml = embedded("agent-config.yaml", "agent.toml");
    let expected = format!(
        "trust_bundle_path = \"{}/{}\"",
        mount["mountPath"].as_str().unwrap(),
        pub_cfg.key
    );
    assert!(agent_toml.contains(&expected), "{expected} in agent.toml");
    // RBAC: get, create, update, patch on that ConfigMap for the server's service account.
    let role = find(&docs, "Role", "continuity-server-bundle");
    let mut verbs = vec![];
    for rule in role["rules"].as_array().unwrap() {
        assert_eq!(rule["resources"], serde_json::json!(["configmaps"]));
        if let Some(names) = rule["resourceNames"].as_array() {
            assert_eq!(names, &[serde_json::json!(pub_cfg.config_map)]);
        }
        verbs.extend(rule["verbs"].as_array().unwrap().iter().cloned());
    }
    verbs.sort_by_key(|v| v.as_str().unwrap().to_string());
    assert_eq!(
        verbs,
        serde_json::json!(["create", "get", "patch", "update"])
            .as_array()
            .unwrap()
            .clone()
    );
    let binding = find(&docs, "RoleBinding", "continuity-server-bundle");
    assert_eq!(binding["roleRef"]["name"], "continuity-server-bundle");
    assert_eq!(binding["subjects"][0]["name"], "continuity-server");
}

#[test]
fn the_csi_overlay_serves_the_socket_without_host_path_to_a_restricted_workload() {
    let docs = kustomize("deploy/k8s-csi");
    let driver = find(&docs, "CSIDriver", "csi.spiffe.io");
    assert_eq!(
        driver["spec"]["volumeLifecycleModes"],
        serde_json::json!(["Ephemeral"])
    );
    // The driver serves the agent's socket directory on the node.
    let agent = find(&docs, "DaemonSet", "continuity-agent");
    let csi = find(&docs, "DaemonSet", "spiffe-csi-driver");
    let host_path = |ds: &serde_json::Value, name: &str| {
        ds["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()["hostPath"]["path"]
            .clone()
    };
    assert_eq!(
        host_path(agent, "sockets"),
        host_path(csi, "agent-socket-dir")
    );
    // Pod Security `restricted`, field by field.
    let pod = &find(&docs, "Deployment", "payments")["spec"]["template"]["spec"];
    for v in pod["volumes"].as_array().unwrap() {
        assert!(v.get("hostPath").is_none(), "hostPath volume {v}");
    }
    let sock = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "continuity")
        .unwrap();
    assert_eq!(sock["csi"]["driver"], "csi.spiffe.io");
    assert_eq!(sock["csi"]["readOnly"], true);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert!(pod["hostPID"].is_null() && pod["hostNetwork"].is_null());
    let containers = pod["containers"].as_array().unwrap();
    assert!(!containers.is_empty());
    for c in containers {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{c}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{c}");
        assert_eq!(sc["runAsNonRoot"], true, "{c}");
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{c}"
        );
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{c}");
        assert!(
            sc["privileged"].is_null() && sc["capabilities"]["add"].is_null(),
            "{c}"
        );
    }
}

/// One segment-wise glob match (`*` within a segment, `**` across segments).
fn glob(pattern: &[&str], path: &[&str]) -> bool {
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (Some(&"**"), _) => {
            glob(&pattern[1..], path) || (!path.is_empty() && glob(pattern, &path[1..]))
        }
        (Some(p), Some(s)) => {
            segment(p.as_bytes(), s.as_bytes()) && glob(&pattern[1..], &path[1..])
        }
        _ => false,
    }
}

fn segment(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => segment(&p[1..], s) || (!s.is_empty() && segment(p, &s[1..])),
        (Some(a), Some(b)) if a == b => segment(&p[1..], &s[1..]),
        _ => false,
    }
}

/// Whether the Docker build context (per .dockerignore: a pattern matches a path or any of its
/// parent directories; later lines win; `!` re-includes) leaves `path` out.
fn docker_ignores(rules: &str, path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let mut ignored = false;
    for line in rules.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (negated, pat) = match line.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, line),
        };
        let pat: Vec<&str> = pat.trim_matches('/').split('/').collect();
        if (1..=parts.len()).any(|n| glob(&pat, &parts[..n])) {
            ignored = !negated;
        }
    }
    ignored
}

#[test]
fn the_build_context_excludes_target_git_and_non_build_files_and_keeps_the_sources() {
    let rules = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for p in [
        "target/release/continuity-server",
        "target/debug/deps/x.rlib",
        ".git",
        ".git/HEAD",
        "server/target/x",
        "fuzz/corpus/a",
        "README.md",
        "scripts/setup",
        "tests/tests/deploy.rs",
        "tests/e2e-kind/run.sh",
        ".ci/run",
    ] {
        assert!(
            docker_ignores(&rules, p),
            "{p} must not be in the build context"
        );
    }
    // Everything cargo reads to build the binaries is in it: every tracked file of the
    // workspace manifests and member crates the Dockerfile builds.
    let out = Command::new("git")
        .args(["ls-files"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success());
    let files = String::from_utf8(out.stdout).unwrap();
    let needed: Vec<&str> = files
        .lines()
        .filter(|f| {
            ["Cargo.toml", "Cargo.lock"].contains(f)
                || [
                    "proto/",
                    "common/",
                    "attestors/",
                    "agent/",
                    "server/",
                    "tests/src/",
                ]
                .iter()
                .any(|d| f.starts_with(d))
                || *f == "tests/Cargo.toml"
        })
        .collect();
    assert!(needed.len() > 50, "{needed:?}");
    for f in needed {
        assert!(!docker_ignores(&rules, f), "{f} is needed by the build");
    }
    // A multi-stage build whose runtime stage copies only the two release binaries.
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let stages: Vec<&str> = dockerfile.split("\nFROM ").skip(1).collect();
    assert_eq!(stages.len(), 2, "builder then runtime");
    assert!(stages[0].lines().next().unwrap().ends_with(" AS build"));
    let runtime = stages[1];
    assert!(runtime.starts_with("debian:bookworm-slim") || runtime.contains("distroless"));
    let copies: Vec<&str> = runtime.lines().filter(|l| l.starts_with("COPY")).collect();
    assert_eq!(
        copies,
        [
            "COPY --from=build /src/target/release/continuity-server /src/target/release/continuity-agent /usr/local/bin/"
        ]
    );
}

#[test]
fn the_kind_e2e_runs_two_workers_and_needs_no_python_in_the_image() {
    let dir = repo().join("tests/e2e-kind");
    let script = std::fs::read_to_string(dir.join("run.sh")).unwrap();
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(dir.join("run.sh"))
        .output()
        .unwrap();
    assert!(
        syntax.status.success(),
        "{}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    let commands: Vec<&str> = script
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(
        commands.iter().all(|l| !l.contains("python")),
        "the image has no python3"
    );
    assert!(script.contains("--config tests/e2e-kind/kind.yaml"));
    let kind = std::fs::read_to_string(dir.join("kind.yaml")).unwrap();
    assert_eq!(kind.matches("- role: worker").count(), 2, "{kind}");
    assert_eq!(kind.matches("- role: control-plane").count(), 1, "{kind}");
    // The CLI commands the script runs exist with the flags it passes (run locally).
    for (args, flags) in [
        (&["engine", "sign"][..], &["--key", "--message-file"][..]),
        (
            &["engine", "verify"],
            &["--key", "--message-file", "--signature-file"],
        ),
        (&["engine", "jwks"], &[]),
        (&["api", "fetch", "x509"], &[]),
    ] {
        let used = format!("continuity-agent {}", args.join(" "));
        assert!(script.contains(&used), "{used}");
        let out = Command::new(continuity_tests::bin("continuity-agent"))
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{used} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        for flag in flags {
            assert!(help.contains(flag), "{used} has no {flag}");
        }
    }
}

/// The metric names in a Grafana dashboard's `expr`s.
fn dashboard_metrics(dashboard: &serde_json::Value) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for target in panels.iter().flat_map(|p| p["targets"].as_array().unwrap()) {
        let expr = target["expr"].as_str().expect("expr");
        let mut rest = expr;
        while let Some(i) = rest.find("continuity_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

#[tokio::test]
async fn grafana_dashboard_uses_only_series_a_scrape_has() {
    use continuity_tests::prom::scrape;
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/continuity.json"),
    )
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let used = dashboard_metrics(&dashboard);
    assert!(used.len() >= 15, "{used:?}");

    let dir = tempfile::tempdir().unwrap();
    let (server_port, agent_port) = (continuity_tests::free_port(), continuity_tests::free_port());
    let server = continuity_tests::server::TestServer::start(
        &dir.path().join("server"),
        continuity_tests::server::ServerOptions {
            extra_toml: format!("[metrics]\nbind_address = \"127.0.0.1:{server_port}\"\n"),
            ..Default::default()
        },
    );
    let alias = "spiffe://example.org/node/grafana";
    let agent = continuity_tests::agent::TestAgent::start_with(
        &dir.path().join("agent"),
        &server,
        &server.token(Some(alias)),
        &format!("[metrics]\nbind_address = \"127.0.0.1:{agent_port}\"\n"),
    );
    server.create_entry(
        "spiffe://example.org/grafana",
        alias,
        &[&format!("unix:uid:{}", continuity_tests::uid())],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while continuity_tests::fetch_x509(&agent).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no X509-SVID within 20 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let scrapes = [scrape(server_port), scrape(agent_port)];
    for name in &used {
        let present = scrapes.iter().any(|s| {
            s.samples.iter().any(|x| &x.name == name)
                && (s.types.contains_key(name)
                    || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                        name.strip_suffix(suffix)
                            .is_some_and(|f| s.types.get(f).is_some_and(|t| t == "histogram"))
                    }))
        });
        assert!(present, "the dashboard uses {name}, which no scrape has");
    }
}

/// One YAML document as JSON (PyYAML, which kubernetes-validate brings).
fn yaml_file(path: &Path) -> serde_json::Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json,sys,yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Checks `v` against a CRD's structural schema as the API server does with strict field
/// validation: types, `required`, `minLength`, and no field the schema does not name (unless
/// `x-kubernetes-preserve-unknown-fields`). Errors are pushed as "path: what".
fn check_schema(
    schema: &serde_json::Value,
    v: &serde_json::Value,
    at: &str,
    errs: &mut Vec<String>,
) {
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
    match schema["type"].as_str() {
        Some("object") => {
            let Some(obj) = v.as_object() else {
                return errs.push(format!("{at}: not an object"));
            };
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                if !obj.contains_key(r) {
                    errs.push(format!("{at}: {r} is required"));
                }
            }
            for (k, child) in obj {
                match schema["properties"].get(k) {
                    Some(s) => check_schema(s, child, &format!("{at}.{k}"), errs),
                    None if preserve => {}
                    None => errs.push(format!("{at}: unknown field {k:?}")),
                }
            }
        }
        Some("string") => match v.as_str() {
            Some(s) if s.len() as u64 >= schema["minLength"].as_u64().unwrap_or(0) => {}
            Some(_) => errs.push(format!("{at}: shorter than minLength")),
            None => errs.push(format!("{at}: not a string")),
        },
        Some("array") => match v.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check_schema(&schema["items"], item, &format!("{at}[{i}]"), errs);
                }
            }
            None => errs.push(format!("{at}: not an array")),
        },
        Some(other) => errs.push(format!(
            "{at}: schema type {other} not handled by this check"
        )),
        None if preserve => {}
        None => errs.push(format!("{at}: schema without a type")),
    }
}

/// Errors of `cr` against the ClusterSPIFFEID CRD in deploy/k8s (empty: it would be accepted).
fn cr_errors(cr: &serde_json::Value) -> Vec<String> {
    let crd = yaml_file(&k8s_dir().join("crd-clusterspiffeid.yaml"));
    let spec = &crd["spec"];
    let mut errs = Vec::new();
    let served: Vec<String> = spec["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["served"] == true)
        .map(|v| {
            format!(
                "{}/{}",
                spec["group"].as_str().unwrap(),
                v["name"].as_str().unwrap()
            )
        })
        .collect();
    let api_version = cr["apiVersion"].as_str().unwrap_or_default().to_string();
    let Some(vi) = served.iter().position(|v| *v == api_version) else {
        return vec![format!(
            "apiVersion {api_version:?} not served ({served:?})"
        )];
    };
    if cr["kind"] != spec["names"]["kind"] {
        errs.push(format!(
            "kind {} is not {}",
            cr["kind"], spec["names"]["kind"]
        ));
    }
    if spec["scope"] == "Cluster" && cr["metadata"].get("namespace").is_some() {
        errs.push("a cluster-scoped resource has no namespace".into());
    }
    if cr["metadata"]["name"].as_str().is_none_or(str::is_empty) {
        errs.push("metadata.name is required".into());
    }
    let mut body = cr.clone();
    for k in ["apiVersion", "kind", "metadata"] {
        body.as_object_mut().unwrap().remove(k);
    }
    let schema = &spec["versions"][vi]["schema"]["openAPIV3Schema"];
    check_schema(schema, &body, "", &mut errs);
    errs
}

#[test]
fn the_kind_e2e_registers_through_a_cluster_spiffe_id_that_fits_the_crd() {
    let e2e = repo().join("tests/e2e-kind");
    let cr = yaml_file(&e2e.join("payments-clusterspiffeid.yaml"));
    assert_eq!(cr_errors(&cr), Vec::<String>::new(), "{cr}");
    // The example in deploy/ fits too; the check itself refuses what the API server would.
    let example = yaml_file(&repo().join("deploy/clusterspiffeid-example.yaml"));
    assert_eq!(cr_errors(&example), Vec::<String>::new(), "{example}");
    let mut typo = cr.clone();
    typo["spec"]["spiffeIdTemplate"] = typo["spec"]["spiffeIDTemplate"].take();
    typo["spec"]
        .as_object_mut()
        .unwrap()
        .remove("spiffeIDTemplate");
    let errs = cr_errors(&typo);
    assert!(
        errs.iter()
            .any(|e| e.contains("spiffeIDTemplate is required")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("unknown field \"spiffeIdTemplate\"")),
        "{errs:?}"
    );
    let mut bad = cr.clone();
    bad["spec"]["dnsNameTemplates"] = serde_json::json!("not-a-list");
    bad["metadata"]["namespace"] = "default".into();
    assert_eq!(cr_errors(&bad).len(), 2, "{:?}", cr_errors(&bad));
    // The script applies it, relies on the controller's node alias, and creates no entry itself.
    let script = std::fs::read_to_string(e2e.join("run.sh")).unwrap();
    let commands: Vec<&str> = script
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(
        commands
            .iter()
            .any(|l| l.contains("kubectl apply -f tests/e2e-kind/payments-clusterspiffeid.yaml")),
        "run.sh applies the ClusterSPIFFEID"
    );
    assert!(
        commands.iter().all(|l| !l.contains("entry create")),
        "run.sh registers nothing by hand"
    );
    // The alias it waits for is the controller's node_alias_id in deploy/k8s/server-config.yaml.
    let server = embedded("server-config.yaml", "server.toml");
    let alias = server
        .lines()
        .find_map(|l| l.trim().strip_prefix("node_alias_id = "))
        .expect("[controller] node_alias_id in the server config")
        .trim_matches('"')
        .to_string();
    assert!(script.contains(&format!("alias_id=\"{alias}\"")), "{alias}");
    // The Engine it binds to is the one the script creates.
    assert!(script.contains(&format!(
        "srv engine create {}",
        cr["spec"]["engine"].as_str().unwrap()
    )));
}

/// Whether `role` grants `verb` on `resource` of the core or named API group.
fn grants(role: &serde_json::Value, group: &str, resource: &str, verb: &str) -> bool {
    role["rules"].as_array().unwrap().iter().any(|r| {
        let has = |k: &str, v: &str| r[k].as_array().unwrap().iter().any(|x| x == v);
        has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
    })
}

#[test]
fn the_server_may_review_tokens_and_read_the_agents_node_and_pod_for_label_selectors() {
    let docs = kustomize("deploy/k8s");
    let role = find(&docs, "ClusterRole", "continuity-server-tokenreview");
    assert!(grants(
        role,
        "authentication.k8s.io",
        "tokenreviews",
        "create"
    ));
    // agent_node_label / agent_pod_label selectors read GET /api/v1/nodes/NAME and
    // GET /api/v1/namespaces/NS/pods/NAME after the TokenReview.
    assert!(grants(role, "", "nodes", "get"), "nodes get");
    assert!(grants(role, "", "pods", "get"), "pods get");
    assert!(!grants(role, "", "nodes", "list"), "no more than needed");
    let binding = find(&docs, "ClusterRoleBinding", "continuity-server-tokenreview");
    assert_eq!(binding["subjects"][0]["name"], "continuity-server");
}
