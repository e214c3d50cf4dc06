//! Who is on the other end of a Workload API connection, bound to the process for good.
//!
//! At accept time the kernel tells us the peer's uid, gid and pid (SO_PEERCRED) and, on
//! Linux ≥ 6.5, hands us a pidfd for the very process that connected (SO_PEERPIDFD). On older
//! kernels we open a pidfd for the pid and record its start time instead (SPIRE's approach).
//! After attestation reads `/proc/<pid>`, we check that the process is still the one that
//! connected — alive under that pidfd, same start time — so a recycled pid can never be
//! attested as someone else.
//!
//! At accept we also record the executable the peer runs ([`ExeIdentity`]: path, device, inode,
//! size, mtime, ctime), so that the selectors describe the process as it was when it connected:
//! attestation fails if the process has exec'd another file since (see
//! `continuity_attestors::unix`). The record is taken without opening the file or asking its
//! file system for fresh attributes (an `O_PATH` descriptor, `statx` with
//! `AT_STATX_DONT_SYNC`, `readlink` of that descriptor), so a workload whose executable lives
//! on a FUSE mount it serves cannot stall the accept loop; the descriptor is closed at once
//! (no extra file descriptor per connection). The recorded path is the link text, i.e. the path
//! in the *caller's* mount namespace: the unix attestor emits `unix:path` only after checking,
//! in the agent's own namespace, that it names the recorded inode.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use continuity_attestors::unix::{ExeIdentity, FileId};
use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::UnixStream;

/// How the caller is bound to its process.
#[derive(Debug)]
pub enum Binding {
    /// A pidfd from SO_PEERPIDFD: names the connecting process itself.
    PeerPidfd(OwnedFd),
    /// pidfd_open(pid) plus the start time seen at accept (older kernels).
    PidfdOpen(OwnedFd, u64),
    /// Neither worked (the process already exited, or no pidfd support): attestation fails.
    None,
}

/// The peer of one connection.
#[derive(Debug)]
pub struct Peer {
    /// Effective uid at connect time.
    pub uid: u32,
    /// Effective gid at connect time.
    pub gid: u32,
    /// Process id at connect time.
    pub pid: u32,
    /// The process's pidfs inode, when its binding has one: unique for the boot.
    pub process: Option<u64>,
    /// Process binding.
    pub binding: Binding,
    /// Process start time (clock ticks since boot) at accept time.
    pub start_time: Option<u64>,
    /// The executable the process ran at accept time (None if it could not be read).
    pub exe: Option<ExeIdentity>,
}

static LOGGED_MODE: AtomicBool = AtomicBool::new(false);

/// `PID_FS_MAGIC`: pidfds live on pidfs (Linux ≥ 6.9), where every pidfd of one process shares
/// one inode whose number is never reused during the boot.
const PIDFS_MAGIC: i64 = 0x5049_4446;

/// The pidfs inode of a pidfd: a name for the process that no later process can take (None
/// on kernels whose pidfds share an anonymous inode).
#[allow(clippy::useless_conversion)] // `f_type`'s integer type differs between architectures
fn pidfs_inode(fd: &OwnedFd) -> Option<u64> {
    static PIDFS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let pidfs = *PIDFS
        .get_or_init(|| rustix::fs::fstatfs(fd).is_ok_and(|s| i64::from(s.f_type) == PIDFS_MAGIC));
    if !pidfs {
        return None;
    }
    rustix::fs::fstat(fd).ok().map(|st| st.st_ino)
}

/// Facts about processes that never change while they live (start time, pod), remembered by
/// pidfs inode so that a process that connects again costs no procfs read. Bounded: cleared
/// when full (a miss only costs the read again).
#[derive(Debug)]
pub struct Memo<T>(std::sync::Mutex<std::collections::HashMap<u64, T>>);

/// Most processes a [`Memo`] remembers.
const MEMO_MAX: usize = 4096;

impl<T: Clone> Memo<T> {
    /// An empty memo.
    pub fn new() -> Self {
        Self(std::sync::Mutex::default())
    }

    /// The value for `process` (a pidfs inode), computed by `f` the first time; always `f()`
    /// when the process has no such name.
    pub fn get_or(&self, process: Option<u64>, f: impl FnOnce() -> T) -> T {
        let Some(key) = process else {
            return f();
        };
        if let Some(v) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return v.clone();
        }
        let v = f();
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MEMO_MAX {
            map.clear();
        }
        map.insert(key, v.clone());
        v
    }
}

impl<T: Clone> Default for Memo<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether the process behind a pidfd has exited (its pidfd polls readable).
fn pidfd_exited(fd: &OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // An error (EINTR among them) is taken as "cannot tell": exited, so attestation fails
    // safe and the client retries.
    poll(&mut fds, Some(&now)).map_or(true, |n| n > 0)
}

