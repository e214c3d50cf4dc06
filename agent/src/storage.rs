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
        // Never a fresh identity over a state that is there but unreadable: the agent stops
        // and says so. Temp files a killed writer left (`.agent-state.json.*.tmp`) are never
        // read; the file itself is only ever replaced whole.
        let corrupt = |reason: String| StorageError::Corrupt {
            path: self.path(),
            reason,
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(corrupt(format!(
                "{} bytes, no state: a write was cut short, by an older version or a full disk",
                bytes.len()
            )));
        }
        let v: Versioned =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("not a state: {e}")))?;
        if v.version != 1 {
            return Err(corrupt(format!(
                "state version {} is not 1: written by another version of the agent",
                v.version
            )));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> (PathBuf, Storage) {
        let d = std::env::temp_dir().join(format!("agent-storage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let s = Storage::open(&d).unwrap();
        (d, s)
    }

    fn state() -> PersistedState {
        PersistedState {
            agent_id: "spiffe://example.org/spire/agent/join_token/t".into(),
            revision: 7,
            ..Default::default()
        }
    }

    #[test]
    fn a_saved_state_loads_back_and_stray_temp_files_are_ignored() {
        let (d, s) = scratch("roundtrip");
        assert!(s.load().unwrap().is_none());
        s.save(&state()).unwrap();
        // What a writer killed between create and rename leaves behind.
        std::fs::write(
            d.join(".agent-state.json.4242.0.tmp"),
            b"{\"version\":1,\"sta",
        )
        .unwrap();
        let back = s.load().unwrap().unwrap();
        assert_eq!(back.agent_id, state().agent_id);
        assert_eq!(back.revision, 7);
        s.save(&back).unwrap();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_torn_state_file_is_a_clear_error_never_a_fresh_start() {
        let (d, s) = scratch("torn");
        s.save(&state()).unwrap();
        let whole = std::fs::read(d.join(STATE_FILE)).unwrap();
        let newer =
            String::from_utf8(whole.clone())
                .unwrap()
                .replacen("\"version\":1", "\"version\":2", 1);
        let cases: [(&[u8], &str); 4] = [
            (b"", "0 bytes, no state: a write was cut short"),
            (b"\n\n", "2 bytes, no state"),
            (&whole[..whole.len() / 2], "not a state: EOF while parsing"),
            (newer.as_bytes(), "state version 2 is not 1"),
        ];
        for (bytes, want) in cases {
            std::fs::write(d.join(STATE_FILE), bytes).unwrap();
            let err = s.load().unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("agent-state.json is corrupt"),
                "{want}: {err}"
            );
        }
        let _ = std::fs::remove_dir_all(d);
    }
}
