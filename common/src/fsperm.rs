//! Directories a service trusts with its sockets, state and keys, opened without following
//! symlinks and checked for who could have made or changed them.
//!
//! A local user who creates `/tmp/continuity-agent/public` before the agent starts can later
//! swap the socket in it for their own; one who plants a symlink can make root chmod another
//! file. [`secure_dir`] therefore walks the path from `/` one component at a time with
//! `openat(O_NOFOLLOW | O_DIRECTORY)`, creates each missing component with `mkdirat`, and
//! refuses any directory on the way that another user could have changed:
//!
//! - every directory must be owned by the service's euid or by root;
//! - none may be writable by group or others, except a root-owned sticky one (`/tmp`) on the
//!   way — never the final directory itself;
//! - the final directory may not be a symlink; a symlink on the way is followed only when it is
//!   owned by the euid or root (the administrator's `/var/run -> /run`), and its target passes
//!   the same checks.
//!
//! Modes are set on the opened descriptor (`fchmod`), never by path, and everything inside the
//! directory is then done relative to that descriptor ([`SecureDir`]).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

pub use self::private_file::read_private_file;

mod private_file;

/// Why a directory or a file in it cannot be trusted or used.
#[derive(Debug, thiserror::Error)]
pub enum FsPermError {
    /// Owned by a uid other than the service's or root's.
    #[error(
        "{what} {path} is owned by uid {uid} (expected {expected}) with mode {mode:04o}: remove it or fix its ownership"
    )]
    Owner {
        /// What the path is for (e.g. "socket directory").
        what: String,
        /// The offending path.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// The acceptable owners.
        expected: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Writable by group or others.
    #[error(
        "{what} {path} is writable by group or others (owned by uid {uid}, mode {mode:04o}): remove it or make it writable by its owner only"
    )]
    Writable {
        /// What the path is for.
        what: String,
        /// The offending path.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// A secret file others could read or change.
    #[error(
        "{what} {path} is readable or writable by group or others (owned by uid {uid}, mode {mode:04o}): chmod 0600 it"
    )]
    Exposed {
        /// What the path is for (e.g. "key_manager.pin_file").
        what: String,
        /// The offending path.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// A symbolic link where a real directory is required.
    #[error(
        "{what} {path} is a symbolic link (owned by uid {uid}, mode {mode:04o}): remove it or configure the real directory"
    )]
    Symlink {
        /// What the path is for.
        what: String,
        /// The offending path.
        path: PathBuf,
        /// The link's owner.
        uid: u32,
        /// The link's permission bits.
        mode: u32,
    },
    /// Not a directory (or, inside one, not the kind of file expected).
    #[error("{what} {path} is not a {expected} (owned by uid {uid}, mode {mode:04o}): remove it")]
    WrongType {
        /// What the path is for.
        what: String,
        /// The offending path.
        path: PathBuf,
        /// "directory", "socket" or "regular file".
        expected: &'static str,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// The path cannot name a directory of the service's own.
    #[error("{what} {path}: {reason}")]
    BadPath {
        /// What the path is for.
        what: String,
        /// The path.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// A system call failed.
    #[error("{what} {path}: cannot {op}: {source}")]
    Io {
        /// What the path is for.
        what: String,
        /// The path.
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A directory that passed [`secure_dir`], held open; work inside it is relative to its fd.
#[derive(Debug)]
pub struct SecureDir {
    fd: OwnedFd,
    path: PathBuf,
    what: String,
}

/// Mode of the directories [`secure_dir`] creates on the way to the final one.
const PARENT_MODE: u32 = 0o755;

/// Opens `path` as a directory only this service (or root) can change, creating missing
/// components (parents 0755, the last one `mode`), and sets the last one's mode to `mode`.
/// `what` names it in errors ("socket directory", "data_dir").
pub fn secure_dir(path: &Path, mode: u32, what: &str) -> Result<SecureDir, FsPermError> {
    let bad = |reason| FsPermError::BadPath {
        what: what.into(),
        path: path.into(),
        reason,
    };
    let mut names = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => names.push(n),
            Component::ParentDir => return Err(bad("must not contain `..`")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    let Some((last, parents)) = names.split_last() else {
        return Err(bad("must be a directory of its own, not / or ."));
    };
    let parent_what = format!("{what} {}: parent directory", path.display());
    let mut walk = Walk {
        euid: rustix::process::geteuid().as_raw(),
        path: if path.is_absolute() {
            PathBuf::from("/")
        } else {
            PathBuf::from(".")
        },
    };
    let start = walk.path.clone();
    let mut fd = rustix::fs::openat(CWD, &start, OFlags::PATH | dir_flags(), Mode::empty())
        .map_err(|e| walk.io(&parent_what, "open", e))?;
    walk.check(&parent_what, &fd, false)?;
    for name in parents {
        fd = walk.step(&fd, name, &parent_what, None)?;
    }
    let fd = walk.step(&fd, last, what, Some(mode))?;
    Ok(SecureDir {
        fd,
        path: walk.path,
        what: what.into(),
    })
}

impl SecureDir {
    /// The directory's path as configured.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a socket named `name` exists here; anything else by that name is an error
    /// (the service never removes what it did not make).
    pub fn socket_exists(&self, name: &OsStr) -> Result<bool, FsPermError> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(self.io(name, "stat", e)),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Socket => Ok(true),
            Ok(st) => Err(self.wrong_type(name, "socket", &st)),
        }
    }

    /// Removes the stale socket `name` (lstat first: only a socket is ever removed).
    pub fn remove_socket(&self, name: &OsStr) -> Result<(), FsPermError> {
        if self.socket_exists(name)? {
            rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())
                .map_err(|e| self.io(name, "remove stale socket", e))?;
        }
        Ok(())
    }

    /// Sets the mode of `name` in this directory (a socket just bound here). The directory is
    /// writable only by this service, so nobody can swap `name` for a link in between.
    pub fn set_mode(&self, name: &OsStr, mode: u32) -> Result<(), FsPermError> {
        rustix::fs::chmodat(&self.fd, name, Mode::from_raw_mode(mode), AtFlags::empty())
            .map_err(|e| self.io(name, "set the mode of", e))
    }

    /// Reads the regular file `name` (not following a symlink); `None` if it does not exist.
    pub fn read(&self, name: &OsStr) -> Result<Option<Vec<u8>>, FsPermError> {
        // NONBLOCK: a FIFO planted here must not hang the open; it is refused just below.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(self.io(name, "open", e)),
            Ok(fd) => fd,
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| self.io(name, "stat", e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(self.wrong_type(name, "regular file", &st));
        }
        let mut bytes = Vec::new();
        File::from(fd)
            .read_to_end(&mut bytes)
            .map_err(|e| self.io_std(name, "read", e))?;
        Ok(Some(bytes))
    }

    /// Replaces `name` atomically with what `write` puts in a fresh file of mode `mode`: the
    /// temp file is created `O_EXCL | O_NOFOLLOW` here, fsynced, renamed over `name`, and the
    /// directory fsynced.
    pub fn write_atomic(
        &self,
        name: &str,
        mode: u32,
        write: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> Result<(), FsPermError> {
        let tmp = self.write_temp(name, mode, write)?;
        let tmp_os = OsStr::new(&tmp);
        let result = rustix::fs::renameat(&self.fd, tmp_os, &self.fd, name)
            .map_err(|e| self.io(OsStr::new(name), "install", e))
            .and_then(|()| {
                rustix::fs::fsync(&self.fd).map_err(|e| self.io(OsStr::new(""), "sync", e))
            });
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&self.fd, tmp_os, AtFlags::empty());
        }
        result
    }

    /// Creates `name` with what `write` puts in a fresh file of mode `mode`, only if `name`
    /// does not exist: the temp file is written and fsynced as in [`SecureDir::write_atomic`],
    /// then hard-linked into place (a link never replaces), so processes creating it at once
    /// all end up with one content. Returns false (nothing changed) if `name` existed.
    pub fn write_new(
        &self,
        name: &str,
        mode: u32,
        write: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> Result<bool, FsPermError> {
        let tmp = self.write_temp(name, mode, write)?;
        let tmp_os = OsStr::new(&tmp);
        let linked = rustix::fs::linkat(&self.fd, tmp_os, &self.fd, name, AtFlags::empty());
        let _ = rustix::fs::unlinkat(&self.fd, tmp_os, AtFlags::empty());
        match linked {
            Ok(()) => {
                rustix::fs::fsync(&self.fd).map_err(|e| self.io(OsStr::new(""), "sync", e))?;
                Ok(true)
            }
            Err(Errno::EXIST) => Ok(false),
            Err(e) => Err(self.io(OsStr::new(name), "install", e)),
        }
    }

    /// Writes a fresh temp file for `name` (created `O_EXCL | O_NOFOLLOW`, mode `mode`,
    /// fsynced); returns its name. Removed again if writing fails.
    fn write_temp(
        &self,
        name: &str,
        mode: u32,
        write: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> Result<String, FsPermError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let tmp_os = OsStr::new(&tmp);
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
        let fd = rustix::fs::openat(
            &self.fd,
            tmp_os,
            flags | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|e| self.io(tmp_os, "create", e))?;
        let result = (|| {
            // The umask may have narrowed the mode; never widens it.
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
                .map_err(|e| self.io(tmp_os, "set the mode of", e))?;
            let mut f = File::from(fd);
            write(&mut f)
                .and_then(|()| f.sync_all())
                .map_err(|e| self.io_std(tmp_os, "write", e))
        })();
        match result {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = rustix::fs::unlinkat(&self.fd, tmp_os, AtFlags::empty());
                Err(e)
            }
        }
    }

    /// Removes the file `name` (not following a symlink; absent is fine) and fsyncs the
    /// directory, so the removal survives a crash.
    pub fn remove_file(&self, name: &OsStr) -> Result<(), FsPermError> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) => rustix::fs::fsync(&self.fd).map_err(|e| self.io(OsStr::new(""), "sync", e)),
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(self.io(name, "remove", e)),
        }
    }

    fn io(&self, name: &OsStr, op: &'static str, e: Errno) -> FsPermError {
        self.io_std(name, op, e.into())
    }

    fn io_std(&self, name: &OsStr, op: &'static str, source: std::io::Error) -> FsPermError {
        FsPermError::Io {
            what: self.what.clone(),
            path: self.path.join(name),
            op,
            source,
        }
    }

    fn wrong_type(&self, name: &OsStr, expected: &'static str, st: &Stat) -> FsPermError {
        FsPermError::WrongType {
            what: format!("in {} {}:", self.what, self.path.display()),
            path: self.path.join(name),
            expected,
            uid: st.st_uid,
            mode: perm(st),
        }
    }
}

