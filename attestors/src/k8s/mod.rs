//! The k8s workload attestor: caller pid → `/proc/<pid>/cgroup` → pod UID and container ID →
//! the kubelet's `/pods` → `k8s:` selectors (SPIRE's spelling).
//!
//! The kubelet is asked over its secure port with the agent's service-account token and the
//! kubelet CA (or, when configured so explicitly, without verification or on the read-only
//! HTTP port). Its answers are cached briefly so a burst of new pods does not hammer it, and a
//! container the kubelet does not list yet is retried a bounded number of times.
//!
//! The depth of the agent's own cgroup namespace (see [`cgroup`], "Private cgroup namespaces")
//! is read once, from `/proc/1/cgroup`, when the attestor is made.

pub mod cgroup;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use continuity_common::https::{self, ServerTrust};
use serde_json::Value;

use crate::Selector;

/// `[workload_attestors.k8s]`.
#[derive(Debug, Clone)]
pub struct K8sConfig {
    /// The kubelet's `/pods` base URL (default `https://127.0.0.1:10250`; `http://...:10255`
    /// for the read-only port).
    pub kubelet_url: String,
    /// The kubelet's serving CA (PEM).
    pub kubelet_ca_path: Option<PathBuf>,
    /// Skip verifying the kubelet's certificate. Insecure.
    pub insecure_skip_kubelet_verify: bool,
    /// Service-account token presented to the kubelet.
    pub token_path: PathBuf,
    /// How many times to look for a container the kubelet does not list yet.
    pub max_poll_attempts: u32,
    /// Pause between those looks.
    pub poll_retry_interval: Duration,
    /// How long a pod list is reused.
    pub pod_list_cache_ttl: Duration,
}

impl Default for K8sConfig {
    fn default() -> Self {
        Self {
            kubelet_url: "https://127.0.0.1:10250".into(),
            kubelet_ca_path: None,
            insecure_skip_kubelet_verify: false,
            token_path: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            max_poll_attempts: 5,
            poll_retry_interval: Duration::from_millis(500),
            pod_list_cache_ttl: Duration::from_secs(1),
        }
    }
}

/// Why a pod could not be attested.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// `/proc/<pid>/cgroup` unreadable.
    #[error("cannot read /proc/{pid}/cgroup: {source}")]
    Cgroup {
        /// The process.
        pid: u32,
        /// Why.
        source: std::io::Error,
    },
    /// The kubelet could not be asked or answered badly.
    #[error("kubelet: {0}")]
    Kubelet(String),
    /// The container never showed up in the kubelet's pod list.
    #[error(
        "container {container_id} of pod {pod_uid} is not in the kubelet's pod list after {attempts} attempts"
    )]
    NotFound {
        /// Pod UID.
        pod_uid: String,
        /// Container ID.
        container_id: String,
        /// Attempts made.
        attempts: u32,
    },
}

/// The k8s workload attestor.
#[derive(Debug)]
pub struct K8sAttestor {
    cfg: K8sConfig,
    /// Where `<pid>/cgroup` files are read (`/proc`).
    proc_root: PathBuf,
    /// Leading `..` segments of the agent's cgroup-namespace root, from `<proc_root>/1/cgroup`.
    ns_depth: usize,
    cache: Mutex<Option<(Instant, std::sync::Arc<Value>)>>,
}

impl K8sAttestor {
    /// An attestor with this configuration, reading processes under `/proc`.
    pub fn new(cfg: K8sConfig) -> Self {
        Self::with_proc_root(cfg, "/proc")
    }

    /// An attestor reading `<proc_root>/<pid>/cgroup` (tests use a stand-in directory). The
    /// cgroup-namespace depth is read here, once, from `<proc_root>/1/cgroup`; if that fails it
    /// is 0, so paths outside the agent's namespace are refused (logged as a warning).
    pub fn with_proc_root(cfg: K8sConfig, proc_root: impl Into<PathBuf>) -> Self {
        let proc_root = proc_root.into();
        let init = proc_root.join("1").join("cgroup");
        let ns_depth = match std::fs::read_to_string(&init) {
            Ok(text) => cgroup::namespace_depth(&text),
            Err(e) => {
                tracing::warn!(
                    "k8s attestor: cannot read {}: {e}; pods outside the agent's cgroup namespace get no selectors",
                    init.display()
                );
                0
            }
        };
        if ns_depth > 0 {
            tracing::info!(
                ns_depth,
                "k8s attestor: private cgroup namespace, {ns_depth} levels below the host's root"
            );
        }
        Self {
            cfg,
            proc_root,
            ns_depth,
            cache: Mutex::default(),
        }
    }

