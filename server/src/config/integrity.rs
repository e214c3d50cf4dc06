//! `[integrity]`: how often every record MAC in the datastore is checked again.

use std::time::Duration;

use continuity_common::config::{ConfigError, invalid};
use serde::Deserialize;

/// `[integrity]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIntegrity {
    /// Period of the integrity verifier (default "1h").
    pub verify_interval: Option<String>,
}

/// Shortest `verify_interval`: each run reads every MACed row.
const MIN_VERIFY_INTERVAL: Duration = Duration::from_secs(10);

/// `[integrity] verify_interval`, between 10s and any longer period.
pub fn verify_interval(f: Option<FileIntegrity>) -> Result<Duration, ConfigError> {
    let key = "integrity.verify_interval";
    let v = f.and_then(|f| f.verify_interval);
    let d = continuity_common::duration::parse(v.as_deref().unwrap_or("1h"))
        .map_err(|m| invalid(key, m))?;
    if d < MIN_VERIFY_INTERVAL {
        return Err(invalid(
            key,
            format!(
                "{} is shorter than the 10s minimum (each run re-reads every MACed row)",
                continuity_common::duration::format(d)
            ),
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(v: &str) -> Result<Duration, ConfigError> {
        verify_interval(Some(FileIntegrity {
            verify_interval: Some(v.into()),
        }))
    }

    #[test]
    fn default_is_hourly_and_errors_name_the_key() {
        assert_eq!(verify_interval(None).unwrap(), Duration::from_secs(3600));
        assert_eq!(interval("10m").unwrap(), Duration::from_secs(600));
        let e = interval("1s").unwrap_err().to_string();
        assert!(
            e.contains("integrity.verify_interval") && e.contains("10s"),
            "{e}"
        );
        let e = interval("soon").unwrap_err().to_string();
        assert!(e.contains("integrity.verify_interval"), "{e}");
    }
}
