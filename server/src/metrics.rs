//! Prometheus metrics served at `[metrics] bind_address` (`/metrics`): counters of what the
//! server did, per-RPC counts and latencies of the agent API and EngineBroker (recorded by the
//! shared tower layer, [`continuity_common::metrics`]), the CA's expiry and the integrity
//! failures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use continuity_common::metrics::{RpcMetrics, gauge};
use tokio::sync::watch;

use crate::ca::Bundle;
use crate::datastore::BadRows;

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Successful node attestations.
    pub attestations_ok: AtomicU64,
    /// Refused node attestations.
    pub attestations_failed: AtomicU64,
    /// X509-SVIDs signed for workloads.
    pub x509_svids_signed: AtomicU64,
    /// JWT-SVIDs signed.
    pub jwt_svids_signed: AtomicU64,
    /// Admin API calls.
    pub admin_calls: AtomicU64,
    /// Agents flagged forked (a superseded agent SVID was presented).
    pub agent_forks: AtomicU64,
    /// Agent API connections refused at a connection cap (`[agent_api] max_connections*`).
    pub agent_connections_refused: AtomicU64,
    /// Agent API connections closed for not finishing the TLS handshake in time.
    pub agent_handshake_timeouts: AtomicU64,
    /// Signing requests refused by the per-agent rate limit (`svids_per_second`).
    pub svid_rate_limited: AtomicU64,
    /// EngineBroker calls refused by the per-agent rate limit (`engine_calls_per_second`).
    pub engine_rate_limited: AtomicU64,
    /// The datastore's known bad rows (`continuity_integrity_bad_rows` gauge).
    bad_rows: OnceLock<Arc<BadRows>>,
    /// Calls of the agent-facing gRPC services (agent API, EngineBroker).
    pub rpc: Arc<RpcMetrics>,
    /// The CA's current bundle (`continuity_server_ca_expiry_timestamp_seconds`).
    bundle: OnceLock<watch::Receiver<Arc<Bundle>>>,
}

impl Metrics {
    /// Adds one.
    pub fn inc(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    pub fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Shows the count of `bad` as the `continuity_integrity_bad_rows` gauge.
    pub fn watch_bad_rows(&self, bad: Arc<BadRows>) {
        let _ = self.bad_rows.set(bad);
    }

    /// Shows the expiry of the authorities in `bundle` (the CA's current bundle).
    pub fn watch_bundle(&self, bundle: watch::Receiver<Arc<Bundle>>) {
        let _ = self.bundle.set(bundle);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let rows = [
            (
                "continuity_server_attestations_total{result=\"ok\"}",
                &self.attestations_ok,
            ),
            (
                "continuity_server_attestations_total{result=\"refused\"}",
                &self.attestations_failed,
            ),
            (
                "continuity_server_x509_svids_signed_total",
                &self.x509_svids_signed,
            ),
            (
                "continuity_server_jwt_svids_signed_total",
                &self.jwt_svids_signed,
            ),
            ("continuity_server_admin_calls_total", &self.admin_calls),
            (
                "continuity_server_agent_connections_refused_total",
                &self.agent_connections_refused,
            ),
            (
                "continuity_server_agent_handshake_timeouts_total",
                &self.agent_handshake_timeouts,
            ),
            (
                "continuity_server_rate_limited_total{limit=\"svids_per_second\"}",
                &self.svid_rate_limited,
            ),
            (
                "continuity_server_rate_limited_total{limit=\"engine_calls_per_second\"}",
                &self.engine_rate_limited,
            ),
            ("continuity_server_agent_forks_total", &self.agent_forks),
        ];
        let mut out = String::from(
            "# TYPE continuity_server_attestations_total counter\n# TYPE continuity_server_x509_svids_signed_total counter\n# TYPE continuity_server_jwt_svids_signed_total counter\n# TYPE continuity_server_admin_calls_total counter\n# TYPE continuity_server_agent_connections_refused_total counter\n# TYPE continuity_server_agent_handshake_timeouts_total counter\n# TYPE continuity_server_rate_limited_total counter\n# TYPE continuity_server_agent_forks_total counter\n",
        );
        for (name, c) in rows {
            out.push_str(&format!("{name} {}\n", c.load(Ordering::Relaxed)));
        }
        let bad = self.bad_rows.get().map_or(0, |b| b.count());
        out.push_str(&format!(
            "# TYPE continuity_integrity_bad_rows gauge\ncontinuity_integrity_bad_rows {bad}\n"
        ));
        self.render_ca(&mut out);
        self.rpc.render("continuity_server", &mut out);
        out
    }

    /// `continuity_server_ca_expiry_timestamp_seconds{purpose}`: the latest NotAfter among the
    /// X.509 authorities and the latest expiry among the JWT keys of the bundle, that is, when
    /// the trust domain stops verifying if no new authority is made.
    fn render_ca(&self, out: &mut String) {
        let Some(rx) = self.bundle.get() else { return };
        let bundle = rx.borrow().clone();
        let x509 = bundle
            .x509_authorities
            .iter()
            .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
            .map(|(_, c)| c.validity().not_after.timestamp())
            .max();
        let jwt = bundle.jwt_authorities.iter().map(|k| k.expires_at).max();
        let name = "continuity_server_ca_expiry_timestamp_seconds";
        out.push_str(&format!(
            "# HELP {name} When the latest authority of each purpose expires (unix seconds).\n# TYPE {name} gauge\n"
        ));
        for (purpose, at) in [("x509", x509), ("jwt", jwt)] {
            if let Some(at) = at {
                out.push_str(&format!("{name}{{purpose=\"{purpose}\"}} {at}\n"));
            }
        }
        gauge(
            out,
            "continuity_server_bundle_sequence",
            "Sequence number of the trust bundle.",
            bundle.sequence,
        );
    }
}
