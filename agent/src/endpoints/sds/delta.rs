//! DeltaSecrets: the incremental xDS protocol. (SPIRE's agent answers Unimplemented; this
//! serves the same resources as StreamSecrets, incrementally.)
//!
//! The first request may be a wildcard (no names, or `*`): every resource the workload may see.
//! Each resource carries its own version; a response holds only the resources whose version
//! the client does not have yet (its `initial_resource_versions` count) and, in
//! `removed_resources`, subscribed names that no longer (or never did) resolve. An ACK or NACK
//! that changes no subscription sends nothing; a NACK is logged once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use continuity_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};

use super::resources::{SECRET_TYPE_URL, View, ViewKey, to_any, use_spiffe_validator};
use super::{MAX_RESOURCE_NAMES, check_names, check_type_url, nack_message};
use crate::endpoints::workload::Caller;
use crate::manager::cache::Snapshot;

type Tx = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

/// The wildcard resource name.
const WILDCARD: &str = "*";

/// One DeltaSecrets call's state.
struct Delta {
    caller: Caller,
    view: View,
    key: ViewKey,
    version: u64,
    nonces: u64,
    /// The nonce of the last response sent, and of the last one NACKed.
    last_nonce: String,
    nacked: String,
    spiffe: bool,
    /// Whether the first request has been seen.
    started: bool,
    wildcard: bool,
    subscribed: BTreeSet<String>,
    /// Name → the version the client holds ("" once it was told the name is absent).
    known: BTreeMap<String, String>,
}

/// Serves one DeltaSecrets call until the client ends it or stops reading.
pub(super) async fn run(
    caller: Caller,
    mut rx: watch::Receiver<Arc<Snapshot>>,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: Tx,
) {
    let snap = rx.borrow_and_update().clone();
    let view = View::new(&snap, &caller.selectors);
    let mut st = Delta {
        key: view.key(),
        view,
        caller,
        version: 1,
        nonces: 0,
        last_nonce: String::new(),
        nacked: String::new(),
        spiffe: true,
        started: false,
        wildcard: false,
        subscribed: BTreeSet::new(),
        known: BTreeMap::new(),
    };
    loop {
        let out = tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => st.on_request(req),
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "SDS delta stream ended by the client");
                    return;
                }
            },
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let snap = rx.borrow_and_update().clone();
                st.on_snapshot(&snap)
            },
            () = tx.closed() => return,
        };
        let sent = match out {
            Ok(None) => Ok(()),
            Ok(Some(resp)) => tx.send(Ok(resp)).await,
            Err(status) => {
                tracing::info!(workload = %st.caller.workload_id, error = %status.message(), "SDS delta stream refused a request");
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

impl Delta {
    /// Applies one request's subscription changes; answers what the client now lacks.
    fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
    ) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        check_type_url(&req.type_url)?;
        check_names(req.resource_names_subscribe.len())?;
        check_names(req.initial_resource_versions.len())?;
        if let Some(e) = &req.error_detail {
            self.log_nack(&req.response_nonce, e);
        }
        if !self.started {
            self.started = true;
            self.spiffe = use_spiffe_validator(req.node.as_ref());
            self.wildcard = req.resource_names_subscribe.is_empty();
            self.known = req.initial_resource_versions.into_iter().collect();
        }
        for name in req.resource_names_unsubscribe {
            if name == WILDCARD {
                self.wildcard = false;
            }
            self.subscribed.remove(&name);
            self.known.remove(&name);
        }
        for name in req.resource_names_subscribe {
            if name == WILDCARD {
                self.wildcard = true;
            } else if !name.is_empty() {
                self.subscribed.insert(name);
            }
        }
        if self.subscribed.len() > MAX_RESOURCE_NAMES {
            return Err(Status::invalid_argument(format!(
                "more than {MAX_RESOURCE_NAMES} resource names subscribed"
            )));
        }
        self.diff()
    }

    /// Logs a NACK of the last response once (a stale or repeated one is debug only).
    fn log_nack(&mut self, nonce: &str, e: &continuity_proto::google::rpc::Status) {
        if nonce != self.last_nonce || nonce == self.nacked {
            tracing::debug!(
                nonce,
                "SDS delta NACK of a stale or already NACKed response"
            );
            return;
        }
        self.nacked = nonce.to_string();
        tracing::warn!(
            workload = %self.caller.workload_id,
            nonce,
            code = e.code,
            error = ?nack_message(e),
            "Envoy rejected the secrets sent (delta NACK); not resending until they change"
        );
    }

    /// A new snapshot: the changed resources, when what this workload may see changed.
    fn on_snapshot(&mut self, snap: &Snapshot) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        let view = View::new(snap, &self.caller.selectors);
        let key = view.key();
        if key == self.key {
            return Ok(None);
        }
        self.view = view;
        self.key = key;
        self.version += 1;
        if !self.started {
            return Ok(None);
        }
        self.diff()
    }

    /// The resources the client lacks and the names it must drop; None when there are none.
    fn diff(&mut self) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        let mut names = self.subscribed.clone();
        if self.wildcard {
            names.extend(self.view.all_names());
        }
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        for name in &names {
            match self.view.resolve(name, self.spiffe)? {
                Some(secret) => {
                    let version = self.view.version_of(name, &secret);
                    if self.known.get(name) != Some(&version) {
                        self.known.insert(name.clone(), version.clone());
                        resources.push(Resource {
                            version,
                            resource: Some(to_any(&secret)),
                            name: name.clone(),
                            aliases: vec![],
                        });
                    }
                }
                None => {
                    if self.known.get(name).is_none_or(|v| !v.is_empty()) {
                        self.known.insert(name.clone(), String::new());
                        removed.push(name.clone());
                    }
                }
            }
        }
        // Names the client holds that are no longer subscribed (a wildcard resource that went).
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|n| !names.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            if self.known.remove(&name).is_some_and(|v| !v.is_empty()) {
                removed.push(name);
            }
        }
        if resources.is_empty() && removed.is_empty() {
            return Ok(None);
        }
        self.nonces += 1;
        self.last_nonce = format!("{}-{}", self.version, self.nonces);
        Ok(Some(DeltaDiscoveryResponse {
            system_version_info: self.version.to_string(),
            resources,
            type_url: SECRET_TYPE_URL.to_string(),
            nonce: self.last_nonce.clone(),
            removed_resources: removed,
        }))
    }
}
