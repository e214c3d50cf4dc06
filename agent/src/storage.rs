//! The agent's state on disk: one JSON file in `data_dir`, mode 0600 (it holds private keys),
//! replaced atomically (temp file, fsync, rename) so a crash never leaves half a state.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manager::cache::PersistedState;

/// State file name inside `data_dir`.
pub const STATE_FILE: &str = "agent-state.json";

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Reading or writing failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file exists but is not a state this agent can read.
    #[error(
        "state file {path} is corrupt ({reason}); move it away to start over with a new join token"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        reason: String,
    },
}

/// The on-disk state of one agent.
#[derive(Debug, Clone)]
pub struct Storage {
    dir: PathBuf,
}

#[derive(Serialize)]
struct VersionedRef<'a> {
    version: u32,
    state: &'a PersistedState,
}

#[derive(Serialize, Deserialize)]
struct Versioned {
    version: u32,
    state: PersistedState,
}

impl Storage {
    /// Opens (creating with 0700) the data directory.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StorageError::Io {
                what: "cannot create data_dir",
                path: dir.into(),
                source,
            })?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| StorageError::Io {
                what: "cannot restrict data_dir",
                path: dir.into(),
                source,
            },
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Path of the state file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Loads the saved state, if any.
    pub fn load(&self) -> Result<Option<PersistedState>, StorageError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StorageError::Io {
                    what: "cannot read",
                    path,
                    source,
                });
            }
        };
        let v: Versioned = serde_json::from_slice(&bytes).map_err(|e| StorageError::Corrupt {
            path,
            reason: e.to_string(),
        })?;
        Ok(Some(v.state))
    }

    /// Saves the state atomically with mode 0600.
    pub fn save(&self, state: &PersistedState) -> Result<(), StorageError> {
        use std::io::BufWriter;
        let path = self.path();
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let io = |source| StorageError::Io {
            what: "cannot write",
            path: tmp.clone(),
            source,
        };
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        // Streamed: no copy of the state and no whole-file buffer, whatever the entry count.
        let mut w = BufWriter::with_capacity(64 * 1024, f);
        serde_json::to_writer(&mut w, &VersionedRef { version: 1, state }).map_err(|e| {
            StorageError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        let f = w.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(|source| StorageError::Io {
            what: "cannot install",
            path,
            source,
        })?;
        Ok(())
    }
}
