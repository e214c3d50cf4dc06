//! An API-server stand-in for the k8s_psat server attestor: TokenReview (authenticating any
//! well-formed service-account JWT from its claims, as the real API server does for tokens it
//! issued, unless the token was revoked) and GET of single Nodes and Pods in the real core/v1
//! JSON shape, with a log of the requests it answered.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::k8s_standin::https_json;

#[derive(Default)]
struct State {
    /// Object path (`/api/v1/nodes/NAME`, `/api/v1/namespaces/NS/pods/NAME`) → object.
    objects: BTreeMap<String, Value>,
    revoked: BTreeSet<String>,
    requests: Vec<String>,
}

/// The running stand-in.
pub struct PsatApi {
    state: Arc<Mutex<State>>,
    /// HTTPS port on 127.0.0.1.
    pub port: u16,
    /// PEM of the certificate to trust it with.
    pub ca_pem: String,
}

impl PsatApi {
    /// Starts it; requests without `Authorization: Bearer <bearer>` get 401.
    pub async fn start(bearer: &str) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let (s, bearer) = (state.clone(), bearer.to_string());
        let (port, ca_pem) = https_json(move |method, path, token, body| {
            let mut st = s.lock().unwrap();
            st.requests.push(format!("{method} {path}"));
            if token != Some(bearer.as_str()) {
                return (401, status(401, "Unauthorized"));
            }
            match method {
                "POST" if path == "/apis/authentication.k8s.io/v1/tokenreviews" => {
                    (201, review(&st.revoked, body))
                }
                "GET" => match st.objects.get(path) {
                    Some(o) => (200, o.clone()),
                    None => (404, status(404, "NotFound")),
                },
                _ => (405, status(405, "MethodNotAllowed")),
            }
        })
        .await;
        Self {
            state,
            port,
            ca_pem,
        }
    }

    /// Adds (or replaces) Node `name` with `uid` and `labels`.
    pub fn put_node(&self, name: &str, uid: &str, labels: &[(&str, &str)]) {
        let node = json!({"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": name, "uid": uid, "resourceVersion": "1", "labels": labels_json(labels)},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        self.put(format!("/api/v1/nodes/{name}"), node);
    }

    /// Adds (or replaces) Pod `ns/name` with `uid`, scheduled on `node`, with `labels`.
    pub fn put_pod(&self, ns: &str, name: &str, uid: &str, node: &str, labels: &[(&str, &str)]) {
        let pod = json!({"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "1",
                         "labels": labels_json(labels)},
            "spec": {"nodeName": node, "serviceAccountName": "continuity-agent",
                     "containers": [{"name": "agent", "image": "continuity:dev"}]},
            "status": {"phase": "Running"}});
        self.put(format!("/api/v1/namespaces/{ns}/pods/{name}"), pod);
    }

    /// Removes Node `name` (a GET of it then gets 404).
    pub fn delete_node(&self, name: &str) {
        self.state
            .lock()
            .unwrap()
            .objects
            .remove(&format!("/api/v1/nodes/{name}"));
    }

    /// Makes TokenReview answer `authenticated: false` for `token`.
    pub fn revoke(&self, token: &str) {
        self.state.lock().unwrap().revoked.insert(token.into());
    }

    /// Every request so far, as "METHOD path".
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    fn put(&self, path: String, obj: Value) {
        self.state.lock().unwrap().objects.insert(path, obj);
    }
}

fn labels_json(labels: &[(&str, &str)]) -> Value {
    labels
        .iter()
        .map(|(k, v)| ((*k).to_string(), Value::from(*v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The TokenReview answer for the request `body`: the token's own claims when it is a JWT
/// (not revoked) whose audience includes one asked for.
fn review(revoked: &BTreeSet<String>, body: &[u8]) -> Value {
    let req: Value = serde_json::from_slice(body).unwrap_or_default();
    let token = req["spec"]["token"].as_str().unwrap_or_default();
    let claims: Value = token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let asked: Vec<&Value> = req["spec"]["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let aud: Vec<Value> = claims["aud"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| asked.contains(a))
        .cloned()
        .collect();
    let k = &claims["kubernetes.io"];
    let status = if revoked.contains(token) || aud.is_empty() || k.is_null() {
        json!({"authenticated": false, "error": "invalid bearer token"})
    } else {
        json!({"authenticated": true, "audiences": aud, "user": {
            "username": claims["sub"], "uid": k["serviceaccount"]["uid"],
            "groups": ["system:serviceaccounts", "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/pod-name": [k["pod"]["name"]],
                "authentication.kubernetes.io/pod-uid": [k["pod"]["uid"]],
                "authentication.kubernetes.io/node-name": [k["node"]["name"]],
                "authentication.kubernetes.io/node-uid": [k["node"]["uid"]]}}})
    };
    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
           "spec": req["spec"], "status": status})
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code})
}
