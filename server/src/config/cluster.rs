//! `[cluster]`: several servers on one datastore — how often each polls the change feed, and
//! how long a leader lease (CA rotation, Engine key lifecycle) lasts without renewal.

use std::time::Duration;

use continuity_common::config::{ConfigError, invalid};
use serde::Deserialize;

/// `[cluster]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    /// Period of the change-feed poll (default "500ms", jittered ±20%).
    pub poll_interval: Option<String>,
    /// How long a leader lease lasts without renewal (default "30s").
    pub lease_ttl: Option<String>,
}

/// The validated `[cluster]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Period of the change-feed poll.
    pub poll_interval: Duration,
    /// Leader lease lifetime; the leader renews it at a third of this.
    pub lease_ttl: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(30),
        }
    }
}

/// Parses a duration of `key` and checks it lies in `[min, max]`.
fn bounded(
    v: Option<&str>,
    default: Duration,
    key: &'static str,
    (min, max): (Duration, Duration),
    why: &str,
) -> Result<Duration, ConfigError> {
    let Some(v) = v else {
        return Ok(default);
    };
    let d = continuity_common::duration::parse(v).map_err(|m| invalid(key, m))?;
    if d < min || d > max {
        return Err(invalid(
            key,
            format!("{v:?} must be between {min:?} and {max:?} ({why})"),
        ));
    }
    Ok(d)
}

impl ClusterConfig {
    /// Validates the `[cluster]` table; every error names its key.
    pub fn from_file(f: Option<FileCluster>) -> Result<Self, ConfigError> {
        let f = f.unwrap_or_default();
        let d = Self::default();
        Ok(Self {
            poll_interval: bounded(
                f.poll_interval.as_deref(),
                d.poll_interval,
                "cluster.poll_interval",
                (Duration::from_millis(50), Duration::from_secs(60)),
                "each poll is one small query; a change made through another server shows within it",
            )?,
            lease_ttl: bounded(
                f.lease_ttl.as_deref(),
                d.lease_ttl,
                "cluster.lease_ttl",
                (Duration::from_secs(3), Duration::from_secs(3600)),
                "a dead leader's work waits this long before another server takes over",
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(poll: Option<&str>, lease: Option<&str>) -> Result<ClusterConfig, ConfigError> {
        ClusterConfig::from_file(Some(FileCluster {
            poll_interval: poll.map(Into::into),
            lease_ttl: lease.map(Into::into),
        }))
    }

    #[test]
    fn defaults_bounds_and_errors_name_the_key() {
        assert_eq!(
            ClusterConfig::from_file(None).unwrap(),
            ClusterConfig::default()
        );
        let c = cluster(Some("250ms"), Some("1m")).unwrap();
        assert_eq!(c.poll_interval, Duration::from_millis(250));
        assert_eq!(c.lease_ttl, Duration::from_secs(60));
        let e = cluster(Some("1ms"), None).unwrap_err().to_string();
        assert!(e.contains("cluster.poll_interval"), "{e}");
        let e = cluster(None, Some("1s")).unwrap_err().to_string();
        assert!(e.contains("cluster.lease_ttl"), "{e}");
        let e = cluster(None, Some("soon")).unwrap_err().to_string();
        assert!(e.contains("cluster.lease_ttl"), "{e}");
    }
}
