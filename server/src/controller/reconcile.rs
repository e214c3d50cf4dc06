//! From the view of pods, namespaces and `ClusterSPIFFEID`s to the entries that should exist,
//! and the registry writes that make the owned entries exactly those.

use std::collections::BTreeMap;

use crate::config::ControllerConfig;
use crate::entry::{Entry, EntryRequest, NODE_PARENT_PATH};

use super::template::{ClusterSpiffeId, Context, Namespace, Pod, render};
use super::{Deps, Kind, View};

/// The audit actor of the controller's writes.
const ACTOR: &str = "controller";

/// Keeps the owned entries equal to the desired ones.
pub struct Reconciler {
    deps: Deps,
    cluster_name: String,
    node_alias_id: String,
    /// Id prefix marking an entry as this controller's (`k8s-controller/<cluster>/`); entries
    /// made before ownership moved to the id carry it in their hint instead.
    owner: String,
}

/// An entry's identity for comparison: SPIFFE ID, parent and sorted selectors.
type Key = (String, String, Vec<String>);

fn key_of(e: &Entry) -> Key {
    let mut s: Vec<String> = e.selectors.iter().map(ToString::to_string).collect();
    s.sort();
    (e.spiffe_id.to_string(), e.parent_id.to_string(), s)
}

impl Reconciler {
    /// A reconciler for the cluster in `cfg`.
    pub fn new(cfg: &ControllerConfig, deps: Deps) -> Self {
        Self {
            deps,
            cluster_name: cfg.cluster_name.clone(),
            node_alias_id: cfg.node_alias_id.to_string(),
            owner: format!("k8s-controller/{}/", cfg.cluster_name),
        }
    }

    /// One pass; false when a write failed (the caller tries again soon).
    pub async fn reconcile(&mut self, view: &View) -> bool {
        let desired = self.desired(view);
        let registry = &self.deps.registry;
        let owner = self.owner.as_str();
        // Owned: the id mark, or the hint mark of entries made before ownership moved to the id.
        let owned = registry.entries(|e| e.id.starts_with(owner) || e.hint.starts_with(owner));
        let mut ok = true;
        let mut existing: BTreeMap<Key, std::sync::Arc<Entry>> = BTreeMap::new();
        for e in owned {
            let k = key_of(&e);
            // A hint-marked entry shows the mark to its workloads: it is replaced by an
            // id-marked one without it (deleted here, created again below).
            let legacy = !e.id.starts_with(owner);
            if legacy || !desired.contains_key(&k) || existing.contains_key(&k) {
                if let Err(err) = registry.delete_entry(&e.id, ACTOR).await {
                    tracing::warn!(entry = %e.id, error = %err, "controller: delete failed");
                    ok = false;
                }
            } else {
                existing.insert(k, e);
            }
        }
        for (k, want) in desired {
            let result = match existing.get(&k) {
                Some(have) if same_content(have, &want) => continue,
                Some(have) => {
                    let mut e = want;
                    e.id = have.id.clone();
                    e.created_at = have.created_at;
                    registry.update_entry(e, ACTOR).await.map(|_| ())
                }
                // An operator's entry registers it already: it is theirs, left alone.
                None if !registry.entries(|e| e.same_registration(&want)).is_empty() => continue,
                None => registry
                    .create_entry_with_id_prefix(want, owner, ACTOR)
                    .await
                    .map(|_| ()),
            };
            if let Err(err) = result {
                tracing::warn!(spiffe_id = %k.0, error = %err, "controller: entry write failed");
                ok = false;
            }
        }
        ok
    }

    /// The node alias entry: every agent of this cluster (`k8s_psat:cluster:<cluster_name>`)
    /// is authorized for the entries parented to `node_alias_id`.
    fn node_alias(&self) -> Result<Entry, String> {
        let req = EntryRequest {
            spiffe_id: self.node_alias_id.clone(),
            parent_id: format!("spiffe://{}{NODE_PARENT_PATH}", self.deps.trust_domain),
            selectors: vec![(
                continuity_attestors::k8s_psat::ATTESTOR_TYPE.into(),
                format!("cluster:{}", self.cluster_name),
            )],
            ..EntryRequest::default()
        };
        req.validate(&self.deps.trust_domain, |_| false)
            .map_err(|e| e.to_string())
    }

    /// Every entry the resources ask for, one per (resource, live matching pod); the first
    /// resource by name wins when two ask for the same registration.
    fn desired(&self, view: &View) -> BTreeMap<Key, Entry> {
        let namespaces: BTreeMap<String, BTreeMap<String, String>> = view
            .parsed::<Namespace>(Kind::Namespaces)
            .into_iter()
            .map(|n| (n.metadata.name, n.metadata.labels))
            .collect();
        let pods: Vec<Pod> = view
            .parsed::<Pod>(Kind::Pods)
            .into_iter()
            .filter(Pod::is_live)
            .collect();
        let mut resources = view.parsed::<ClusterSpiffeId>(Kind::ClusterSpiffeIds);
        resources.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let no_labels = BTreeMap::new();
        let mut out = BTreeMap::new();
        match self.node_alias() {
            Ok(e) => {
                out.insert(key_of(&e), e);
            }
            Err(m) => tracing::warn!(error = %m, "controller: no node alias entry"),
        }
        for r in &resources {
            for pod in &pods {
                let ns_labels = namespaces
                    .get(&pod.metadata.namespace)
                    .unwrap_or(&no_labels);
                let selected = r
                    .spec
                    .pod_selector
                    .as_ref()
                    .is_none_or(|s| s.matches(&pod.metadata.labels))
                    && r.spec
                        .namespace_selector
                        .as_ref()
                        .is_none_or(|s| s.matches(ns_labels));
                if !selected {
                    continue;
                }
                match self.entry_for(r, pod) {
                    Ok(e) => {
                        out.entry(key_of(&e)).or_insert(e);
                    }
                    Err(m) => tracing::warn!(
                        resource = %r.metadata.name, pod = %pod.metadata.name,
                        namespace = %pod.metadata.namespace, error = %m,
                        "controller: no entry for this pod"
                    ),
                }
            }
        }
        out
    }

    /// The entry `r` asks for `pod`, checked by the same rules as an operator's.
    fn entry_for(&self, r: &ClusterSpiffeId, pod: &Pod) -> Result<Entry, String> {
        let td = self.deps.trust_domain.to_string();
        let ctx = Context {
            trust_domain: &td,
            cluster_name: &self.cluster_name,
            pod,
        };
        let dns_names = r
            .spec
            .dns_name_templates
            .iter()
            .map(|t| render(t, &ctx))
            .collect::<Result<Vec<_>, _>>()?;
        let req = EntryRequest {
            spiffe_id: render(&r.spec.spiffe_id_template, &ctx)?,
            parent_id: self.node_alias_id.clone(),
            selectors: vec![
                ("k8s".into(), format!("ns:{}", pod.metadata.namespace)),
                ("k8s".into(), format!("pod-uid:{}", pod.metadata.uid)),
            ],
            dns_names,
            engine: r.spec.engine.clone().unwrap_or_default(),
            ..EntryRequest::default()
        };
        req.validate(&self.deps.trust_domain, |name| {
            self.deps.engines.engine(name).is_ok()
        })
        .map_err(|e| e.to_string())
    }
}

/// Whether two entries of the same key carry the same content the controller sets.
fn same_content(a: &Entry, b: &Entry) -> bool {
    a.hint == b.hint && a.dns_names == b.dns_names && a.engine == b.engine
}
