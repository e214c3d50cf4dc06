//! `[agent_api]`: connection, stream, deadline and per-agent rate limits of the agent API.

use std::time::Duration;

use continuity_common::config::{ConfigError, invalid};
use serde::Deserialize;

/// `[agent_api]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAgentApi {
    /// How long an agent's previous SVID is still accepted after its successor was first used.
    pub previous_svid_grace: Option<String>,
    /// Open connections in total (handshaking ones included).
    pub max_connections: Option<u64>,
    /// Open connections from one IP address.
    pub max_connections_per_ip: Option<u64>,
    /// HTTP/2 streams open at once on one connection.
    pub max_concurrent_streams: Option<u64>,
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Option<String>,
    /// Time AttestAgent waits for its first message.
    pub first_message_timeout: Option<String>,
    /// Time a call has to produce its response.
    pub request_timeout: Option<String>,
    /// HTTP/2 PING interval (also the TCP keepalive idle time).
    pub keepalive_interval: Option<String>,
    /// Time to wait for a PING answer before dropping the connection.
    pub keepalive_timeout: Option<String>,
    /// SVIDs signed per second per agent (each CSR of a batch, each JWT-SVID, each renewal).
    pub svids_per_second: Option<f64>,
    /// SVIDs one agent may have signed in a burst.
    pub svid_burst: Option<u64>,
    /// EngineBroker calls per second per agent.
    pub engine_calls_per_second: Option<f64>,
    /// EngineBroker calls one agent may make in a burst.
    pub engine_call_burst: Option<u64>,
}

/// The validated `[agent_api]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentApiConfig {
    /// Open connections in total.
    pub max_connections: usize,
    /// Open connections per peer IP.
    pub max_connections_per_ip: usize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// AttestAgent first-message deadline.
    pub first_message_timeout: Duration,
    /// Per-call deadline.
    pub request_timeout: Duration,
    /// HTTP/2 PING (and TCP keepalive) interval.
    pub keepalive_interval: Duration,
    /// PING answer deadline.
    pub keepalive_timeout: Duration,
    /// Signing rate per agent.
    pub svids_per_second: f64,
    /// Signing burst per agent.
    pub svid_burst: u32,
    /// Engine call rate per agent.
    pub engine_calls_per_second: f64,
    /// Engine call burst per agent.
    pub engine_call_burst: u32,
}

impl Default for AgentApiConfig {
    fn default() -> Self {
        Self {
            max_connections: 8192,
            max_connections_per_ip: 1024,
            max_concurrent_streams: 100,
            handshake_timeout: Duration::from_secs(10),
            first_message_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            svids_per_second: 50.0,
            svid_burst: 1000,
            engine_calls_per_second: 500.0,
            engine_call_burst: 5000,
        }
    }
}

impl AgentApiConfig {
    /// Validates the table; every error names its key.
    pub fn from_file(f: Option<FileAgentApi>) -> Result<Self, ConfigError> {
        let mut c = Self::default();
        let Some(f) = f else { return Ok(c) };
        if let Some(n) = f.max_connections {
            c.max_connections = count(n, "agent_api.max_connections", 1 << 20)? as usize;
        }
        if let Some(n) = f.max_connections_per_ip {
            c.max_connections_per_ip =
                count(n, "agent_api.max_connections_per_ip", 1 << 20)? as usize;
        }
        if let Some(n) = f.max_concurrent_streams {
            c.max_concurrent_streams = count(n, "agent_api.max_concurrent_streams", 10_000)? as u32;
        }
        c.timeouts_from_file(&f)?;
        if let Some(r) = f.svids_per_second {
            c.svids_per_second = rate(r, "agent_api.svids_per_second")?;
        }
        if let Some(n) = f.svid_burst {
            c.svid_burst = count(n, "agent_api.svid_burst", 1_000_000)? as u32;
        }
        if let Some(r) = f.engine_calls_per_second {
            c.engine_calls_per_second = rate(r, "agent_api.engine_calls_per_second")?;
        }
        if let Some(n) = f.engine_call_burst {
            c.engine_call_burst = count(n, "agent_api.engine_call_burst", 1_000_000)? as u32;
        }
        Ok(c)
    }

    /// The five deadlines of the table, each in (0, 1h].
    fn timeouts_from_file(&mut self, f: &FileAgentApi) -> Result<(), ConfigError> {
        for (v, slot, key) in [
            (
                &f.handshake_timeout,
                &mut self.handshake_timeout,
                "agent_api.handshake_timeout",
            ),
            (
                &f.first_message_timeout,
                &mut self.first_message_timeout,
                "agent_api.first_message_timeout",
            ),
            (
                &f.request_timeout,
                &mut self.request_timeout,
                "agent_api.request_timeout",
            ),
            (
                &f.keepalive_interval,
                &mut self.keepalive_interval,
                "agent_api.keepalive_interval",
            ),
            (
                &f.keepalive_timeout,
                &mut self.keepalive_timeout,
                "agent_api.keepalive_timeout",
            ),
        ] {
            if let Some(s) = v {
                *slot = timeout(s, key)?;
            }
        }
        Ok(())
    }
}

/// A count in [1, `max`].
fn count(n: u64, key: &'static str, max: u64) -> Result<u64, ConfigError> {
    if n >= 1 && n <= max {
        Ok(n)
    } else {
        Err(invalid(key, format!("{n} is not between 1 and {max}")))
    }
}

/// A duration in (0, 1h].
fn timeout(s: &str, key: &'static str) -> Result<Duration, ConfigError> {
    let t = continuity_common::duration::parse(s).map_err(|m| invalid(key, m))?;
    if t.is_zero() || t > Duration::from_secs(3600) {
        return Err(invalid(
            key,
            format!("{s:?} must be positive and at most 1h"),
        ));
    }
    Ok(t)
}

/// A finite rate in (0, 1e6].
fn rate(r: f64, key: &'static str) -> Result<f64, ConfigError> {
    if r.is_finite() && r > 0.0 && r <= 1e6 {
        Ok(r)
    } else {
        Err(invalid(
            key,
            format!("{r} must be positive (at most 1000000)"),
        ))
    }
}