    /// Where process `pid` sits in Kubernetes, from its cgroup file; `None` outside pods.
    fn placement(&self, pid: u32) -> Result<Option<cgroup::PodContainer>, K8sError> {
        let text = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup"))
            .map_err(|source| K8sError::Cgroup { pid, source })?;
        Ok(cgroup::parse(&text, self.ns_depth))
    }

    fn pod_list(&self, fresh: bool) -> Result<std::sync::Arc<Value>, K8sError> {
        if !fresh
            && let Some((at, v)) = self
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            && at.elapsed() < self.cfg.pod_list_cache_ttl
        {
            return Ok(v.clone());
        }
        let trust = self.kubelet_trust()?;
        let token = self.kubelet_token()?;
        let url = format!("{}/pods", self.cfg.kubelet_url.trim_end_matches('/'));
        let r = https::request(
            "GET",
            &url,
            &trust,
            token.as_deref(),
            None,
            Duration::from_secs(5),
        )
        .map_err(|e| K8sError::Kubelet(e.to_string()))?;
        if r.status != 200 {
            return Err(K8sError::Kubelet(format!(
                "GET {url} answered {}",
                r.status
            )));
        }
        let v: Value = serde_json::from_slice(&r.body)
            .map_err(|e| K8sError::Kubelet(format!("pod list is not JSON: {e}")))?;
        let v = std::sync::Arc::new(v);
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), v.clone()));
        Ok(v)
    }

    /// How the kubelet's certificate is checked: `kubelet_ca_path`, unless verification is
    /// off.
    fn kubelet_trust(&self) -> Result<ServerTrust, K8sError> {
        if self.cfg.insecure_skip_kubelet_verify {
            return Ok(ServerTrust::InsecureSkipVerify);
        }
        let path = self.cfg.kubelet_ca_path.as_ref().ok_or_else(|| {
            K8sError::Kubelet(
                "kubelet_ca_path is required unless insecure_skip_kubelet_verify = true".into(),
            )
        })?;
        let pem = std::fs::read_to_string(path)
            .map_err(|e| K8sError::Kubelet(format!("kubelet_ca_path {}: {e}", path.display())))?;
        Ok(ServerTrust::Roots(
            continuity_common::x509::pem_decode_all("CERTIFICATE", &pem)
                .map_err(K8sError::Kubelet)?,
        ))
    }

    /// The bearer token sent to an HTTPS kubelet (`token_path`); none over plain HTTP.
    fn kubelet_token(&self) -> Result<Option<String>, K8sError> {
        if !self.cfg.kubelet_url.starts_with("https://") {
            return Ok(None);
        }
        let token = std::fs::read_to_string(&self.cfg.token_path).map_err(|e| {
            K8sError::Kubelet(format!("token_path {}: {e}", self.cfg.token_path.display()))
        })?;
        Ok(Some(token.trim().to_string()))
    }

    /// Selectors of process `pid`; none (and no error) when it is not in a pod.
    pub fn attest(&self, pid: u32) -> Result<Vec<Selector>, K8sError> {
        let Some(pc) = self.placement(pid)? else {
            return Ok(vec![]);
        };
        for attempt in 0..self.cfg.max_poll_attempts.max(1) {
            let list = self.pod_list(attempt > 0)?;
            if let Some(sel) = selectors_for(&list, &pc.pod_uid, &pc.container_id) {
                return Ok(sel);
            }
            std::thread::sleep(self.cfg.poll_retry_interval);
        }
        Err(K8sError::NotFound {
            pod_uid: pc.pod_uid,
            container_id: pc.container_id,
            attempts: self.cfg.max_poll_attempts.max(1),
        })
    }
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_str()
        .unwrap_or_default()
}

/// Runtime prefixes of a kubelet `containerID` (`<runtime>://<id>`).
const CONTAINER_ID_SCHEMES: [&str; 3] = ["containerd://", "cri-o://", "docker://"];

