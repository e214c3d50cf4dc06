//! Which executable a process runs: the file identity recorded at accept, the check that it
//! has not exec'd since, and the check that its path names that file in the agent's view.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::UnixError;

/// The identity of one version of one file: same inode, same content metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: i64,
    /// Status-change time, seconds (cannot be set back by a user).
    pub ctime: i64,
    /// Status-change time, nanoseconds.
    pub ctime_nsec: i64,
}

impl FileId {
    /// The identity of a file from its metadata.
    pub fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        }
    }

    /// True if both name the same inode (whatever its content).
    pub fn same_inode(&self, other: &Self) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

/// The executable a process ran when it connected: the path and the file it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExeIdentity {
    /// What `/proc/<pid>/exe` pointed to.
    pub path: PathBuf,
    /// The file.
    pub file: FileId,
}

impl ExeIdentity {
    /// Reads the executable of `pid` now (open, fstat, readlink of `/proc/<pid>/exe`).
    ///
    /// This opens the file, which on a FUSE file system asks its daemon: the agent's accept
    /// path records the identity without opening (see `endpoints::peer`); this is for tests
    /// and callers on a blocking thread.
    pub fn read(pid: u32) -> Result<Self, UnixError> {
        let (_, file) = open_exe(Path::new("/proc"), pid)?;
        let path =
            std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|source| UnixError::Proc {
                pid,
                what: "exe",
                source,
            })?;
        let exe = Self { path, file };
        // Still the same file after readlink, so the path and the identity belong together.
        exe_unchanged(pid, &exe)?;
        Ok(exe)
    }
}

/// Checks that `pid` still runs the inode recorded in `exe` (it has not exec'd another file).
pub fn exe_unchanged(pid: u32, exe: &ExeIdentity) -> Result<(), UnixError> {
    let m = std::fs::metadata(format!("/proc/{pid}/exe")).map_err(|source| UnixError::Proc {
        pid,
        what: "exe",
        source,
    })?;
    if FileId::of(&m) == exe.file {
        Ok(())
    } else {
        Err(UnixError::ExeChanged {
            pid,
            path: exe.path.clone(),
        })
    }
}

/// Why `unix:path` is withheld for a process (its other selectors, `unix:sha256` included, are
/// still produced).
#[derive(Debug, thiserror::Error)]
pub enum PathWithheld {
    /// The kernel marks the executable as unlinked.
    #[error("the executable was deleted (the link text ends with \" (deleted)\")")]
    Deleted,
    /// The link text is not an absolute path (e.g. a file outside any reachable mount).
    #[error("the executable's path is not absolute")]
    NotAbsolute,
    /// The path does not resolve in the agent's mount namespace.
    #[error("the path does not resolve in the agent's mount namespace: {0}")]
    Unresolvable(std::io::Error),
    /// The path names another file for the agent than the one the process runs.
    #[error(
        "the path names another file in the agent's mount namespace than the executable the \
         process runs ({ns}; the file may also have been replaced since)"
    )]
    OtherFile {
        /// Whether the process's mount namespace differed from the agent's, in words.
        ns: &'static str,
    },
}

/// Checks that the recorded path, resolved in the agent's own mount namespace (symlinks
/// followed: that is the agent's view), names the inode the process runs.
///
/// The text of `/proc/<pid>/exe` is the path in the *process's* mount namespace, which an
/// unprivileged user can rearrange (`unshare -Urm`, then bind-mount any file over any path), so
/// the text alone proves nothing. It counts only if the agent, looking up that path itself,
/// finds the same device and inode.
pub fn path_names_exe(proc_root: &Path, pid: u32, exe: &ExeIdentity) -> Result<(), PathWithheld> {
    use std::os::unix::ffi::OsStrExt;
    if exe.path.as_os_str().as_bytes().ends_with(b" (deleted)") {
        return Err(PathWithheld::Deleted);
    }
    if !exe.path.is_absolute() {
        return Err(PathWithheld::NotAbsolute);
    }
    let m = std::fs::metadata(&exe.path).map_err(PathWithheld::Unresolvable)?;
    if FileId::of(&m).same_inode(&exe.file) {
        return Ok(());
    }
    let ns = match same_mount_ns(proc_root, pid) {
        Some(true) => "same mount namespace as the agent",
        Some(false) => "the process is in another mount namespace",
        None => "its mount namespace could not be read",
    };
    Err(PathWithheld::OtherFile { ns })
}

/// Whether `pid` shares the agent's mount namespace (None if either cannot be read).
pub(super) fn same_mount_ns(proc_root: &Path, pid: u32) -> Option<bool> {
    let ns = |who: &str| {
        std::fs::metadata(proc_root.join(who).join("ns/mnt"))
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    Some(ns(&pid.to_string())? == ns("self")?)
}

/// Opens the executable `pid` runs now, with its identity (fstat of the opened file).
pub(super) fn open_exe(proc_root: &Path, pid: u32) -> Result<(File, FileId), UnixError> {
    let err = |source| UnixError::Proc {
        pid,
        what: "exe",
        source,
    };
    let f = File::open(proc_root.join(pid.to_string()).join("exe")).map_err(err)?;
    let id = FileId::of(&f.metadata().map_err(err)?);
    Ok((f, id))
}
