//! Prometheus counters served at `[metrics] bind_address` (`/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

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
        out
    }
}
