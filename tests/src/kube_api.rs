//! A Kubernetes API server stand-in for the registration controller: pods, namespaces and
//! `ClusterSPIFFEID`s with real list and watch semantics over HTTPS — resourceVersions, a
//! change history a watch resumes from, `ERROR` events with a 410 Status for a compacted
//! resourceVersion, bookmarks-free JSON lines — and a log of the requests it answered.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;

use crate::k8s_standin::{Reply, https_reply};

/// The pods collection.
pub const PODS: &str = "/api/v1/pods";
/// The namespaces collection.
pub const NAMESPACES: &str = "/api/v1/namespaces";
/// The `ClusterSPIFFEID` collection.
pub const CLUSTER_SPIFFE_IDS: &str = "/apis/continuity.dev/v1alpha1/clusterspiffeids";

#[derive(Default)]
struct State {
    rv: u64,
    /// collection → key → object.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// (resourceVersion, collection, watch event).
    history: Vec<(u64, String, Value)>,
    /// A watch from a resourceVersion below this gets 410.
    compacted: u64,
    /// While true, watch requests fail with 500.
    refuse_watches: bool,
    watchers: Vec<(String, UnboundedSender<Value>)>,
    requests: Vec<String>,
}

/// The running stand-in.
#[derive(Clone)]
pub struct KubeApi {
    state: Arc<Mutex<State>>,
    /// HTTPS port on 127.0.0.1.
    pub port: u16,
    /// PEM of the certificate to trust it with.
    pub ca_pem: String,
}

/// The bearer token the stand-in accepts.
pub const TOKEN: &str = "controller-sa-token";

impl KubeApi {
    /// Starts the stand-in with empty collections.
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let s2 = state.clone();
        let (port, ca_pem) = https_reply(move |method, path, bearer, _body| {
            answer(&mut s2.lock().unwrap(), method, path, bearer)
        })
        .await;
        Self {
            state,
            port,
            ca_pem,
        }
    }

    /// Adds or replaces an object (keyed by namespace/name), as a write to the API server.
    pub fn put(&self, collection: &str, mut obj: Value) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let k = key(&obj);
        let map = s.objects.entry(collection.into()).or_default();
        let kind = if map.contains_key(&k) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        map.insert(k, obj.clone());
        publish(&mut s, collection, json!({"type": kind, "object": obj}));
    }

    /// Deletes the object `namespace/name` (namespace empty for cluster-scoped ones).
    pub fn delete(&self, collection: &str, namespace: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        let Some(mut obj) = s
            .objects
            .get_mut(collection)
            .and_then(|m| m.remove(&format!("{namespace}/{name}")))
        else {
            panic!("{collection}: no {namespace}/{name} to delete");
        };
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        publish(
            &mut s,
            collection,
            json!({"type": "DELETED", "object": obj}),
        );
    }

    /// Ends every open watch (the API server closing them, as it does after timeoutSeconds).
    pub fn end_watches(&self) {
        self.state.lock().unwrap().watchers.clear();
    }

    /// While `refuse` is true, every new watch gets 500 (lists still work).
    pub fn refuse_watches(&self, refuse: bool) {
        self.state.lock().unwrap().refuse_watches = refuse;
    }

    /// Forgets the history up to now: a watch from any older resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        let mut s = self.state.lock().unwrap();
        s.compacted = s.rv;
        s.history.clear();
    }

    /// Every request answered so far, as "METHOD path?query".
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The number of open watches.
    pub fn open_watches(&self) -> usize {
        let mut s = self.state.lock().unwrap();
        s.watchers.retain(|(_, tx)| !tx.is_closed());
        s.watchers.len()
    }
}

fn key(obj: &Value) -> String {
    let m = |f: &str| obj["metadata"][f].as_str().unwrap_or_default().to_string();
    format!("{}/{}", m("namespace"), m("name"))
}

fn publish(s: &mut State, collection: &str, event: Value) {
    s.history.push((s.rv, collection.into(), event.clone()));
    s.watchers
        .retain(|(c, tx)| c != collection || tx.send(event.clone()).is_ok());
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// One request: a list, a watch, or an error Status.
fn answer(s: &mut State, method: &str, target: &str, bearer: Option<&str>) -> Reply {
    s.requests.push(format!("{method} {target}"));
    if bearer != Some(TOKEN) {
        return Reply::Json(401, status(401, "Unauthorized", "Unauthorized"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if method != "GET" || ![PODS, NAMESPACES, CLUSTER_SPIFFE_IDS].contains(&path) {
        return Reply::Json(404, status(404, "NotFound", "the server could not find it"));
    }
    let params: BTreeMap<&str, &str> = query.split('&').filter_map(|p| p.split_once('=')).collect();
    if params.get("watch") != Some(&"true") {
        let items: Vec<Value> = s
            .objects
            .get(path)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        return Reply::Json(
            200,
            json!({"kind": "List", "apiVersion": "v1",
                   "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
        );
    }
    if s.refuse_watches {
        return Reply::Json(500, status(500, "InternalError", "watches refused"));
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if from < s.compacted {
        let msg = format!("too old resource version: {from} ({})", s.compacted);
        let _ = tx.send(json!({"type": "ERROR", "object": status(410, "Expired", &msg)}));
        return Reply::Lines(rx);
    }
    for (rv, c, ev) in &s.history {
        if *rv > from && c == path {
            let _ = tx.send(ev.clone());
        }
    }
    s.watchers.push((path.to_string(), tx));
    Reply::Lines(rx)
}
