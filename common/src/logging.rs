//! Logging set-up from `log_level` and `log_format`.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber writing to stderr. `RUST_LOG`, when set, overrides `level`.
pub fn init(level: &str, format: LogFormat) {
    // The level applies to Continuity's own crates; libraries stay at warn so `debug` shows
    // our decisions, not every HTTP/2 frame.
    let ours = [
        "continuity_server",
        "continuity_agent",
        "continuity_common",
        "continuity_attestors",
    ]
    .map(|c| format!("{c}={level}"))
    .join(",");
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,{ours}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Checks a `log_level` value; returns a message naming the allowed values when wrong.
pub fn check_level(level: &str) -> Result<(), String> {
    match level.to_ascii_lowercase().as_str() {
        "trace" | "debug" | "info" | "warn" | "error" => Ok(()),
        other => Err(format!(
            "invalid log level {other:?}: use one of trace, debug, info, warn, error"
        )),
    }
}
