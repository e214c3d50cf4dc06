//! The agent's state on disk: one JSON file in `data_dir` (0700, refused if another user could
//! have made or changed it), mode 0600 (it holds private keys), replaced atomically (temp file,
//! fsync, rename) so a crash never leaves half a state.

use std::ffi::OsStr;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use continuity_common::fsperm::{FsPermError, SecureDir, secure_dir};

use serde::{Deserialize, Serialize};

use crate::state::PersistedState;

/// State file name inside `data_dir`.
pub const STATE_FILE: &str = "agent-state.json";

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// data_dir cannot be trusted, or a file in it cannot be read or written.
    #[error(transparent)]
    Fs(#[from] FsPermError),
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

/// The on-disk state of one agent: the verified data_dir, held open.
#[derive(Debug, Clone)]
pub struct Storage {
    dir: Arc<SecureDir>,
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
    /// Opens (creating with 0700) the data directory, refusing one another user could have
    /// made or changed (see [`continuity_common::fsperm`]).
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        let dir = secure_dir(dir, 0o700, "data_dir")?;
        Ok(Self { dir: Arc::new(dir) })
    }

    /// Path of the state file.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join(STATE_FILE)
    }

    /// Loads the saved state, if any (read through the directory's descriptor, no symlinks).
    pub fn load(&self) -> Result<Option<PersistedState>, StorageError> {
        let Some(bytes) = self.dir.read(OsStr::new(STATE_FILE))? else {
            return Ok(None);
        };
        let v: Versioned = serde_json::from_slice(&bytes).map_err(|e| StorageError::Corrupt {
            path: self.path(),
            reason: e.to_string(),
        })?;
        Ok(Some(v.state))
    }

    /// Saves the state atomically with mode 0600 (temp file created `O_EXCL | O_NOFOLLOW` in
    /// data_dir, fsync, rename).
    pub fn save(&self, state: &PersistedState) -> Result<(), StorageError> {
        self.dir.write_atomic(STATE_FILE, 0o600, |f| {
            // Streamed: no copy of the state and no whole-file buffer, whatever the entry count.
            let mut w = BufWriter::with_capacity(64 * 1024, f);
            serde_json::to_writer(&mut w, &VersionedRef { version: 1, state })?;
            w.flush()
        })?;
        Ok(())
    }
}
