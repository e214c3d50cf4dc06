//! `backup create FILE` (from the running server, over the admin socket) and `backup restore
//! FILE --config server.toml` (offline, into an empty data_dir).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use continuity_proto::admin::CreateBackupRequest;
use continuity_proto::admin::backup_admin_client::BackupAdminClient;
use tonic::transport::Channel;

use super::{CliError, output};
use crate::Config;

/// `backup` subcommands.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Write a consistent snapshot of the running server to FILE (0600, written atomically).
    Create {
        /// The backup file to write.
        file: PathBuf,
        /// File holding the passphrase that seals the key manager's keys (required with the
        /// disk key manager; trailing newline ignored).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Restore FILE into the empty data_dir of server.toml (the server must not be running).
    Restore {
        /// The backup file.
        file: PathBuf,
        /// Path to server.toml of the server to restore.
        #[arg(long)]
        config: PathBuf,
        /// File holding the backup's passphrase.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
}

fn arg(m: impl Into<String>) -> CliError {
    CliError::Argument(m.into())
}

/// The passphrase in `path` (one trailing newline removed; an empty one is refused).
fn passphrase(path: Option<&Path>) -> Result<Option<Vec<u8>>, CliError> {
    let Some(path) = path else {
        return Ok(None);
    };
    let mut p = std::fs::read(path)
        .map_err(|e| arg(format!("--passphrase-file {}: {e}", path.display())))?;
    if p.ends_with(b"\n") {
        p.pop();
        if p.ends_with(b"\r") {
            p.pop();
        }
    }
    if p.is_empty() {
        return Err(arg(format!(
            "--passphrase-file {} is empty",
            path.display()
        )));
    }
    Ok(Some(p))
}

/// Writes `bytes` to `path` atomically with mode 0600 (temp file, fsync, rename, fsync dir).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |what: &str, e: std::io::Error| arg(format!("cannot {what} {}: {e}", path.display()));
    let name = path
        .file_name()
        .ok_or_else(|| arg(format!("{} is not a file name", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("create a temp file next to", e))?;
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| std::fs::File::open(&dir)?.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("write", e));
    }
    Ok(())
}

/// `backup create`.
pub async fn create(
    ch: Channel,
    file: &Path,
    passphrase_file: Option<&Path>,
) -> Result<(), CliError> {
    let passphrase = passphrase(passphrase_file)?.unwrap_or_default();
    let mut stream = BackupAdminClient::new(ch)
        .create_backup(CreateBackupRequest { passphrase })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        bytes.extend_from_slice(&chunk.data);
    }
    write_atomic(file, &bytes)?;
    output::say(format!(
        "Backup written to {} ({} bytes).",
        file.display(),
        bytes.len()
    ))
}

/// `backup restore`.
pub async fn restore(
    file: &Path,
    config: &Path,
    passphrase_file: Option<&Path>,
) -> Result<(), CliError> {
    let cfg = Config::load(config).map_err(|e| arg(format!("{}: {e}", config.display())))?;
    let pass = passphrase(passphrase_file)?;
    let bytes = std::fs::read(file).map_err(|e| arg(format!("{}: {e}", file.display())))?;
    let r = crate::backup::restore::restore(&cfg, &bytes, pass)
        .await
        .map_err(|e| arg(format!("{}: {e}", file.display())))?;
    output::say(format!(
        "Restored {} tables ({} rows), {} key files{} into {}.",
        r.tables,
        r.rows,
        r.key_files,
        if r.hsm_keys > 0 {
            format!(" ({} token keys present)", r.hsm_keys)
        } else {
            String::new()
        },
        cfg.data_dir.display()
    ))
}
