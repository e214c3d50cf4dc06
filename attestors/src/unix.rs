//! The Unix workload attestor: selectors for a process, read from `/proc`.
//!
//! Produces SPIRE's `unix:` selectors: `uid`, `gid`, `user`, `group`, `supplementary_gid`,
//! and, when path discovery is on, `path` and `sha256` of the executable.
//!
//! # Which process the selectors describe
//! The process that connected, as it was when the agent accepted the connection. At accept the
//! agent records the caller's executable ([`ExeIdentity`]: the path `/proc/<pid>/exe` names and
//! the file's device, inode, size, mtime and ctime) next to a pidfd for the process
//! (SO_PEERPIDFD; on kernels < 6.5 the fallback is `pidfd_open` plus the start time). At
//! attestation `unix:sha256` is the hash of that file, read through `/proc/<pid>/exe` only after
//! checking that it is still the recorded file. If the process has exec'd since it connected (or its
//! executable was modified), attestation fails ([`UnixError::ExeChanged`]) rather than describe
//! the new image. A forked child that inherited the socket therefore speaks as the process that
//! connected, while that process lives and has not exec'd. What no Unix-socket attestor can close
//! (SPIRE has the same window) is the time between `connect()` and the agent's `accept`: a
//! process that exec's in between is attested as the new image. Attestation runs once per
//! connection (at its first request); later requests on it keep that result.
//!
//! # What `unix:path` proves
//! The recorded path is the text of `/proc/<pid>/exe`: the path in the *process's* mount
//! namespace. An unprivileged user can make a mount namespace of their own (`unshare -Urm`),
//! bind-mount any binary over `/opt/victim/bin/srv` in it and exec that path: the link text then
//! names the victim's path while the file is theirs. So `unix:path:P` is emitted only if `P`,
//! resolved by the agent in the agent's own mount namespace (symlinks followed), names the same
//! device and inode as the executable the process runs ([`path_names_exe`]); otherwise —
//! another mount namespace's view, a file replaced at `P` since, an executable marked
//! `" (deleted)"` — the path selector is left out (logged at debug with the reason) while
//! `unix:sha256` and the uid/gid selectors are still produced. Path and hash then describe one
//! inode, the one the agent itself finds at that path. A process in another mount namespace
//! (a container, a systemd unit with `ProtectSystem=`) keeps its `unix:path` exactly when its
//! path names the same file in the agent's view; a containerised process whose root file
//! system differs from the agent's gets no `unix:path` (select it by `unix:sha256` or the k8s
//! selectors). Comparing the namespaces (`/proc/<pid>/ns/mnt`) only explains the log line: the
//! inode check is what decides, in the same namespace too. Resolving the path may ask the file
//! system it names; that runs on the attestation's blocking thread, like the hashing.
//!
//! # Hashing
//! Hashes are cached by file identity — device, inode, size, mtime and ctime (seconds and
//! nanoseconds) — so a busy binary is hashed once, and a binary rewritten in place with its
//! mtime restored still misses (ctime cannot be set back). The cache is bounded
//! (`hash_cache_size`, least recently used evicted). Files above `workload_size_limit` are not
//! hashed; at most `max_concurrent_hashes` files are read at once (callers beyond wait, at most
//! [`MAX_WAITING_HASHES`] of them for at most [`HASH_WAIT`]); concurrent misses for one file are
//! coalesced: one caller reads it, the others wait for its result.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use continuity_common::lru::Lru;

use crate::Selector;

use self::exe::open_exe;
pub use self::exe::{ExeIdentity, FileId, PathWithheld, exe_unchanged, path_names_exe};
pub use self::procfs::{lookup_name, start_time, supplementary_gids};

mod exe;
mod procfs;

/// Default `workload_size_limit`: 256 MiB.
pub const DEFAULT_WORKLOAD_SIZE_LIMIT: u64 = 256 << 20;
/// Default `hash_cache_size`: files whose hash is remembered.
pub const DEFAULT_HASH_CACHE_SIZE: usize = 4096;
/// Default `max_concurrent_hashes`.
pub const DEFAULT_MAX_CONCURRENT_HASHES: usize = 2;
/// Most callers waiting for a hashing slot at once; beyond them attestation fails at once.
pub const MAX_WAITING_HASHES: usize = 256;
/// Longest a caller waits for a hashing slot, or for another caller's hash of the same file.
pub const HASH_WAIT: Duration = Duration::from_secs(30);

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
    #[error(
        "executable {path} is {size} bytes, above workload_size_limit ({limit}); raise \
         [workload_attestors.unix] workload_size_limit (0 = no limit) to attest it"
    )]
    TooLarge {
        /// The executable.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The executable was not recorded when the process connected (it had already exited).
    #[error("the executable of process {pid} could not be recorded when it connected")]
    NoExe {
        /// The process.
        pid: u32,
    },
    /// The process runs another file than when it connected (it exec'd), or the file changed.
    #[error(
        "process {pid} no longer runs the executable it connected with (it exec'd since, or \
         {path} was modified)"
    )]
    ExeChanged {
        /// The process.
        pid: u32,
        /// The executable recorded at connect.
        path: PathBuf,
    },
    /// The executable could not be read.
    #[error("cannot read executable {path}: {source}")]
    Read {
        /// The executable.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file changed while it was being hashed.
    #[error("executable {path} changed while it was hashed")]
    Modified {
        /// The executable.
        path: PathBuf,
    },
    /// Too many executables are being hashed; the caller may retry.
    #[error(
        "too many executables waiting to be hashed (max_concurrent_hashes = {limit}); try again"
    )]
    Busy {
        /// The configured `max_concurrent_hashes`.
        limit: usize,
    },
    /// A concurrent attestation hashing the same file failed; this caller shares its result.
    #[error("hashing {path} failed: {reason}")]
    Shared {
        /// The executable.
        path: PathBuf,
        /// What the caller that read the file saw.
        reason: String,
    },
}

