//! Per-agent rate limits on the agent API: signing (each CSR of a batch, each JWT-SVID, each
//! agent renewal) and EngineBroker calls. Over a limit the call fails with ResourceExhausted
//! naming the limit's config key.
//!
//! Invariant: each limiter keeps at most [`MAX_TRACKED_AGENTS`] buckets (keys are
//! authenticated agent SPIFFE IDs, so one agent cannot add more than its own).

use std::sync::Arc;

use continuity_common::ratelimit::{Denied, TokenBuckets};
use tonic::Status;

use crate::config::AgentApiConfig;
use crate::metrics::Metrics;

/// Most agents whose buckets are kept at once.
pub const MAX_TRACKED_AGENTS: usize = 65_536;

/// The signing and Engine-call limiters, shared by the AgentAPI and EngineBroker services.
#[derive(Debug)]
pub struct AgentRateLimits {
    svids: TokenBuckets<String>,
    engine: TokenBuckets<String>,
    metrics: Arc<Metrics>,
}

impl AgentRateLimits {
    /// Limiters with the rates and bursts of `[agent_api]`.
    pub fn new(cfg: &AgentApiConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            svids: TokenBuckets::new(cfg.svids_per_second, cfg.svid_burst, MAX_TRACKED_AGENTS),
            engine: TokenBuckets::new(
                cfg.engine_calls_per_second,
                cfg.engine_call_burst,
                MAX_TRACKED_AGENTS,
            ),
            metrics,
        }
    }

    /// Charges `agent` for `n` signatures (n CSRs, or one JWT-SVID or renewal).
    pub fn sign(&self, agent: &str, n: usize) -> Result<(), Status> {
        let cost = u32::try_from(n).unwrap_or(u32::MAX);
        self.svids.take(&agent.to_string(), cost).map_err(|d| {
            self.metrics.inc(&self.metrics.svid_rate_limited);
            refusal(
                &d,
                agent,
                n,
                "SVIDs",
                &self.svids,
                "agent_api.svids_per_second / svid_burst",
            )
        })
    }

    /// Charges `agent` for one EngineBroker call.
    pub fn engine_call(&self, agent: &str) -> Result<(), Status> {
        self.engine.take(&agent.to_string(), 1).map_err(|d| {
            self.metrics.inc(&self.metrics.engine_rate_limited);
            refusal(
                &d,
                agent,
                1,
                "Engine calls",
                &self.engine,
                "agent_api.engine_calls_per_second / engine_call_burst",
            )
        })
    }
}

fn refusal(
    d: &Denied,
    agent: &str,
    n: usize,
    what: &str,
    l: &TokenBuckets<String>,
    keys: &str,
) -> Status {
    if d.over_burst {
        return Status::resource_exhausted(format!(
            "rate limit: {n} {what} in one call exceed the burst of {} per agent ({keys}); send fewer at a time",
            l.burst()
        ));
    }
    Status::resource_exhausted(format!(
        "rate limit: agent {agent} is over {} {what} per second (burst {}) ({keys}); retry in {} ms",
        l.rate(),
        l.burst(),
        d.retry_after.as_millis().max(1)
    ))
}
