//! Automatic registration, as SPIRE's controller-manager does it: the server watches pods,
//! namespaces and `ClusterSPIFFEID` resources through the Kubernetes API server and keeps one
//! entry per (resource, matching pod) — created, updated and deleted through the registry, so
//! every write is audited like an operator's.
//!
//! Invariant: the controller only ever touches entries whose id starts with its ownership mark
//! `k8s-controller/<cluster>/` (ids never reach workloads, unlike hints), or — made by an older
//! version — whose hint does; those are replaced by id-marked entries with no hint. Operator-made
//! entries are never changed, and one registering the same thing stands in for the controller's.
//! Besides one entry per (resource, pod), it keeps the node alias entry `node_alias_id` for
//! every agent of the cluster (`k8s_psat:cluster:<cluster_name>`). Each kind is
//! listed, then watched from the list's resourceVersion; a watch that ends is resumed from the
//! last resourceVersion seen, and one answered with 410 Gone is replaced by a fresh list. Every
//! reconcile compares the whole desired set with the whole owned set, so a lost or repeated
//! event cannot leave an entry missing or doubled. With several servers, only the holder of
//! the controller's lease (`leader`) reconciles; the others keep their view current.

mod kube;
mod leader;
mod reconcile;
pub mod template;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use continuity_common::TrustDomain;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::config::ControllerConfig;
use crate::engines::Engines;
use crate::registry::Registry;
pub use kube::Kind;
pub use leader::{Leadership, lease_name};

/// Pause after a failed list or watch before trying again.
const RETRY: Duration = Duration::from_secs(1);

/// Controller failures.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The controller cannot start (bad CA file).
    #[error("{0}")]
    Setup(String),
    /// A call to the API server failed or answered something unusable.
    #[error("API server: {0}")]
    Api(String),
}

/// A change to the controller's view of one collection.
#[derive(Debug)]
enum Update {
    /// A fresh list: everything of this kind.
    Replace(Kind, Vec<Value>),
    /// An object added or modified.
    Upsert(Kind, Value),
    /// An object deleted.
    Delete(Kind, Value),
}

/// What the controller needs from the rest of the server.
#[derive(Clone)]
pub struct Deps {
    /// Where entries are written.
    pub registry: Arc<Registry>,
    /// Engine names are checked here.
    pub engines: Arc<Engines>,
    /// The server's trust domain.
    pub trust_domain: TrustDomain,
    /// The lease that lets one server at a time write.
    pub leadership: Leadership,
}

/// Starts the watchers and the reconciler; they run until the process ends.
pub fn spawn(cfg: &ControllerConfig, deps: Deps) -> Result<(), ControllerError> {
    let client = Arc::new(kube::Client::new(cfg)?);
    let (tx, rx) = mpsc::channel(1024);
    for kind in Kind::ALL {
        tokio::spawn(follow(client.clone(), kind, tx.clone()));
    }
    let lease = leader::Lease::new(deps.leadership.clone(), &cfg.cluster_name);
    let reconciler = reconcile::Reconciler::new(cfg, deps);
    tokio::spawn(run(reconciler, lease, rx));
    tracing::info!(api_server = %cfg.api_server, cluster = %cfg.cluster_name, "controller started");
    Ok(())
}

/// Lists `kind`, then watches it for ever (resuming, or listing again after 410 Gone).
async fn follow(client: Arc<kube::Client>, kind: Kind, tx: mpsc::Sender<Update>) {
    loop {
        let c = client.clone();
        let listed = tokio::task::spawn_blocking(move || c.list(kind)).await;
        let mut rv = match listed {
            Ok(Ok((items, rv))) => {
                if tx.send(Update::Replace(kind, items)).await.is_err() {
                    return;
                }
                rv
            }
            Ok(Err(e)) => {
                tracing::warn!(?kind, error = %e, "controller: list failed; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
            Err(_) => return,
        };
        loop {
            let (c, tx2) = (client.clone(), tx.clone());
            let watched = tokio::task::spawn_blocking(move || {
                let end = c.watch(kind, &mut rv, |ev| {
                    let u = match ev {
                        kube::Event::Upsert(v) => Update::Upsert(kind, v),
                        kube::Event::Delete(v) => Update::Delete(kind, v),
                    };
                    tx2.blocking_send(u).is_ok()
                });
                (end, rv)
            })
            .await;
            let Ok((end, last)) = watched else { return };
            rv = last;
            match end {
                Ok(kube::WatchEnd::Ended) => {
                    tracing::debug!(?kind, %rv, "controller: watch ended; resuming")
                }
                Ok(kube::WatchEnd::Gone) => {
                    tracing::info!(?kind, %rv, "controller: resourceVersion expired (410); listing again");
                    break;
                }
                Err(e) => {
                    tracing::warn!(?kind, error = %e, "controller: watch failed; resuming");
                    tokio::time::sleep(RETRY).await;
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    }
}

/// Applies updates to the view and, while this server holds the lease, reconciles after each
/// burst, after a failure (within [`RETRY`]) and at every lease renewal.
async fn run(
    mut r: reconcile::Reconciler,
    mut lease: leader::Lease,
    mut rx: mpsc::Receiver<Update>,
) {
    let mut view = View::default();
    let mut dirty = false;
    let mut renew = tokio::time::interval(lease.renew_period());
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let retry = async {
            if dirty {
                tokio::time::sleep(RETRY).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            u = rx.recv() => {
                let Some(u) = u else { return };
                view.apply(u);
                while let Ok(u) = rx.try_recv() {
                    view.apply(u);
                }
            }
            _ = renew.tick() => {}
            () = retry => {}
        }
        // Until every kind has been listed once, a reconcile would delete what it has not seen.
        if view.complete() && lease.hold().await {
            dirty = !r.reconcile(&view).await;
        }
    }
}

/// The controller's copy of the three collections, keyed by uid (name when absent).
#[derive(Debug, Default)]
pub struct View {
    objects: HashMap<Kind, BTreeMap<String, Value>>,
}

impl View {
    fn apply(&mut self, u: Update) {
        match u {
            Update::Replace(kind, items) => {
                let map = items.into_iter().map(|v| (key(&v), v)).collect();
                self.objects.insert(kind, map);
            }
            Update::Upsert(kind, v) => {
                self.objects.entry(kind).or_default().insert(key(&v), v);
            }
            Update::Delete(kind, v) => {
                self.objects.entry(kind).or_default().remove(&key(&v));
            }
        }
    }

    fn complete(&self) -> bool {
        Kind::ALL.iter().all(|k| self.objects.contains_key(k))
    }

    /// The objects of `kind` that parse as `T` (the others are logged and left out).
    pub fn parsed<T: serde::de::DeserializeOwned>(&self, kind: Kind) -> Vec<T> {
        let Some(map) = self.objects.get(&kind) else {
            return Vec::new();
        };
        map.iter()
            .filter_map(|(k, v)| match serde_json::from_value(v.clone()) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(?kind, object = %k, error = %e, "controller: object ignored");
                    None
                }
            })
            .collect()
    }
}

fn key(v: &Value) -> String {
    let meta = |f: &str| {
        v.pointer(&format!("/metadata/{f}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let uid = meta("uid");
    if uid.is_empty() {
        format!("{}/{}", meta("namespace"), meta("name"))
    } else {
        uid
    }
}
