//! StreamSecrets: the state-of-the-world xDS protocol, as SPIRE's agent speaks it.
//!
//! Every response carries the stream's current version and a fresh nonce. A request whose
//! nonce is not the last one sent is stale and ignored. A request answering the last nonce is
//! an ACK (its version is the current one) or a NACK (`error_detail` set, logged once); either
//! way nothing is sent unless the requested names changed, so a NACK never makes the agent
//! resend in a loop. The version moves when what the workload may see changes (rotation, a
//! bundle change), and the last requested names are then pushed again.

use std::collections::BTreeSet;
use std::sync::Arc;

use continuity_proto::envoy::config::core::v3::Node;
use continuity_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};

use super::resources::{SECRET_TYPE_URL, View, ViewKey, use_spiffe_validator};
use super::{answer, check_names, check_type_url, nack_message};
use crate::endpoints::workload::Caller;
use crate::manager::cache::Snapshot;

type Tx = mpsc::Sender<Result<DiscoveryResponse, Status>>;

/// One StreamSecrets call's state.
struct Sotw {
    caller: Caller,
    view: View,
    key: ViewKey,
    version: u64,
    nonces: u64,
    last_nonce: String,
    /// The nonce of the last response NACKed (each is logged once).
    nacked: String,
    /// The last request's names (None until the first request).
    names: Option<Vec<String>>,
    node: Option<Node>,
}

/// Serves one StreamSecrets call until the client ends it or stops reading.
pub(super) async fn run(
    caller: Caller,
    mut rx: watch::Receiver<Arc<Snapshot>>,
    mut inbound: Streaming<DiscoveryRequest>,
    tx: Tx,
) {
    let snap = rx.borrow_and_update().clone();
    let view = View::new(&snap, &caller.selectors);
    let mut st = Sotw {
        key: view.key(),
        view,
        caller,
        version: 1,
        nonces: 0,
        last_nonce: String::new(),
        nacked: String::new(),
        names: None,
        node: None,
    };
    loop {
        let out = tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => st.on_request(req),
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "SDS stream ended by the client");
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
        match out {
            Ok(None) => {}
            Ok(Some(resp)) => {
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
            Err(status) => {
                tracing::info!(workload = %st.caller.workload_id, error = %status.message(), "SDS stream refused a request");
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
    }
}

impl Sotw {
    /// Handles one request: what to send, if anything (see the module docs).
    fn on_request(
        &mut self,
        mut req: DiscoveryRequest,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        check_type_url(&req.type_url)?;
        check_names(req.resource_names.len())?;
        if !self.last_nonce.is_empty() {
            if req.response_nonce != self.last_nonce {
                tracing::debug!(nonce = %req.response_nonce, expect = %self.last_nonce, "SDS request with a stale nonce ignored");
                return Ok(None);
            }
            if let Some(e) = &req.error_detail {
                self.log_nack(&req, e);
            } else if req.version_info != self.version.to_string() {
                tracing::warn!(
                    workload = %self.caller.workload_id,
                    version = %req.version_info,
                    expect = self.version,
                    "Envoy did not apply the last SDS version and rolled back"
                );
            }
            if req.node.is_none() {
                req.node = self.node.clone();
            }
        }
        let changed = self
            .names
            .as_ref()
            .is_none_or(|old| names_differ(old, &req.resource_names));
        self.names = Some(req.resource_names);
        if req.node.is_some() {
            self.node = req.node;
        }
        if !changed {
            return Ok(None);
        }
        self.respond().map(Some)
    }

    /// Logs a NACK of the last response, once per response (a repeat is debug only).
    fn log_nack(&mut self, req: &DiscoveryRequest, e: &continuity_proto::google::rpc::Status) {
        if self.nacked == self.last_nonce {
            tracing::debug!(nonce = %req.response_nonce, "SDS NACK repeated");
            return;
        }
        self.nacked.clone_from(&self.last_nonce);
        tracing::warn!(
            workload = %self.caller.workload_id,
            names = ?req.resource_names,
            nonce = %req.response_nonce,
            code = e.code,
            error = ?nack_message(e),
            "Envoy rejected the secrets sent (NACK); not resending until they change"
        );
    }

    /// A new snapshot: a new version, pushed, when what this workload may see changed.
    fn on_snapshot(&mut self, snap: &Snapshot) -> Result<Option<DiscoveryResponse>, Status> {
        let view = View::new(snap, &self.caller.selectors);
        let key = view.key();
        if key == self.key {
            return Ok(None);
        }
        self.view = view;
        self.key = key;
        self.version += 1;
        if self.names.is_none() {
            return Ok(None);
        }
        self.respond().map(Some)
    }

    /// The response to the last request's names at the current version.
    fn respond(&mut self) -> Result<DiscoveryResponse, Status> {
        let names = self.names.as_deref().unwrap_or_default();
        let spiffe = use_spiffe_validator(self.node.as_ref());
        let resources = answer(&self.view, names, spiffe)?;
        self.nonces += 1;
        self.last_nonce = format!("{}-{}", self.version, self.nonces);
        tracing::debug!(workload = %self.caller.workload_id, version = self.version, count = resources.len(), "sending SDS secrets");
        Ok(DiscoveryResponse {
            version_info: self.version.to_string(),
            resources,
            canary: false,
            type_url: SECRET_TYPE_URL.to_string(),
            nonce: self.last_nonce.clone(),
        })
    }
}

/// Whether two requests name different sets of resources.
fn names_differ(old: &[String], new: &[String]) -> bool {
    let a: BTreeSet<&String> = old.iter().collect();
    let b: BTreeSet<&String> = new.iter().collect();
    a != b
}
