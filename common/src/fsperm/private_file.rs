//! Small secret files (a PIN) read only when nobody but the service could have written or
//! read them.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use rustix::fs::{CWD, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::{FsPermError, Walk, perm};

/// Reads a small secret file (a PIN): opened `O_NOFOLLOW` (a symlink is refused), it must be
/// a regular file owned by the service's euid or root, not readable or writable by group or
/// others, and at most `max_len` bytes. The bytes are read into one buffer sized up front (no
/// reallocation leaves copies behind) that is wiped on drop.
pub fn read_private_file(
    path: &Path,
    what: &str,
    max_len: usize,
) -> Result<zeroize::Zeroizing<Vec<u8>>, FsPermError> {
    let walk = Walk {
        euid: rustix::process::geteuid().as_raw(),
        path: path.to_path_buf(),
    };
    // NONBLOCK: a FIFO must not hang the open; it is refused as not a regular file.
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(CWD, path, flags, Mode::empty()).map_err(|e| match e {
        Errno::LOOP => FsPermError::BadPath {
            what: what.into(),
            path: path.into(),
            reason: "is a symbolic link; configure the file itself",
        },
        e => walk.io(what, "open", e),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| walk.io(what, "stat", e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(FsPermError::WrongType {
            what: what.into(),
            path: path.into(),
            expected: "regular file",
            uid: st.st_uid,
            mode: perm(&st),
        });
    }
    walk.check_owner(what, &st)?;
    if st.st_mode & 0o077 != 0 {
        return Err(FsPermError::Exposed {
            what: what.into(),
            path: path.into(),
            uid: st.st_uid,
            mode: perm(&st),
        });
    }
    let size = usize::try_from(st.st_size).unwrap_or(usize::MAX);
    if size > max_len {
        return Err(FsPermError::BadPath {
            what: what.into(),
            path: path.into(),
            reason: "is larger than a secret of this kind can be",
        });
    }
    // One more byte than the file holds, so reaching the end never grows the buffer.
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(size + 1));
    File::from(fd)
        .take(max_len as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FsPermError::Io {
            what: what.into(),
            path: path.into(),
            op: "read",
            source: e,
        })?;
    if bytes.len() > max_len {
        return Err(FsPermError::BadPath {
            what: what.into(),
            path: path.into(),
            reason: "is larger than a secret of this kind can be",
        });
    }
    Ok(bytes)
}
