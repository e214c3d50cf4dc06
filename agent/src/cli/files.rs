//! Reading inputs and writing outputs named on the command line.
//!
//! Outputs that are regular files are replaced atomically (a temp file in the same directory,
//! written, fsynced, renamed over the name, the directory fsynced): a sidecar reading
//! `svid.0.key` never sees half a key, and a crash leaves the old file or the new one.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::error::CliError;

/// Reads a whole file; the error names it.
pub fn read(p: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(p).map_err(|e| CliError::Io(format!("{}: {e}", p.display())))
}

/// Writes a file as the process's umask allows; the error names it.
pub fn write(p: &Path, data: &[u8]) -> Result<(), CliError> {
    write_mode(p, data, 0o666)
}

/// Replaces `p` with a file of `mode` (0600 for private material, narrowed by the umask)
/// holding `data`. Anything that is not a regular file (`/dev/stdout`, a FIFO) is written in
/// place.
pub fn write_mode(p: &Path, data: &[u8], mode: u32) -> Result<(), CliError> {
    let io = |e: std::io::Error| CliError::Io(format!("{}: {e}", p.display()));
    if std::fs::metadata(p).is_ok_and(|m| !m.is_file()) {
        return std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .and_then(|mut f| f.write_all(data))
            .map_err(io);
    }
    let name = p
        .file_name()
        .ok_or_else(|| CliError::Io(format!("{}: not a file name", p.display())))?;
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, p))
        .and_then(|()| std::fs::File::open(dir)?.sync_all());
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn outputs_are_replaced_whole_with_their_mode() {
        let d = std::env::temp_dir().join(format!("agent-cli-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let key = d.join("svid.0.key");
        std::fs::write(&key, b"old").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_mode(&key, b"new key", 0o600).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"new key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the new file has the mode asked for");
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
        assert_eq!(left.len(), 1, "no temp file is left behind");
        // A directory in the way is an error naming the path; nothing is left behind.
        let err = write_mode(&d, b"x", 0o600).unwrap_err().to_string();
        assert!(err.contains(&d.display().to_string()), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
