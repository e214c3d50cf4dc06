//! `[audit]`: how often the audit log's head is checkpointed outside the datastore.

use std::time::Duration;

use continuity_common::config::{ConfigError, invalid};
use serde::Deserialize;

/// `[audit]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAudit {
    /// How often a signed checkpoint of the head is written under data_dir (when it moved).
    pub checkpoint_interval: Option<String>,
}

/// The `[audit]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// Period of the scheduled checkpoint.
    pub checkpoint_interval: Duration,
}

/// Default `checkpoint_interval`: a tail cut back is caught up to this far.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(300);

/// Bounds of `checkpoint_interval`: at least 10s (one file each time the log moved), at most a day.
const CHECKPOINT_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_secs(10), Duration::from_secs(86_400));

impl AuditConfig {
    /// `[audit]` as written, defaults filled in, checked.
    pub fn from_file(f: Option<FileAudit>) -> Result<Self, ConfigError> {
        let Some(v) = f.and_then(|f| f.checkpoint_interval) else {
            return Ok(Self {
                checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            });
        };
        let key = "audit.checkpoint_interval";
        let d = continuity_common::duration::parse(&v).map_err(|m| invalid(key, m))?;
        let (min, max) = CHECKPOINT_INTERVAL_RANGE;
        if d < min || d > max {
            return Err(invalid(key, format!("{v:?} is not between 10s and 24h")));
        }
        Ok(Self {
            checkpoint_interval: d,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("server.toml"))
    }

    #[test]
    fn the_default_is_five_minutes_and_the_full_example_documents_it() {
        let c = parse("trust_domain = \"e.org\"").unwrap();
        assert_eq!(c.audit.checkpoint_interval, Duration::from_secs(300));
        let text = include_str!("../../../deploy/server.full.toml");
        assert!(text.contains("[audit]") && text.contains("checkpoint_interval = \"5m\""));
        assert_eq!(
            parse(text).unwrap().audit.checkpoint_interval,
            Duration::from_secs(300)
        );
        let c = parse("trust_domain = \"e.org\"\n[audit]\ncheckpoint_interval = \"30s\"").unwrap();
        assert_eq!(c.audit.checkpoint_interval, Duration::from_secs(30));
    }

    #[test]
    fn bad_intervals_name_the_key() {
        for bad in ["\"1s\"", "\"2d\"", "\"soon\""] {
            let e = parse(&format!(
                "trust_domain = \"e.org\"\n[audit]\ncheckpoint_interval = {bad}"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("audit.checkpoint_interval"), "{bad}: {e}");
        }
        let e = parse("trust_domain = \"e.org\"\n[audit]\ncheckpoint_interval = 5")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("checkpoint_interval") && e.contains("string"),
            "{e}"
        );
        let e = parse("trust_domain = \"e.org\"\n[audit]\ninterval = \"5m\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("interval"), "{e}");
    }
}
