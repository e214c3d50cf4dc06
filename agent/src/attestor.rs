//! Workload attestation: the configured attestors (today: unix) run against a connection's
//! peer, and the result stands only if the peer is still the process that connected.
//!
//! Results are cached per process — (pid, start time, uid, gid, and the identity of the
//! executable recorded at accept: device, inode, size, mtime, ctime) — so a workload that
//! reconnects is not re-attested from scratch; an `exec`, or a rewrite of the binary in place
//! (even with its mtime restored: ctime changes), misses the cache.
//!
//! The selectors describe the process that connected, as it was at accept: every result, fresh
//! or cached, stands only if that process is still alive under its pidfd and still runs the
//! executable recorded at accept (it has not exec'd since). Within the TTL a cached result also
//! keeps whether `unix:path` was emitted (whether the agent found that inode at that path).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use continuity_attestors::Selector;
use continuity_attestors::unix::{FileId, UnixAttestor};

use crate::peer::Peer;

/// Turns a connected peer into selectors (the Workload API's view of attestation).
pub trait WorkloadAttestor: Send + Sync + 'static {
    /// Selectors of the peer; an error means attestation failed (the caller gets Unavailable).
    /// Blocking: it reads /proc and may stat the executable on the workload's file system.
    fn attest(&self, peer: &Peer) -> Result<Arc<HashSet<Selector>>, String>;

    /// The selectors remembered for this very process, when they can be confirmed without
    /// blocking (None: call [`WorkloadAttestor::attest`] on a blocking thread).
    fn attest_cached(&self, peer: &Peer) -> Option<Arc<HashSet<Selector>>> {
        let _ = peer;
        None
    }
}

/// How long a cached attestation is trusted without re-reading /proc.
const CACHE_TTL: Duration = Duration::from_secs(30);
/// Most processes remembered.
const CACHE_MAX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ProcessKey {
    pid: u32,
    start_time: u64,
    uid: u32,
    gid: u32,
    exe: Option<FileId>,
}

/// Selectors remembered for a process, and when.
type Cached = (Arc<HashSet<Selector>>, Instant);

/// The attestors enabled in agent.toml.
#[derive(Debug)]
pub struct Attestors {
    unix: Option<UnixAttestor>,
    k8s: Option<continuity_attestors::k8s::K8sAttestor>,
    cache: Mutex<HashMap<ProcessKey, Cached>>,
}

impl Attestors {
    /// Attestors from config.
    pub fn new(
        unix: Option<continuity_attestors::unix::UnixConfig>,
        k8s: Option<continuity_attestors::k8s::K8sConfig>,
    ) -> Arc<Self> {
        Arc::new(Self {
            unix: unix.map(UnixAttestor::new),
            k8s: k8s.map(continuity_attestors::k8s::K8sAttestor::new),
            cache: Mutex::default(),
        })
    }

    fn cached(&self, key: &ProcessKey) -> Option<Arc<HashSet<Selector>>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .map(|(s, _)| s.clone())
    }

    fn key(peer: &Peer) -> Option<ProcessKey> {
        Some(ProcessKey {
            pid: peer.pid,
            start_time: peer.start_time?,
            uid: peer.uid,
            gid: peer.gid,
            exe: peer.exe.as_ref().map(|e| e.file),
        })
    }

    fn fresh(&self, peer: &Peer) -> Result<HashSet<Selector>, String> {
        let mut out = HashSet::new();
        if let Some(unix) = &self.unix {
            out.extend(
                unix.attest(peer.pid, peer.uid, peer.gid, peer.exe.as_ref())
                    .map_err(|e| e.to_string())?,
            );
        }
        if let Some(k8s) = &self.k8s {
            out.extend(k8s.attest(peer.pid).map_err(|e| e.to_string())?);
        }
        Ok(out)
    }
}

impl WorkloadAttestor for Attestors {
    fn attest(&self, peer: &Peer) -> Result<Arc<HashSet<Selector>>, String> {
        let key = Self::key(peer);
        let cached = key.as_ref().and_then(|k| self.cached(k));
        let selectors = match cached {
            Some(s) => s,
            None => {
                let s = Arc::new(self.fresh(peer)?);
                if let Some(k) = key {
                    let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                    if cache.len() >= CACHE_MAX {
                        cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
                        if cache.len() >= CACHE_MAX {
                            cache.clear();
                        }
                    }
                    cache.insert(k, (s.clone(), Instant::now()));
                }
                s
            }
        };
        // Whatever was read (or remembered) counts only if the connecting process is still the
        // one alive under this pid, running the executable it connected with.
        if let Some(exe) = &peer.exe {
            continuity_attestors::unix::exe_unchanged(peer.pid, exe).map_err(|e| e.to_string())?;
        }
        if !peer.still_same_process() {
            return Err(format!(
                "process {} exited or was replaced during attestation",
                peer.pid
            ));
        }
        Ok(selectors)
    }

    /// A cache hit confirmed with the same checks as [`WorkloadAttestor::attest`], made the
    /// way accept made them (procfs and `statx` without sync): the executable is still the
    /// one recorded at accept and the process is still the one that connected.
    fn attest_cached(&self, peer: &Peer) -> Option<Arc<HashSet<Selector>>> {
        let selectors = self.cached(&Self::key(peer)?)?;
        (peer.exe_unchanged_now() && peer.still_same_process()).then_some(selectors)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn attestors() -> Arc<Attestors> {
        let unix = continuity_attestors::unix::UnixConfig {
            discover_workload_path: false,
            ..Default::default()
        };
        Attestors::new(Some(unix), None)
    }

    #[tokio::test]
    async fn a_cached_result_is_confirmed_in_place_only_for_the_same_executable() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let a_peer = Peer::of(&a).unwrap();
        let att = attestors();
        assert!(att.attest_cached(&a_peer).is_none(), "nothing cached yet");
        let fresh = att.attest(&a_peer).unwrap();
        assert_eq!(att.attest_cached(&a_peer).unwrap(), fresh);
        // A process recorded at accept with another executable (it exec'd since) is not
        // confirmed from the cache: the blocking path decides (and refuses it).
        let (c, _d) = tokio::net::UnixStream::pair().unwrap();
        let mut other = Peer::of(&c).unwrap();
        if let Some(e) = other.exe.as_mut() {
            e.file.ino ^= 1;
        }
        att.cache.lock().unwrap().insert(
            Attestors::key(&other).unwrap(),
            (fresh.clone(), Instant::now()),
        );
        assert!(att.attest_cached(&other).is_none());
        assert!(att.attest(&other).is_err());
    }
}
