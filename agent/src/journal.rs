//! An append-only journal of small records in a file of the agent's data_dir (mode 0600), so
//! what the agent still owes the server survives a crash or a restart.
//!
//! One line per record: 16 hex digits of the record's SHA-256, a space, the record in base64.
//! A torn tail (a crash in the middle of an append) or an edited line fails its checksum and
//! is dropped on load, never the records before it; the file is then rewritten clean so new
//! appends do not continue a torn line. [`Journal::replace`] rewrites it atomically (temp
//! file, fsync, rename, fsync of the directory) once the server acknowledged what it held.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use continuity_common::fsperm::{FsPermError, SecureDir, secure_dir};

/// Largest record accepted (a workload description is a few hundred bytes).
pub const MAX_RECORD: usize = 64 * 1024;

/// A journal file, open for appending.
#[derive(Debug)]
pub struct Journal {
    dir: SecureDir,
    name: String,
    /// Open once a record was appended (no file exists while nothing is owed).
    file: Option<Arc<File>>,
}

/// What loading found besides the records.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Lines whose checksum or encoding was wrong (edited or torn in the middle).
    pub corrupt: usize,
    /// A final line without its newline (an append cut short).
    pub torn_tail: bool,
}

fn checksum(record: &[u8]) -> String {
    hex::encode(&aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, record).as_ref()[..8])
}

/// The journal line of `record`.
pub fn encode_line(record: &[u8]) -> String {
    format!("{} {}\n", checksum(record), STANDARD.encode(record))
}

/// The records of a journal's bytes, and what was dropped.
pub fn parse(bytes: &[u8]) -> (Vec<Vec<u8>>, Dropped) {
    let mut dropped = Dropped::default();
    let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    // After the last newline: empty when the file ends cleanly, a torn append otherwise.
    if lines.pop().is_some_and(|tail| !tail.is_empty()) {
        dropped.torn_tail = true;
    }
    let mut records = Vec::new();
    for line in lines.into_iter().filter(|l| !l.is_empty()) {
        let decoded = std::str::from_utf8(line).ok().and_then(|l| {
            let (sum, b64) = l.split_once(' ')?;
            let rec = STANDARD.decode(b64).ok()?;
            (checksum(&rec) == sum && rec.len() <= MAX_RECORD).then_some(rec)
        });
        match decoded {
            Some(rec) => records.push(rec),
            None => dropped.corrupt += 1,
        }
    }
    (records, dropped)
}

impl Journal {
    /// Opens (creating) the journal `name` in the agent's data directory `dir`; returns it
    /// with the records it held and what was dropped.
    pub fn open(dir: &Path, name: &str) -> Result<(Self, Vec<Vec<u8>>, Dropped), FsPermError> {
        let dir = secure_dir(dir, 0o700, "data_dir")?;
        let (records, dropped) = match dir.read(name.as_ref())? {
            Some(bytes) => parse(&bytes),
            None => (Vec::new(), Dropped::default()),
        };
        let mut j = Self {
            dir,
            name: name.into(),
            file: None,
        };
        if dropped != Dropped::default() {
            j.replace(&records)?;
        }
        Ok((j, records, dropped))
    }

    fn path(dir: &SecureDir, name: &str) -> PathBuf {
        dir.path().join(name)
    }

    fn append_handle(dir: &SecureDir, name: &str) -> Result<File, FsPermError> {
        let path = Self::path(dir, name);
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC).bits() as i32,
            )
            .open(&path)
            .map_err(|source| FsPermError::Io {
                what: "incarnation journal".into(),
                path,
                op: "open",
                source,
            })
    }

    /// Appends one record (one `write` of its whole line); returns the file for the caller
    /// to fsync outside its locks.
    pub fn append(&mut self, record: &[u8]) -> std::io::Result<Arc<File>> {
        let file = match &self.file {
            Some(f) => f.clone(),
            None => {
                let f = Arc::new(
                    Self::append_handle(&self.dir, &self.name).map_err(std::io::Error::other)?,
                );
                self.file = Some(f.clone());
                f
            }
        };
        (&*file).write_all(encode_line(record).as_bytes())?;
        Ok(file)
    }

    /// Replaces the journal's content with `records`, atomically (no records: the file is
    /// removed).
    pub fn replace(&mut self, records: &[Vec<u8>]) -> Result<(), FsPermError> {
        self.file = None;
        if records.is_empty() {
            let path = Self::path(&self.dir, &self.name);
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(FsPermError::Io {
                    what: "incarnation journal".into(),
                    path,
                    op: "remove",
                    source: e,
                }),
                _ => Ok(()),
            };
        }
        self.dir.write_atomic(&self.name, 0o600, |f| {
            let mut body = String::new();
            for r in records {
                body.push_str(&encode_line(r));
            }
            f.write_all(body.as_bytes())
        })?;
        self.file = Some(Arc::new(Self::append_handle(&self.dir, &self.name)?));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_tail_and_an_edited_line_are_dropped_and_nothing_else() {
        let mut bytes = Vec::new();
        for r in [b"one".as_slice(), b"two", b"three"] {
            bytes.extend_from_slice(encode_line(r).as_bytes());
        }
        // An edit in the middle record's payload.
        let mut edited = bytes.clone();
        let mid = encode_line(b"one").len() + 20;
        edited[mid] = if edited[mid] == b'A' { b'B' } else { b'A' };
        let torn = encode_line(b"four");
        bytes.extend_from_slice(&torn.as_bytes()[..torn.len() / 2]);
        let (recs, d) = parse(&bytes);
        assert_eq!(
            recs,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        assert!(d.torn_tail);
        assert_eq!(d.corrupt, 0);
        let (recs, d) = parse(&edited);
        assert_eq!(recs, vec![b"one".to_vec(), b"three".to_vec()]);
        assert_eq!(d.corrupt, 1);
    }

    #[test]
    fn reopening_after_a_torn_tail_keeps_appends_separate() {
        let data = std::env::temp_dir().join(format!(
            "continuity-journal-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let (mut j, recs, _) = Journal::open(&data, "j").unwrap();
        assert!(recs.is_empty());
        j.append(b"a").unwrap();
        drop(j);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("j"))
            .unwrap();
        f.write_all(b"0123").unwrap();
        let (mut j, recs, d) = Journal::open(&data, "j").unwrap();
        assert_eq!(recs, vec![b"a".to_vec()]);
        assert!(d.torn_tail);
        j.append(b"b").unwrap();
        let (_, recs, d) = Journal::open(&data, "j").unwrap();
        assert_eq!(recs, vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(d, Dropped::default());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("j"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&data).unwrap();
    }
}