/// The bare container ID of a kubelet `containerID`, when it has a known runtime prefix.
fn bare_container_id(id: &str) -> Option<&str> {
    CONTAINER_ID_SCHEMES
        .iter()
        .find_map(|p| id.strip_prefix(p))
        .filter(|i| !i.is_empty())
}

/// Selectors for one container of one pod in a kubelet PodList.
///
/// The pod is the one item whose `metadata.uid` is `pod_uid` (none, or several, give `None`);
/// the container is the status among `containerStatuses`, `initContainerStatuses` and
/// `ephemeralContainerStatuses` whose `containerID`, without its `containerd://`, `cri-o://`
/// or `docker://` prefix, is exactly `container_id` (the full ID, never a prefix). A pod
/// matched without a container gives `None`: the cgroup path alone proves nothing.
pub fn selectors_for(list: &Value, pod_uid: &str, container_id: &str) -> Option<Vec<Selector>> {
    if pod_uid.is_empty() || container_id.is_empty() {
        return None;
    }
    let mut pods = list["items"]
        .as_array()?
        .iter()
        .filter(|p| s(p, &["metadata", "uid"]) == pod_uid);
    let pod = pods.next()?;
    if pods.next().is_some() {
        return None;
    }
    let status = [
        "containerStatuses",
        "initContainerStatuses",
        "ephemeralContainerStatuses",
    ]
    .iter()
    .flat_map(|k| pod["status"][*k].as_array().into_iter().flatten())
    .find(|c| bare_container_id(s(c, &["containerID"])) == Some(container_id))?;
    let k = |v: String| Selector::raw("k8s", v);
    let mut out = vec![
        k(format!("ns:{}", s(pod, &["metadata", "namespace"]))),
        k(format!("sa:{}", s(pod, &["spec", "serviceAccountName"]))),
        k(format!("pod-uid:{pod_uid}")),
        k(format!("pod-name:{}", s(pod, &["metadata", "name"]))),
        k(format!("node-name:{}", s(pod, &["spec", "nodeName"]))),
        k(format!("container-name:{}", s(status, &["name"]))),
        k(format!("container-image:{}", s(status, &["image"]))),
    ];
    if let Some(labels) = pod["metadata"]["labels"].as_object() {
        for (key, v) in labels {
            out.push(k(format!(
                "pod-label:{key}:{}",
                v.as_str().unwrap_or_default()
            )));
        }
    }
    for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
        out.push(k(format!("pod-image:{}", s(c, &["image"]))));
    }
    for c in pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.push(k(format!("pod-init-image:{}", s(c, &["image"]))));
    }
    out.sort();
    out.dedup();
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_from_a_pod_list() {
        let list = serde_json::json!({
            "kind": "PodList", "apiVersion": "v1",
            "items": [{
                "metadata": {"name": "payments-7d9f", "namespace": "prod", "uid": "u-1", "labels": {"app": "payments"}},
                "spec": {"serviceAccountName": "payments", "nodeName": "node-a",
                         "containers": [{"name": "app", "image": "registry/payments:1.2"}]},
                "status": {"containerStatuses": [{"name": "app", "image": "registry/payments:1.2",
                           "containerID": "containerd://abc"}]}
            }]
        });
        let sel: Vec<String> = selectors_for(&list, "u-1", "abc")
            .unwrap()
            .iter()
            .map(|s| s.to_string())
            .collect();
        for want in [
            "k8s:ns:prod",
            "k8s:sa:payments",
            "k8s:pod-uid:u-1",
            "k8s:pod-name:payments-7d9f",
            "k8s:node-name:node-a",
            "k8s:container-name:app",
            "k8s:container-image:registry/payments:1.2",
            "k8s:pod-label:app:payments",
            "k8s:pod-image:registry/payments:1.2",
        ] {
            assert!(
                sel.contains(&want.to_string()),
                "{want} missing from {sel:?}"
            );
        }
        assert!(selectors_for(&list, "u-1", "other").is_none());
        assert!(selectors_for(&list, "u-2", "abc").is_none());
    }

    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

    fn pod(uid: &str, statuses: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": uid},
            "spec": {"serviceAccountName": "sa", "containers": [{"name": "app", "image": "i"}]},
            "status": statuses
        })
    }

    #[test]
    fn the_container_id_must_be_one_of_the_pods_containers() {
        let list = |items: Vec<serde_json::Value>| serde_json::json!({"items": items});
        let st = |key: &str, id: &str| serde_json::json!({key: [{"name": "c", "image": "i", "containerID": id}]});
        for (key, scheme) in [
            ("containerStatuses", "containerd://"),
            ("initContainerStatuses", "cri-o://"),
            ("ephemeralContainerStatuses", "docker://"),
        ] {
            let l = list(vec![pod("u-1", st(key, &format!("{scheme}{CID}")))]);
            let sel = selectors_for(&l, "u-1", CID).unwrap_or_else(|| panic!("{key}"));
            assert!(sel.iter().any(|s| s.to_string() == "k8s:container-name:c"));
        }
        for (what, id) in [
            ("no scheme", CID.to_string()),
            ("unknown scheme", format!("evil://{CID}")),
            (
                "scheme inside another",
                format!("evil://containerd://{CID}"),
            ),
            ("upper-case scheme", format!("CONTAINERD://{CID}")),
            ("longer id", format!("containerd://{CID}0")),
            ("prefix of the id", format!("containerd://{}", &CID[..12])),
            ("empty", String::new()),
        ] {
            let l = list(vec![pod("u-1", st("containerStatuses", &id))]);
            assert!(selectors_for(&l, "u-1", CID).is_none(), "{what}");
        }
        // The container of another pod does not count for this pod.
        let l = list(vec![
            pod("u-1", st("containerStatuses", "containerd://other")),
            pod(
                "u-2",
                st("containerStatuses", &format!("containerd://{CID}")),
            ),
        ]);
        assert!(selectors_for(&l, "u-1", CID).is_none());
        // A pod with no statuses yet, and a UID listed twice, give nothing.
        assert!(
            selectors_for(&list(vec![pod("u-1", serde_json::json!({}))]), "u-1", CID).is_none()
        );
        let twice = st("containerStatuses", &format!("containerd://{CID}"));
        assert!(
            selectors_for(
                &list(vec![pod("u-1", twice.clone()), pod("u-1", twice)]),
                "u-1",
                CID
            )
            .is_none()
        );
        // Empty IDs never match an empty field.
        assert!(
            selectors_for(
                &list(vec![pod("", st("containerStatuses", "containerd://"))]),
                "",
                ""
            )
            .is_none()
        );
    }

    #[test]
    fn the_namespace_depth_is_read_from_pid_1_under_the_proc_root() {
        let root = std::env::temp_dir().join(format!("k8s-proc-{}", std::process::id()));
        let write = |pid: &str, text: &str| {
            std::fs::create_dir_all(root.join(pid)).unwrap();
            std::fs::write(root.join(pid).join("cgroup"), text).unwrap();
        };
        let uid = "2c48913c-b29f-11e7-9350-020968147796";
        let u = uid.replace('-', "_");
        // The agent in a besteffort pod with a private cgroup namespace: host init is 4 up.
        write("1", "0::/../../../../init.scope\n");
        write(
            "42",
            &format!("0::/../../kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope\n"),
        );
        write(
            "43",
            &format!(
                "0::/../../../../user.slice/user-1000.slice/user@1000.service/app.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope\n"
            ),
        );
        let a = K8sAttestor::with_proc_root(K8sConfig::default(), &root);
        assert_eq!(a.ns_depth, 4);
        let pc = a.placement(42).unwrap().unwrap();
        assert_eq!((pc.pod_uid.as_str(), pc.container_id.as_str()), (uid, CID));
        assert!(a.placement(43).unwrap().is_none(), "forged");
        assert!(matches!(
            a.placement(44),
            Err(K8sError::Cgroup { pid: 44, .. })
        ));
        // No readable pid 1: depth 0, so paths outside the agent's namespace name no pod.
        std::fs::remove_file(root.join("1").join("cgroup")).unwrap();
        let a = K8sAttestor::with_proc_root(K8sConfig::default(), &root);
        assert_eq!(a.ns_depth, 0);
        assert!(a.placement(42).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&root);
    }
}
