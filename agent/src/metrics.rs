//! The agent's Prometheus metrics (`[metrics] bind_address`, `/metrics`): per-RPC counts and
//! latencies of the Workload API and EngineAPI (recorded by the shared tower layer around the
//! socket's services), the cache (identities, bundles, the earliest SVID expiry), the server
//! connection and how long ago the last successful sync was.

use std::sync::Arc;

use continuity_common::metrics::{RpcMetrics, counter, escape_label, gauge};

use crate::manager::Manager;

/// What `/metrics` shows: the manager's state and the socket's RPCs.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    manager: Arc<Manager>,
    rpc: Arc<RpcMetrics>,
}

impl AgentMetrics {
    /// Metrics of `manager` and of the calls recorded in `rpc`.
    pub fn new(manager: Arc<Manager>, rpc: Arc<RpcMetrics>) -> Self {
        Self { manager, rpc }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let m = &self.manager;
        let snap = m.snapshot();
        let mut out = String::new();
        gauge(
            &mut out,
            "continuity_agent_cached_svids",
            "Identities (entries with an X509-SVID) the agent serves.",
            snap.identities.len(),
        );
        // The local trust domain's bundle, plus each foreign one held for federation.
        let bundles = usize::from(!snap.bundle.x509.is_empty()) + snap.federated.len();
        gauge(
            &mut out,
            "continuity_agent_cached_bundles",
            "Trust bundles the agent holds (its own trust domain's and the federated ones).",
            bundles,
        );
        if let Some(earliest) = snap.identities.iter().map(|i| i.expires_at).min() {
            gauge(
                &mut out,
                "continuity_agent_svid_earliest_expiry_timestamp_seconds",
                "NotAfter (unix seconds) of the X509-SVID that expires first.",
                earliest,
            );
        }
        gauge(
            &mut out,
            "continuity_agent_sync_lag_seconds",
            "Seconds since the last successful sync with the server (since start before it).",
            m.sync_lag(),
        );
        gauge(
            &mut out,
            "continuity_agent_server_connected",
            "1 while the last contact with the server succeeded.",
            u8::from(m.connected()),
        );
        gauge(
            &mut out,
            "continuity_agent_bundle_sequence",
            "Sequence number of the held bundle.",
            snap.bundle.sequence,
        );
        counter(
            &mut out,
            "continuity_agent_server_switches_total",
            "Times the agent moved to another server.",
            m.server_switches(),
        );
        if let Some(server) = m.server() {
            let server = escape_label(&server.to_string());
            out.push_str(&format!(
                "# HELP continuity_agent_server The server in use.\n# TYPE continuity_agent_server gauge\ncontinuity_agent_server{{address=\"{server}\"}} 1\n"
            ));
        }
        self.rpc.render("continuity_agent", &mut out);
        out
    }
}
