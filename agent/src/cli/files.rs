//! Reading inputs and writing outputs named on the command line.

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
    std::fs::write(p, data).map_err(|e| CliError::Io(format!("{}: {e}", p.display())))
}

/// Creates or truncates `p` with `mode` (0600 for private material) and writes `data`.
pub fn write_mode(p: &Path, data: &[u8], mode: u32) -> Result<(), CliError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(p)
        .map_err(|e| CliError::Io(format!("{}: {e}", p.display())))?;
    f.write_all(data)
        .map_err(|e| CliError::Io(format!("{}: {e}", p.display())))
}