/// Settings of `[workload_attestors.unix]`.
#[derive(Debug, Clone)]
pub struct UnixConfig {
    /// Produce `path` and `sha256` selectors.
    pub discover_workload_path: bool,
    /// Largest executable hashed, in bytes (0 = no limit, only when set explicitly).
    pub workload_size_limit: u64,
    /// Most file hashes remembered (at least 1).
    pub hash_cache_size: usize,
    /// Most executables read at once (at least 1).
    pub max_concurrent_hashes: usize,
}

impl Default for UnixConfig {
    fn default() -> Self {
        Self {
            // SPIRE's default: reading /proc/<pid>/exe of another user's process needs
            // CAP_SYS_PTRACE, which an agent in a pod does not have.
            discover_workload_path: false,
            workload_size_limit: DEFAULT_WORKLOAD_SIZE_LIMIT,
            hash_cache_size: DEFAULT_HASH_CACHE_SIZE,
            max_concurrent_hashes: DEFAULT_MAX_CONCURRENT_HASHES,
        }
    }
}

/// The Unix workload attestor.
#[derive(Debug)]
pub struct UnixAttestor {
    cfg: UnixConfig,
    proc_root: PathBuf,
    hashes: Mutex<Lru<FileId, String>>,
    in_flight: Mutex<HashMap<FileId, Arc<Flight>>>,
    slots: Mutex<Slots>,
    slot_freed: Condvar,
    reads: AtomicU64,
    coalesced: AtomicU64,
    /// Called by the reading caller just before it reads a file (tests).
    #[cfg(test)]
    before_read: Option<fn(&UnixAttestor)>,
}

impl UnixAttestor {
    /// An attestor reading `/proc`.
    pub fn new(cfg: UnixConfig) -> Self {
        Self::with_proc_root(cfg, "/proc".into())
    }

    /// An attestor reading a different proc root (tests).
    pub fn with_proc_root(cfg: UnixConfig, proc_root: PathBuf) -> Self {
        let cap = cfg.hash_cache_size.max(1);
        Self {
            cfg,
            proc_root,
            hashes: Mutex::new(Lru::new(cap)),
            in_flight: Mutex::default(),
            slots: Mutex::default(),
            slot_freed: Condvar::new(),
            reads: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            #[cfg(test)]
            before_read: None,
        }
    }

