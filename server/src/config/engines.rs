//! `[engines]`: the AES-GCM nonce budget of an Engine key version.

use continuity_common::config::{ConfigError, invalid};
use serde::Deserialize;

/// `[engines]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEngines {
    /// AES-GCM encryptions one key version may do before automatic rotation.
    pub max_encryptions_per_key_version: Option<i64>,
}

/// Random 96-bit nonces are safe for about 2^32 encryptions per key; more is refused.
const MAX_ENCRYPTIONS_LIMIT: u64 = 1 << 32;

/// `max_encryptions_per_key_version`, in [1, 2^32].
pub(super) fn max_encryptions(e: Option<FileEngines>) -> Result<u64, ConfigError> {
    let Some(n) = e.and_then(|e| e.max_encryptions_per_key_version) else {
        return Ok(crate::engines::DEFAULT_MAX_ENCRYPTIONS_PER_KEY_VERSION);
    };
    match u64::try_from(n) {
        Ok(n) if (1..=MAX_ENCRYPTIONS_LIMIT).contains(&n) => Ok(n),
        _ => Err(invalid(
            "engines.max_encryptions_per_key_version",
            format!(
                "{n} is not between 1 and {MAX_ENCRYPTIONS_LIMIT} (2^32, the safe bound for random AES-GCM nonces)"
            ),
        )),
    }
}
