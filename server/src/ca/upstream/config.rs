//! The `[upstream_authority]` table: its file schema and the validated choice of upstream (SPIRE's
//! UpstreamAuthority "disk", and the same with the key inside a PKCS#11 token). It lives with the
//! authority it configures, so `ca` never reaches into the server's `config`.

use std::path::PathBuf;

use continuity_common::config::{ConfigError, invalid};
use serde::Deserialize;

use crate::keys::PinSource;

/// `[upstream_authority]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    /// disk | pkcs11.
    pub kind: Option<String>,
    /// PEM: the upstream CA certificate (then, with `bundle_file`, the intermediates above it).
    pub cert_file: Option<PathBuf>,
    /// PEM PKCS#8 private key of `cert_file` (`kind = "disk"`).
    pub key_file: Option<PathBuf>,
    /// PEM: the upstream roots, when `cert_file` is itself an intermediate.
    pub bundle_file: Option<PathBuf>,
    /// PKCS#11 module path (`kind = "pkcs11"`).
    pub module: Option<PathBuf>,
    /// PKCS#11 token label.
    pub token_label: Option<String>,
    /// Environment variable holding the user PIN.
    pub pin_env: Option<String>,
    /// File holding the user PIN.
    pub pin_file: Option<PathBuf>,
    /// CKA_LABEL of the upstream private key in the token.
    pub key_label: Option<String>,
    /// Present only to refuse it with a helpful message: PINs never live in the config.
    pub pin: Option<toml::Value>,
}

/// Where the upstream CA's private key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamKey {
    /// A PEM PKCS#8 file.
    Disk {
        /// The key file.
        key_file: PathBuf,
    },
    /// A private key inside a PKCS#11 token, found by label; never leaves it.
    Pkcs11 {
        /// The module (.so) path.
        module: PathBuf,
        /// The token's label.
        token_label: String,
        /// Where the PIN comes from.
        pin: PinSource,
        /// The key's CKA_LABEL.
        key_label: String,
    },
}

/// The validated `[upstream_authority]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The upstream CA certificate (+ intermediates above it).
    pub cert_file: PathBuf,
    /// The upstream roots, when the certificate is an intermediate.
    pub bundle_file: Option<PathBuf>,
    /// The private key of the certificate.
    pub key: UpstreamKey,
}

fn required<T>(v: Option<T>, key: &'static str, kind: &str) -> Result<T, ConfigError> {
    v.ok_or_else(|| invalid(key, format!("is required with kind = \"{kind}\"")))
}

impl UpstreamConfig {
    /// Validates the table (None: no table, the CA is its own root); every error names its key.
    pub fn from_file(f: Option<FileUpstream>) -> Result<Option<Self>, ConfigError> {
        let Some(f) = f else { return Ok(None) };
        if f.pin.is_some() {
            return Err(invalid(
                "upstream_authority.pin",
                "a PIN is never read from the config file; set pin_env or pin_file instead",
            ));
        }
        let kind = f.kind.as_deref().ok_or_else(|| {
            invalid(
                "upstream_authority.kind",
                "is required: \"disk\" or \"pkcs11\"",
            )
        })?;
        let cert_file = required(f.cert_file, "upstream_authority.cert_file", kind)?;
        let pkcs11_only = f.module.is_some()
            || f.token_label.is_some()
            || f.pin_env.is_some()
            || f.pin_file.is_some()
            || f.key_label.is_some();
        let key = match kind {
            "disk" if pkcs11_only => {
                return Err(invalid(
                    "upstream_authority.kind",
                    "module/token_label/pin_env/pin_file/key_label only apply to kind = \"pkcs11\"",
                ));
            }
            "disk" => UpstreamKey::Disk {
                key_file: required(f.key_file, "upstream_authority.key_file", kind)?,
            },
            "pkcs11" if f.key_file.is_some() => {
                return Err(invalid(
                    "upstream_authority.key_file",
                    "only applies to kind = \"disk\" (with pkcs11 the key stays in the token: set key_label)",
                ));
            }
            "pkcs11" => pkcs11(f.module, f.token_label, f.key_label, f.pin_env, f.pin_file)?,
            other => {
                return Err(invalid(
                    "upstream_authority.kind",
                    format!("{other:?} is not one of \"disk\", \"pkcs11\""),
                ));
            }
        };
        Ok(Some(Self {
            cert_file,
            bundle_file: f.bundle_file,
            key,
        }))
    }
}

/// `kind = "pkcs11"`: module, token label, key label and exactly one PIN source are required.
fn pkcs11(
    module: Option<PathBuf>,
    token_label: Option<String>,
    key_label: Option<String>,
    pin_env: Option<String>,
    pin_file: Option<PathBuf>,
) -> Result<UpstreamKey, ConfigError> {
    let kind = "pkcs11";
    let pin = match (pin_env, pin_file) {
        (Some(e), None) => PinSource::Env(e),
        (None, Some(p)) => PinSource::File(p),
        (Some(_), Some(_)) => {
            return Err(invalid(
                "upstream_authority.pin_env",
                "set pin_env or pin_file, not both",
            ));
        }
        (None, None) => {
            return Err(invalid(
                "upstream_authority.pin_env",
                "pin_env or pin_file is required with kind = \"pkcs11\"",
            ));
        }
    };
    Ok(UpstreamKey::Pkcs11 {
        module: required(module, "upstream_authority.module", kind)?,
        token_label: required(token_label, "upstream_authority.token_label", kind)?,
        key_label: required(key_label, "upstream_authority.key_label", kind)?,
        pin,
    })
}