/// The state of a walk down the path: who we are and how far we got.
struct Walk {
    euid: u32,
    path: PathBuf,
}

impl Walk {
    /// Opens (creating if needed) `name` under `parent`; `mode` is `Some` for the final
    /// directory, which gets stricter checks and its mode set.
    fn step(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        what: &str,
        mode: Option<u32>,
    ) -> Result<OwnedFd, FsPermError> {
        self.path.push(name);
        let last = mode.is_some();
        let lstat = |w: &Self| {
            rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| w.io(what, "stat", e))
        };
        let mut existing = match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Some(st),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(self.io(what, "stat", e)),
        };
        let mut created = false;
        if existing.is_none() {
            // 0700 until checked; the mode wanted is set on the descriptor below.
            match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
                Ok(()) => created = true,
                // Made by someone else in between: checked like any existing one.
                Err(Errno::EXIST) => existing = Some(lstat(self)?),
                Err(e) => return Err(self.io(what, "create", e)),
            }
        }
        let mut follow = false;
        if let Some(st) = existing
            && FileType::from_raw_mode(st.st_mode) == FileType::Symlink
        {
            if last {
                return Err(FsPermError::Symlink {
                    what: what.into(),
                    path: self.path.clone(),
                    uid: st.st_uid,
                    mode: perm(&st),
                });
            }
            // Only the administrator (root or us) can have made it; its target is checked
            // below like any directory on the way.
            self.check_owner(&format!("{what} (symbolic link)"), &st)?;
            follow = true;
        }
        // Directories we create or set a mode on are opened for reading (fchmod needs it);
        // the others on the way only as a path, which needs no read permission.
        let mut flags = dir_flags();
        if !follow {
            flags |= OFlags::NOFOLLOW;
        }
        flags |= if last || created {
            OFlags::RDONLY
        } else {
            OFlags::PATH
        };
        let fd = rustix::fs::openat(parent, name, flags, Mode::empty())
            .map_err(|e| self.io(what, "open", e))?;
        self.check(what, &fd, last)?;
        let want = match mode {
            Some(m) => Some(m),
            None if created => Some(PARENT_MODE),
            None => None,
        };
        if let Some(m) = want {
            // On the opened descriptor: whatever happens to the name meanwhile.
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(m))
                .map_err(|e| self.io(what, "set the mode of", e))?;
        }
        Ok(fd)
    }

    /// Checks an opened directory: a directory, owned by us or root, not writable by others
    /// (a sticky root-owned one such as /tmp is allowed on the way, not as the final one).
    fn check(&self, what: &str, fd: &OwnedFd, last: bool) -> Result<(), FsPermError> {
        let st = rustix::fs::fstat(fd).map_err(|e| self.io(what, "stat", e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(FsPermError::WrongType {
                what: what.into(),
                path: self.path.clone(),
                expected: "directory",
                uid: st.st_uid,
                mode: perm(&st),
            });
        }
        self.check_owner(what, &st)?;
        let shared_root = !last && st.st_uid == 0 && st.st_mode & 0o1000 != 0;
        if st.st_mode & 0o022 != 0 && !shared_root {
            return Err(FsPermError::Writable {
                what: what.into(),
                path: self.path.clone(),
                uid: st.st_uid,
                mode: perm(&st),
            });
        }
        Ok(())
    }

    fn check_owner(&self, what: &str, st: &Stat) -> Result<(), FsPermError> {
        if st.st_uid == self.euid || st.st_uid == 0 {
            return Ok(());
        }
        Err(FsPermError::Owner {
            what: what.into(),
            path: self.path.clone(),
            uid: st.st_uid,
            expected: if self.euid == 0 {
                "0".into()
            } else {
                format!("{} or 0", self.euid)
            },
            mode: perm(st),
        })
    }

    fn io(&self, what: &str, op: &'static str, e: Errno) -> FsPermError {
        FsPermError::Io {
            what: what.into(),
            path: self.path.clone(),
            op,
            source: e.into(),
        }
    }
}

fn dir_flags() -> OFlags {
    OFlags::DIRECTORY | OFlags::CLOEXEC
}

/// Permission bits (including setuid/setgid/sticky) of a stat.
fn perm(st: &Stat) -> u32 {
    st.st_mode & 0o7777
}

#[cfg(test)]
mod tests;
