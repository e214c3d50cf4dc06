//! The Unix workload attestor: selectors for a process, read from `/proc`.
//!
//! Produces SPIRE's `unix:` selectors: `uid`, `gid`, `user`, `group`, `supplementary_gid`,
//! and, when path discovery is on, `path` and `sha256` of the executable. Hashes are cached
//! by (device, inode, size, mtime) so a busy binary is hashed once, not per call.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::Selector;

/// Why a process could not be attested.
#[derive(Debug, thiserror::Error)]
pub enum UnixError {
    /// `/proc/<pid>` could not be read (the process is gone or hidden).
    #[error("cannot read /proc/{pid}/{what}: {source}")]
    Proc {
        /// The process.
        pid: u32,
        /// Which file.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The executable is larger than the configured hashing limit.
    #[error("executable {path} is {size} bytes, above workload_size_limit ({limit})")]
    TooLarge {
        /// The executable.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

/// Settings of `[workload_attestors.unix]`.
#[derive(Debug, Clone)]
pub struct UnixConfig {
    /// Produce `path` and `sha256` selectors.
    pub discover_workload_path: bool,
    /// Largest executable hashed, in bytes (0 = no limit).
    pub workload_size_limit: u64,
}

impl Default for UnixConfig {
    fn default() -> Self {
        Self {
            discover_workload_path: true,
            workload_size_limit: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

/// The Unix workload attestor.
#[derive(Debug)]
pub struct UnixAttestor {
    cfg: UnixConfig,
    proc_root: PathBuf,
    hashes: Mutex<HashMap<FileKey, String>>,
}

impl UnixAttestor {
    /// An attestor reading `/proc`.
    pub fn new(cfg: UnixConfig) -> Self {
        Self::with_proc_root(cfg, "/proc".into())
    }

    /// An attestor reading a different proc root (tests).
    pub fn with_proc_root(cfg: UnixConfig, proc_root: PathBuf) -> Self {
        Self {
            cfg,
            proc_root,
            hashes: Mutex::default(),
        }
    }

    /// Selectors of process `pid`, whose socket credentials were `uid`/`gid`.
    pub fn attest(&self, pid: u32, uid: u32, gid: u32) -> Result<Vec<Selector>, UnixError> {
        let proc = self.proc_root.join(pid.to_string());
        let status =
            std::fs::read_to_string(proc.join("status")).map_err(|source| UnixError::Proc {
                pid,
                what: "status",
                source,
            })?;
        let mut out = vec![
            Selector::raw("unix", format!("uid:{uid}")),
            Selector::raw("unix", format!("gid:{gid}")),
        ];
        if let Some(name) = lookup_name(Path::new("/etc/passwd"), uid) {
            out.push(Selector::raw("unix", format!("user:{name}")));
        }
        if let Some(name) = lookup_name(Path::new("/etc/group"), gid) {
            out.push(Selector::raw("unix", format!("group:{name}")));
        }
        for g in supplementary_gids(&status) {
            out.push(Selector::raw("unix", format!("supplementary_gid:{g}")));
        }
        if self.cfg.discover_workload_path {
            let exe = std::fs::read_link(proc.join("exe")).map_err(|source| UnixError::Proc {
                pid,
                what: "exe",
                source,
            })?;
            out.push(Selector::raw("unix", format!("path:{}", exe.display())));
            // Hash through /proc/<pid>/exe: it is the very file the process runs, even if the
            // path was replaced or deleted since.
            out.push(Selector::raw(
                "unix",
                format!("sha256:{}", self.hash(pid, &proc.join("exe"), &exe)?),
            ));
        }
        Ok(out)
    }

    fn hash(&self, pid: u32, exe_link: &Path, exe: &Path) -> Result<String, UnixError> {
        let mut f = std::fs::File::open(exe_link).map_err(|source| UnixError::Proc {
            pid,
            what: "exe",
            source,
        })?;
        let m = f.metadata().map_err(|source| UnixError::Proc {
            pid,
            what: "exe",
            source,
        })?;
        let key = FileKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        };
        if let Some(h) = self
            .hashes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(h.clone());
        }
        let limit = self.cfg.workload_size_limit;
        if limit > 0 && m.size() > limit {
            return Err(UnixError::TooLarge {
                path: exe.to_path_buf(),
                size: m.size(),
                limit,
            });
        }
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(|source| UnixError::Proc {
                pid,
                what: "exe",
                source,
            })?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        let h = hex::encode(ctx.finish());
        self.hashes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, h.clone());
        Ok(h)
    }
}

/// Supplementary groups from a `/proc/<pid>/status` text (its `Groups:` line).
pub fn supplementary_gids(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The name for numeric `id` in a passwd/group-format file (name:x:id:...).
pub fn lookup_name(file: &Path, id: u32) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _ = f.next()?;
        (f.next()?.parse::<u32>().ok()? == id).then(|| name.to_string())
    })
}

/// Process start time (clock ticks since boot) from `/proc/<pid>/stat`: with the pid, it names
/// one process for good, since a recycled pid gets a later start time.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attests_this_process() {
        let a = UnixAttestor::new(UnixConfig::default());
        let pid = std::process::id();
        let sel = a.attest(pid, 4242, 4343).unwrap();
        let s: Vec<String> = sel.iter().map(|s| s.to_string()).collect();
        assert!(s.contains(&"unix:uid:4242".to_string()));
        assert!(s.contains(&"unix:gid:4343".to_string()));
        let exe = std::env::current_exe().unwrap();
        assert!(s.contains(&format!("unix:path:{}", exe.display())), "{s:?}");
        let sha = s.iter().find(|x| x.starts_with("unix:sha256:")).unwrap();
        assert_eq!(sha.len(), "unix:sha256:".len() + 64);
        // Second call is served from the cache and agrees.
        let again = a.attest(pid, 4242, 4343).unwrap();
        assert_eq!(sel, again);
        assert_eq!(a.hashes.lock().unwrap().len(), 1);
    }

    #[test]
    fn parses_groups_and_names() {
        assert_eq!(
            supplementary_gids("Name:\tx\nGroups:\t4 24 27 \n"),
            vec![4, 24, 27]
        );
        assert_eq!(supplementary_gids("Name:\tx\n"), Vec::<u32>::new());
        assert_eq!(
            lookup_name(Path::new("/etc/passwd"), 0).as_deref(),
            Some("root")
        );
        assert!(start_time(std::process::id()).is_some());
    }
}
