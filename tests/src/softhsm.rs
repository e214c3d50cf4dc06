//! Throwaway SoftHSM2 tokens: a private config and token directory per test.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Path of the SoftHSM2 PKCS#11 module (Debian's `softhsm2`).
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A freshly initialised token.
pub struct SoftHsm {
    /// The SOFTHSM2_CONF file to export.
    pub conf: PathBuf,
    /// Token label.
    pub label: String,
    /// User PIN.
    pub pin: String,
}

impl SoftHsm {
    /// Creates a token under `dir`. Panics (with the install hint) if SoftHSM2 is missing.
    pub fn new(dir: &Path, label: &str) -> Self {
        assert!(
            Path::new(MODULE).exists(),
            "SoftHSM2 is not installed ({MODULE} missing); scripts/setup installs it"
        );
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let pin = "4321".to_string();
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                "87654321",
                "--pin",
                &pin,
            ])
            .output()
            .expect("softhsm2-util");
        assert!(
            out.status.success(),
            "softhsm2-util failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            conf,
            label: label.into(),
            pin,
        }
    }
}
