//! The `[key_manager]` table: its file schema and the validated choice of key manager. It lives
//! with the key managers it configures, so `keys` never reaches into the server's `config`.

use std::path::{Path, PathBuf};

use continuity_common::config::{ConfigError, invalid};
use serde::Deserialize;

/// `[key_manager]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileKeyManager {
    /// memory | disk | pkcs11.
    pub kind: Option<String>,
    /// Key directory of `kind = "disk"` (default `data_dir/keys`); several servers sharing
    /// one trust domain point at the same directory.
    pub directory: Option<PathBuf>,
    /// PKCS#11 module path.
    pub module: Option<PathBuf>,
    /// PKCS#11 token label.
    pub token_label: Option<String>,
    /// Environment variable holding the user PIN.
    pub pin_env: Option<String>,
    /// File holding the user PIN.
    pub pin_file: Option<PathBuf>,
    /// Present only to refuse it with a helpful message: PINs never live in the config.
    pub pin: Option<toml::Value>,
}

/// Where the user PIN of a PKCS#11 token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// An environment variable.
    Env(String),
    /// A file (trailing newline ignored).
    File(PathBuf),
}

/// The key manager chosen by `[key_manager] kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyManagerConfig {
    /// Keys in memory only; lost at restart.
    Memory,
    /// PKCS#8 key files (0600) under `data_dir/keys` or `[key_manager] directory`.
    Disk {
        /// The key directory.
        dir: PathBuf,
    },
    /// Keys generated and used inside a PKCS#11 token.
    Pkcs11 {
        /// The module (.so) path.
        module: PathBuf,
        /// The token's label.
        token_label: String,
        /// Where the PIN comes from.
        pin: PinSource,
    },
}

impl KeyManagerConfig {
    /// Validates the `[key_manager]` table (`data_dir` places the disk key directory); every
    /// error names its key.
    pub fn from_file(k: FileKeyManager, data_dir: &Path) -> Result<Self, ConfigError> {
        if k.pin.is_some() {
            return Err(invalid(
                "key_manager.pin",
                "a PIN is never read from the config file; set pin_env or pin_file instead",
            ));
        }
        let kind = k.kind.as_deref().unwrap_or("disk");
        let pkcs11_only = k.module.is_some()
            || k.token_label.is_some()
            || k.pin_env.is_some()
            || k.pin_file.is_some();
        match kind {
            "memory" | "disk" if pkcs11_only => Err(invalid(
                "key_manager.kind",
                format!(
                    "module/token_label/pin_env/pin_file only apply to kind = \"pkcs11\", not {kind:?}"
                ),
            )),
            _ if kind != "disk" && k.directory.is_some() => Err(invalid(
                "key_manager.directory",
                format!("only applies to kind = \"disk\", not {kind:?}"),
            )),
            "memory" => Ok(Self::Memory),
            "disk" => Ok(Self::Disk {
                dir: match k.directory {
                    Some(d) if d.as_os_str().is_empty() => {
                        return Err(invalid("key_manager.directory", "must not be empty"));
                    }
                    Some(d) => d,
                    None => data_dir.join("keys"),
                },
            }),
            "pkcs11" => pkcs11(k),
            other => Err(invalid(
                "key_manager.kind",
                format!("{other:?} is not one of \"memory\", \"disk\", \"pkcs11\""),
            )),
        }
    }
}

/// `kind = "pkcs11"`: module, token label and exactly one PIN source are required.
fn pkcs11(k: FileKeyManager) -> Result<KeyManagerConfig, ConfigError> {
    let module = k.module.ok_or_else(|| {
        invalid(
            "key_manager.module",
            "is required with kind = \"pkcs11\" (e.g. /usr/lib/softhsm/libsofthsm2.so)",
        )
    })?;
    let token_label = k.token_label.ok_or_else(|| {
        invalid(
            "key_manager.token_label",
            "is required with kind = \"pkcs11\"",
        )
    })?;
    let pin = match (k.pin_env, k.pin_file) {
        (Some(e), None) => PinSource::Env(e),
        (None, Some(f)) => PinSource::File(f),
        (Some(_), Some(_)) => {
            return Err(invalid(
                "key_manager.pin_env",
                "set pin_env or pin_file, not both",
            ));
        }
        (None, None) => {
            return Err(invalid(
                "key_manager.pin_env",
                "pin_env or pin_file is required with kind = \"pkcs11\"",
            ));
        }
    };
    Ok(KeyManagerConfig::Pkcs11 {
        module,
        token_label,
        pin,
    })
}
