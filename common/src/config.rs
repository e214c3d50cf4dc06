//! What agent and server configs share: the error every config problem becomes (naming the
//! key to fix), and the `[health]` / `[metrics]` listener tables.

use std::net::SocketAddr;
use std::path::PathBuf;

/// What is wrong with a configuration; every message names the key to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given with --config.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML did not parse or had an unknown key.
    #[error("config file {path}: {message}")]
    Parse {
        /// The path given with --config.
        path: PathBuf,
        /// The parser's message (names the key and the line).
        message: String,
    },
    /// A key has a value that cannot be used.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// The dotted key, e.g. `key_manager.module`.
        key: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// A [`ConfigError::Invalid`] for `key`.
pub fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// `[health]` / `[metrics]` / `[jwks]` tables: where to listen.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    /// host:port to listen on.
    pub bind_address: Option<String>,
}

impl FileListener {
    /// The parsed address of an optional listener table.
    pub fn address(
        table: Option<FileListener>,
        key: &'static str,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        table
            .and_then(|l| l.bind_address)
            .map(|a| {
                a.parse().map_err(|_| {
                    invalid(
                        key,
                        format!("{a:?} is not host:port (e.g. \"127.0.0.1:8080\")"),
                    )
                })
            })
            .transpose()
    }
}

/// Reads a config file's text (a [`ConfigError::Read`] naming it on failure).
pub fn read(path: &std::path::Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses TOML into a file schema (a [`ConfigError::Parse`] naming the key and line on failure).
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &std::path::Path,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim().to_string(),
    })
}
