//! Durations written the way operators write them: "90s", "5m", "1h", "24h", "7d".

use std::time::Duration;

/// Parses "1h30m", "5m", "30s" or a bare number of seconds ("600").
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| {
        format!("invalid duration {s:?} ({e}); write e.g. \"30s\", \"5m\", \"1h\", \"7d\"")
    })
}

/// Formats a duration compactly ("1h", "5m 30s").
pub fn format(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("600").unwrap(), Duration::from_secs(600));
        assert_eq!(parse("1d").unwrap(), Duration::from_secs(86400));
        assert!(parse("soon").is_err());
        assert!(parse("").is_err());
    }
}
