//! Prometheus text exposition shared by the agent and the server: a small latency histogram,
//! per-RPC call counts and latencies recorded by a tower layer around the tonic services, and
//! the writers for gauges and counters. Names follow Prometheus conventions: a `continuity_`
//! prefix, `_total` counters, `_seconds` histograms in base units, and gRPC status names
//! (`OK`, `PERMISSION_DENIED`, ...) in the `code` label.
//!
//! Invariant: a histogram's `_count` equals its `+Inf` bucket and every bucket is at least the
//! one before it (both are computed from one set of per-bucket counts under one lock), so a
//! scrape racing a call never sees an inconsistent histogram. The number of distinct
//! (service, method) series is capped ([`MAX_METHODS`]): a peer calling made-up paths cannot
//! grow the registry without bound.

mod layer;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

pub use layer::{RpcMetricsLayer, RpcMetricsService};

/// Upper bounds (seconds) of the latency buckets: 1 ms to 10 s, roughly ×2.5 apart.
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Most distinct (service, method) pairs recorded; later ones are counted as `other`.
pub const MAX_METHODS: usize = 128;

/// A latency histogram with [`LATENCY_BUCKETS`] (not cumulative inside; rendered cumulative).
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// Observations per bucket; the last one counts those above the largest bound.
    counts: [u64; LATENCY_BUCKETS.len() + 1],
    /// Sum of observations, seconds.
    sum: f64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += s;
    }

    /// Observations recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Appends `<name>_bucket`, `_sum` and `_count` lines with `labels` (already rendered,
    /// e.g. `method="X"`, or empty).
    pub fn render(&self, name: &str, labels: &str, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, n) in LATENCY_BUCKETS.iter().zip(self.counts) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let total = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {total}");
    }
}

/// Calls of one gRPC method: finished calls by status code, and their latency.
#[derive(Debug, Default)]
struct MethodStats {
    codes: BTreeMap<&'static str, u64>,
    latency: Histogram,
}

/// Per-RPC metrics of one gRPC server: `<prefix>_rpc_requests_total{service,method,code}` and
/// `<prefix>_rpc_request_duration_seconds{service,method}` (for a server stream: how long the
/// stream was open).
#[derive(Debug, Default)]
pub struct RpcMetrics {
    methods: Mutex<BTreeMap<(String, String), MethodStats>>,
}

impl RpcMetrics {
    /// Records one finished call of `path` (`/package.Service/Method`) with gRPC status `code`.
    pub fn record(&self, path: &str, code: &'static str, elapsed: Duration) {
        let (service, method) = split_path(path);
        let mut methods = self.methods.lock().unwrap_or_else(|e| e.into_inner());
        let key = (service.to_string(), method.to_string());
        let key = if methods.contains_key(&key) || methods.len() < MAX_METHODS {
            key
        } else {
            ("other".to_string(), "other".to_string())
        };
        let stats = methods.entry(key).or_default();
        *stats.codes.entry(code).or_default() += 1;
        stats.latency.observe(elapsed);
    }

    /// Appends both families, named under `prefix` (e.g. `continuity_agent`).
    pub fn render(&self, prefix: &str, out: &mut String) {
        let methods = self.methods.lock().unwrap_or_else(|e| e.into_inner());
        let calls = format!("{prefix}_rpc_requests_total");
        let latency = format!("{prefix}_rpc_request_duration_seconds");
        let _ = writeln!(
            out,
            "# HELP {calls} gRPC calls finished, by service, method and status code.\n# TYPE {calls} counter"
        );
        for ((service, method), stats) in methods.iter() {
            for (code, n) in &stats.codes {
                let _ = writeln!(
                    out,
                    "{calls}{{service=\"{service}\",method=\"{method}\",code=\"{code}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP {latency} gRPC call latency (server streams: how long they were open).\n# TYPE {latency} histogram"
        );
        for ((service, method), stats) in methods.iter() {
            let labels = format!("service=\"{service}\",method=\"{method}\"");
            stats.latency.render(&latency, &labels, out);
        }
    }
}

/// (service, method) of a gRPC path; anything but `/a.b.C/D` with label-safe characters is
/// (`unknown`, `unknown`).
fn split_path(path: &str) -> (&str, &str) {
    let safe = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
    };
    match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((service, method)) if safe(service) && safe(method) => (service, method),
        _ => ("unknown", "unknown"),
    }
}

/// The gRPC status name of a numeric `grpc-status` value.
pub fn code_name(status: &[u8]) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    std::str::from_utf8(status)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .and_then(|i| NAMES.get(i).copied())
        .unwrap_or("UNKNOWN")
}

/// Appends a gauge: `# HELP`, `# TYPE` and one sample.
pub fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// Appends a counter (`name` ends in `_total`): `# HELP`, `# TYPE` and one sample.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

/// A label value escaped for the text format (backslash, double quote, newline).
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_counts_match() {
        let mut h = Histogram::default();
        for ms in [0, 3, 3, 40, 20_000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut out = String::new();
        h.render("x_seconds", "method=\"m\"", &mut out);
        assert!(
            out.contains("x_seconds_bucket{method=\"m\",le=\"0.001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{method=\"m\",le=\"0.005\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{method=\"m\",le=\"0.05\"} 4\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{method=\"m\",le=\"10\"} 4\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{method=\"m\",le=\"+Inf\"} 5\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{method=\"m\"} 5\n"), "{out}");
        assert!(
            out.contains("x_seconds_sum{method=\"m\"} 20.046\n"),
            "{out}"
        );
    }

    #[test]
    fn rpc_metrics_label_paths_and_cap_methods() {
        let m = RpcMetrics::default();
        m.record("/a.B/C", "OK", Duration::from_millis(1));
        m.record("/a.B/C", "OK", Duration::from_millis(1));
        m.record("/a.B/C", "PERMISSION_DENIED", Duration::from_millis(1));
        m.record("/x\"y/z", "UNIMPLEMENTED", Duration::ZERO);
        for i in 0..2 * MAX_METHODS {
            m.record(&format!("/s/m{i}"), "UNIMPLEMENTED", Duration::ZERO);
        }
        let mut out = String::new();
        m.render("p", &mut out);
        assert!(out.contains("p_rpc_requests_total{service=\"a.B\",method=\"C\",code=\"OK\"} 2\n"));
        assert!(out.contains(
            "p_rpc_requests_total{service=\"a.B\",method=\"C\",code=\"PERMISSION_DENIED\"} 1\n"
        ));
        assert!(out.contains("service=\"unknown\",method=\"unknown\",code=\"UNIMPLEMENTED\"} 1\n"));
        assert!(
            out.contains("p_rpc_request_duration_seconds_count{service=\"a.B\",method=\"C\"} 3\n")
        );
        let series = out
            .lines()
            .filter(|l| l.starts_with("p_rpc_requests_total{"))
            .count();
        assert_eq!(series, MAX_METHODS + 2, "a.B/C twice (two codes) and other");
        assert!(out.contains("service=\"other\",method=\"other\""));
    }

    #[test]
    fn code_names() {
        assert_eq!(code_name(b"0"), "OK");
        assert_eq!(code_name(b"7"), "PERMISSION_DENIED");
        assert_eq!(code_name(b"16"), "UNAUTHENTICATED");
        assert_eq!(code_name(b"17"), "UNKNOWN");
        assert_eq!(code_name(b"x"), "UNKNOWN");
    }
}