    /// Selectors of process `pid`, whose socket credentials were `uid`/`gid` and whose
    /// executable at connect time was `exe` (needed for `path` and `sha256`).
    pub fn attest(
        &self,
        pid: u32,
        uid: u32,
        gid: u32,
        exe: Option<&ExeIdentity>,
    ) -> Result<Vec<Selector>, UnixError> {
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
            let exe = exe.ok_or(UnixError::NoExe { pid })?;
            // Hash through /proc/<pid>/exe, and only if it is still the file recorded at
            // connect: the path and the hash then describe the same inode, the one the process
            // connected with, even if the path was replaced or deleted since.
            let (f, now) = open_exe(&self.proc_root, pid)?;
            if now != exe.file {
                return Err(UnixError::ExeChanged {
                    pid,
                    path: exe.path.clone(),
                });
            }
            let sha = self.hash(&f, &exe.file, &exe.path)?;
            match path_names_exe(&self.proc_root, pid, exe) {
                Ok(()) => out.push(Selector::raw(
                    "unix",
                    format!("path:{}", exe.path.display()),
                )),
                Err(why) => tracing::debug!(
                    pid,
                    path = %exe.path.display(),
                    "unix:path withheld: {why}"
                ),
            }
            out.push(Selector::raw("unix", format!("sha256:{sha}")));
        }
        Ok(out)
    }

    /// Files read so far to hash them (coalesced and cached calls read nothing).
    pub fn files_read(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Calls that waited for another caller's hash of the same file instead of reading it.
    pub fn coalesced_waits(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }

    /// The sha256 of `f`, whose identity is `id`: from the cache, from a concurrent caller
    /// reading the same file, or read now.
    fn hash(&self, f: &File, id: &FileId, path: &Path) -> Result<String, UnixError> {
        if let Some(h) = lock(&self.hashes).get(id).cloned() {
            return Ok(h);
        }
        let limit = self.cfg.workload_size_limit;
        if limit > 0 && id.size > limit {
            return Err(UnixError::TooLarge {
                path: path.to_path_buf(),
                size: id.size,
                limit,
            });
        }
        let flight = {
            let mut in_flight = lock(&self.in_flight);
            // Checked again under the in-flight lock: a reader inserts into the cache before it
            // leaves the in-flight map, so a miss here means nobody has the result yet.
            if let Some(h) = lock(&self.hashes).get(id).cloned() {
                return Ok(h);
            }
            match in_flight.get(id) {
                Some(f) => Err(f.clone()),
                None => {
                    let flight = Arc::new(Flight::default());
                    in_flight.insert(*id, flight.clone());
                    Ok(flight)
                }
            }
        };
        match flight {
            Err(other) => {
                self.coalesced.fetch_add(1, Ordering::Relaxed);
                other.wait(path, self.cfg.max_concurrent_hashes)
            }
            Ok(mine) => {
                let done = FlightDone {
                    attestor: self,
                    id: *id,
                    flight: mine,
                };
                let result = self.read_and_hash(f, id, path);
                if let Ok(h) = &result {
                    lock(&self.hashes).insert(*id, h.clone());
                }
                done.finish(result.as_ref().cloned().map_err(|e| e.to_string()));
                result
            }
        }
    }

    /// Reads and hashes `f` in one of the `max_concurrent_hashes` slots.
    fn read_and_hash(&self, f: &File, id: &FileId, path: &Path) -> Result<String, UnixError> {
        let _slot = self.slot()?;
        #[cfg(test)]
        if let Some(hook) = self.before_read {
            hook(self);
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        let io = |source| UnixError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        // From offset 0 whatever the file position, and never more than the size seen plus
        // one byte (to notice growth).
        let mut total: u64 = 0;
        while total <= id.size {
            let n = f.read_at(&mut buf, total).map_err(io)?;
            if n == 0 {
                break;
            }
            total = total.saturating_add(n as u64);
            ctx.update(buf.get(..n).unwrap_or_default());
        }
        let after = FileId::of(&f.metadata().map_err(io)?);
        if total != id.size || after != *id {
            return Err(UnixError::Modified {
                path: path.to_path_buf(),
            });
        }
        Ok(hex::encode(ctx.finish()))
    }

    /// Waits (bounded) for one of the `max_concurrent_hashes` reading slots.
    fn slot(&self) -> Result<Slot<'_>, UnixError> {
        let limit = self.cfg.max_concurrent_hashes.max(1);
        let busy = UnixError::Busy {
            limit: self.cfg.max_concurrent_hashes,
        };
        let mut slots = lock(&self.slots);
        if slots.reading >= limit {
            if slots.waiting >= MAX_WAITING_HASHES {
                return Err(busy);
            }
            slots.waiting += 1;
            let deadline = Instant::now() + HASH_WAIT;
            while slots.reading >= limit {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    slots.waiting -= 1;
                    return Err(busy);
                }
                slots = self
                    .slot_freed
                    .wait_timeout(slots, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            slots.waiting -= 1;
        }
        slots.reading += 1;
        Ok(Slot(self))
    }
}

/// Locks a mutex, recovering it if a thread panicked while holding it (the data stays valid:
/// every critical section leaves it consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reading slots in use and callers waiting for one.
#[derive(Debug, Default)]
struct Slots {
    reading: usize,
    waiting: usize,
}

/// One reading slot, given back on drop.
struct Slot<'a>(&'a UnixAttestor);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        lock(&self.0.slots).reading -= 1;
        self.0.slot_freed.notify_one();
    }
}

/// A hash being computed by one caller, awaited by the others asking for the same file.
#[derive(Debug, Default)]
struct Flight {
    result: Mutex<Option<Result<String, String>>>,
    done: Condvar,
}

impl Flight {
    /// Waits (bounded) for the reading caller's result.
    fn wait(&self, path: &Path, limit: usize) -> Result<String, UnixError> {
        let deadline = Instant::now() + HASH_WAIT;
        let mut result = lock(&self.result);
        loop {
            if let Some(r) = result.as_ref() {
                return r.clone().map_err(|reason| UnixError::Shared {
                    path: path.to_path_buf(),
                    reason,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(UnixError::Busy { limit });
            }
            result = self
                .done
                .wait_timeout(result, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Ends a flight: publishes the result (or, if the reader unwound, a failure) and removes the
/// flight from the in-flight map, so later callers use the cache or read afresh.
struct FlightDone<'a> {
    attestor: &'a UnixAttestor,
    id: FileId,
    flight: Arc<Flight>,
}

impl FlightDone<'_> {
    fn finish(self, result: Result<String, String>) {
        *lock(&self.flight.result) = Some(result);
    }
}

impl Drop for FlightDone<'_> {
    fn drop(&mut self) {
        lock(&self.attestor.in_flight).remove(&self.id);
        let mut result = lock(&self.flight.result);
        if result.is_none() {
            *result = Some(Err("the attestation reading it was abandoned".into()));
        }
        self.flight.done.notify_all();
    }
}

#[cfg(test)]
mod tests;