impl Peer {
    /// Reads the peer's credentials and binds them to its process.
    pub fn of(stream: &UnixStream) -> std::io::Result<Self> {
        let cred = getsockopt(stream, sockopt::PeerCredentials).map_err(std::io::Error::from)?;
        let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid() as u32);
        let binding = match getsockopt(stream, sockopt::PeerPidfd) {
            Ok(fd) => {
                if !LOGGED_MODE.swap(true, Ordering::Relaxed) {
                    tracing::info!("workload attestation binds callers with SO_PEERPIDFD");
                }
                Binding::PeerPidfd(fd)
            }
            Err(_) => {
                if !LOGGED_MODE.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        "SO_PEERPIDFD unavailable (kernel < 6.5); binding callers with pidfd_open + start time"
                    );
                }
                let start = continuity_attestors::unix::start_time(pid);
                let pid_t = rustix::process::Pid::from_raw(pid as i32);
                match (
                    pid_t.map(|p| {
                        rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
                    }),
                    start,
                ) {
                    (Some(Ok(fd)), Some(start)) => Binding::PidfdOpen(fd, start),
                    _ => Binding::None,
                }
            }
        };
        static START_TIMES: std::sync::LazyLock<Memo<Option<u64>>> =
            std::sync::LazyLock::new(Memo::new);
        let process = match &binding {
            Binding::PeerPidfd(fd) => pidfs_inode(fd),
            _ => None,
        };
        let start_time =
            START_TIMES.get_or(process, || continuity_attestors::unix::start_time(pid));
        let exe = exe_at_accept(pid);
        Ok(Self {
            uid,
            gid,
            pid,
            process,
            binding,
            start_time,
            exe,
        })
    }

    /// A stable id for this workload process: pid plus start time (a recycled pid differs).
    pub fn workload_id(&self) -> String {
        format!(
            "pid:{}:start:{}",
            self.pid,
            self.start_time.unwrap_or_default()
        )
    }

    /// Whether the process still runs the executable recorded at accept, read the way accept
    /// read it (never blocking on the executable's file system); false when either is unknown.
    pub fn exe_unchanged_now(&self) -> bool {
        self.exe
            .as_ref()
            .is_some_and(|e| exe_file(self.pid).is_some_and(|(_, now)| now == e.file))
    }

    /// True if the process that connected is still alive under the same pid (checked after
    /// reading /proc, so what was read belonged to it).
    pub fn still_same_process(&self) -> bool {
        match &self.binding {
            // The pidfd names the very process that connected: alive means still it.
            Binding::PeerPidfd(fd) => !pidfd_exited(fd),
            Binding::PidfdOpen(fd, start) => {
                !pidfd_exited(fd)
                    && continuity_attestors::unix::start_time(self.pid) == Some(*start)
            }
            Binding::None => false,
        }
    }
}

/// The executable `pid` runs now, read without opening it or asking its file system (so a
/// hostile FUSE mount cannot block the caller): path and identity come from one `O_PATH`
/// descriptor, so they describe the same inode.
fn exe_at_accept(pid: u32) -> Option<ExeIdentity> {
    let (fd, file) = exe_file(pid)?;
    let path: PathBuf = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    Some(ExeIdentity { path, file })
}

/// An `O_PATH` descriptor of the executable `pid` runs now, and its identity from `statx`
/// with `AT_STATX_DONT_SYNC`: neither opens the file nor asks its file system.
fn exe_file(pid: u32) -> Option<(OwnedFd, FileId)> {
    use rustix::fs::{AtFlags, Mode, OFlags, StatxFlags};
    let fd = rustix::fs::open(
        format!("/proc/{pid}/exe"),
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let want = StatxFlags::INO | StatxFlags::SIZE | StatxFlags::MTIME | StatxFlags::CTIME;
    let st = rustix::fs::statx(
        &fd,
        "",
        AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC,
        want,
    )
    .ok()?;
    if !StatxFlags::from_bits_retain(st.stx_mask).contains(want) {
        return None;
    }
    let file = FileId {
        dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
        ino: st.stx_ino,
        size: st.stx_size,
        mtime: st.stx_mtime.tv_sec,
        mtime_nsec: i64::from(st.stx_mtime.tv_nsec),
        ctime: st.stx_ctime.tv_sec,
        ctime_nsec: i64::from(st.stx_ctime.tv_nsec),
    };
    Some((fd, file))
}

/// What a Workload API request knows about its connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer (None if credentials could not be read).
    pub peer: Option<Arc<Peer>>,
    /// Stable id of the peer process (pid + start time), computed once at accept.
    pub workload_id: Arc<str>,
    /// Attestation result, computed once per connection.
    pub selectors:
        Arc<tokio::sync::OnceCell<Arc<std::collections::HashSet<continuity_attestors::Selector>>>>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn records_the_executable_at_accept() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = Peer::of(&a).unwrap();
        assert_eq!(peer.pid, std::process::id());
        let exe = peer.exe.as_ref().unwrap();
        assert_eq!(exe.path, std::env::current_exe().unwrap());
        let m = std::fs::metadata(&exe.path).unwrap();
        assert_eq!(exe.file, FileId::of(&m));
        assert!(peer.still_same_process());
        assert!(continuity_attestors::unix::exe_unchanged(peer.pid, exe).is_ok());
        assert!(peer.exe_unchanged_now());
        // A second connection of the same process is the same pidfs process (kernel ≥ 6.9).
        let (c, _d) = UnixStream::pair().unwrap();
        let again = Peer::of(&c).unwrap();
        assert_eq!(again.process, peer.process);
        assert_eq!(again.start_time, peer.start_time);
    }

    #[test]
    fn an_exited_process_is_no_longer_the_one_that_connected() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        assert!(!pidfd_exited(&fd));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(pidfd_exited(&fd));
    }

    #[test]
    fn a_memo_computes_once_per_process_and_always_without_a_name() {
        let memo = Memo::new();
        let mut calls = 0;
        assert_eq!(
            memo.get_or(Some(7), || {
                calls += 1;
                1
            }),
            1
        );
        assert_eq!(
            memo.get_or(Some(7), || {
                calls += 1;
                2
            }),
            1
        );
        assert_eq!(
            memo.get_or(None, || {
                calls += 1;
                3
            }),
            3
        );
        assert_eq!(
            memo.get_or(None, || {
                calls += 1;
                4
            }),
            4
        );
        assert_eq!(calls, 3);
    }
}
