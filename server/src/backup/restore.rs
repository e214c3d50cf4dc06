//! `continuity-server backup restore FILE --config server.toml`: offline, into an empty
//! data_dir. The file's checksum (and passphrase HMAC) is verified before anything is
//! written; the key files are restored (disk) or looked up in the token (pkcs11); every
//! table is loaded in one transaction; the audit chain is verified on the result, and a
//! restore that does not verify is removed again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use continuity_common::SystemClock;
use continuity_common::fsperm::secure_dir;

use super::service::{is_key_file, kind};
use super::{Backup, BackupError, decode};
use crate::config::Config;
use crate::datastore::SqlDataStore;
use crate::keys::config::KeyManagerConfig;

/// What a restore put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Tables loaded.
    pub tables: usize,
    /// Rows loaded.
    pub rows: usize,
    /// Key files written (disk key manager).
    pub key_files: usize,
    /// Token keys found (pkcs11 key manager).
    pub hsm_keys: usize,
}

/// The SQLite file of a `sqlite:` URL, if any.
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| path.into())
}

/// Refuses a data_dir (or key directory, or SQLite file outside them) that holds anything.
fn check_empty(cfg: &Config) -> Result<(), BackupError> {
    let mut dirs = vec![cfg.data_dir.clone()];
    if let KeyManagerConfig::Disk { dir } = &cfg.key_manager {
        dirs.push(dir.clone());
    }
    for d in dirs {
        match std::fs::read_dir(&d) {
            Ok(mut entries) => {
                if let Some(Ok(e)) = entries.next() {
                    return Err(BackupError::new(format!(
                        "{} is not empty (it holds {}): a backup is restored only into an empty data_dir; move it away or point data_dir elsewhere",
                        d.display(),
                        e.file_name().to_string_lossy()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BackupError::new(format!("{}: {e}", d.display()))),
        }
    }
    if let Some(f) = sqlite_file(&cfg.datastore_url).filter(|f| f.exists()) {
        return Err(BackupError::new(format!(
            "the datastore {} already exists: a backup is restored only into an empty one",
            f.display()
        )));
    }
    Ok(())
}

/// Checks the backup fits this server's configuration.
fn check_fits(cfg: &Config, b: &Backup) -> Result<(), BackupError> {
    if b.header.trust_domain != cfg.trust_domain.to_string() {
        return Err(BackupError::new(format!(
            "the backup is of trust domain {}, the config says {}",
            b.header.trust_domain, cfg.trust_domain
        )));
    }
    let have = kind(&cfg.key_manager);
    if b.header.key_manager != "memory" && b.header.key_manager != have {
        return Err(BackupError::new(format!(
            "the backup was made with the {} key manager, the config uses {have}: its keys cannot move",
            b.header.key_manager
        )));
    }
    Ok(())
}

/// Restores `bytes` (a backup file) for the server configured by `cfg`.
pub async fn restore(
    cfg: &Config,
    bytes: &[u8],
    passphrase: Option<Vec<u8>>,
) -> Result<Restored, BackupError> {
    check_empty(cfg)?;
    let bytes = bytes.to_vec();
    let (backup, keys) = tokio::task::spawn_blocking(move || decode(&bytes, passphrase.as_deref()))
        .await
        .map_err(|e| BackupError::new(e.to_string()))??;
    check_fits(cfg, &backup)?;
    // One key manager for the whole restore (a PKCS#11 module is initialized once per process).
    let km = crate::keys::from_config(&cfg.key_manager)
        .map_err(|e| BackupError::new(format!("cannot open the key manager: {e}")))?;
    let hsm_keys = check_token(cfg, &*km, &backup).await?;
    let result = async {
        let key_files = match (&cfg.key_manager, &backup.sealed_keys, &keys) {
            (KeyManagerConfig::Disk { dir }, Some(sealed), Some(k)) => {
                write_key_files(dir, &k.open_files(sealed)?)?
            }
            (KeyManagerConfig::Disk { .. }, None, _) if backup.header.key_manager == "disk" => {
                return Err(BackupError::new("the backup holds no key files"));
            }
            _ => 0,
        };
        // The rows keep their record MACs: the key comes back with the key files (disk) or
        // never left the token (pkcs11).
        let sealer = crate::integrity::sealer(&*km)
            .await
            .map_err(|e| BackupError::new(format!("cannot open the record MAC key: {e}")))?;
        let rows = load(cfg, &km, sealer, &backup).await?;
        Ok(Restored {
            tables: backup.tables.len(),
            rows,
            key_files,
            hsm_keys,
        })
    }
    .await;
    if result.is_err() {
        undo(cfg);
    }
    result
}

/// Checks that every token key the backup names is in the configured token; returns how many.
async fn check_token(
    cfg: &Config,
    km: &dyn crate::keys::KeyManager,
    b: &Backup,
) -> Result<usize, BackupError> {
    if !matches!(cfg.key_manager, KeyManagerConfig::Pkcs11 { .. }) || b.hsm_labels.is_empty() {
        return Ok(0);
    }
    let mut missing = Vec::new();
    for label in &b.hsm_labels {
        // A signing key pair, or an AES key (HSM-custody encryption keys).
        let found = match km.get(label).await {
            Ok(Some(_)) => true,
            Ok(None) => matches!(km.get_aes(label).await, Ok(Some(_))),
            Err(e) => return Err(BackupError::new(format!("token key {label}: {e}"))),
        };
        if !found {
            missing.push(label.clone());
        }
    }
    if !missing.is_empty() {
        return Err(BackupError::new(format!(
            "the token lacks {} key(s) the backup refers to: {}",
            missing.len(),
            missing.join(", ")
        )));
    }
    Ok(b.hsm_labels.len())
}

fn write_key_files(
    dir: &Path,
    files: &[(String, continuity_common::secret::Zeroizing<Vec<u8>>)],
) -> Result<usize, BackupError> {
    let d = secure_dir(dir, 0o700, "key directory").map_err(|e| BackupError::new(e.to_string()))?;
    for (name, content) in files {
        if !is_key_file(name) {
            return Err(BackupError::new(format!(
                "the backup holds a key file named {name:?}, which is not a key file name"
            )));
        }
        d.write_atomic(name, 0o600, |f| std::io::Write::write_all(f, content))
            .map_err(|e| BackupError::new(e.to_string()))?;
    }
    Ok(files.len())
}

/// Loads every table and verifies the audit chain of the result; returns the rows loaded.
async fn load(
    cfg: &Config,
    km: &Arc<dyn crate::keys::KeyManager>,
    sealer: crate::datastore::RecordSealer,
    b: &Backup,
) -> Result<usize, BackupError> {
    let store_err = |e: crate::datastore::StoreError| BackupError::new(e.to_string());
    secure_dir(&cfg.data_dir, 0o700, "data_dir").map_err(|e| BackupError::new(e.to_string()))?;
    let store = SqlDataStore::connect(&cfg.datastore_url, sealer)
        .await
        .map_err(store_err)?;
    let version = store.schema_version().await.map_err(store_err)?;
    if version != b.header.schema_version {
        return Err(BackupError::new(format!(
            "the backup has schema version {}, this server {version}: restore it with the server version that made it",
            b.header.schema_version
        )));
    }
    let busy = store.non_empty_tables().await.map_err(store_err)?;
    if !busy.is_empty() {
        return Err(BackupError::new(format!(
            "the datastore is not empty (tables {} hold rows): a backup is restored only into an empty one",
            busy.join(", ")
        )));
    }
    store.load(&b.tables).await.map_err(store_err)?;
    // Keyed with the restored (or token-held) audit-mac key; the first checkpoint of the
    // new data_dir anchors the restored head.
    let audit = crate::audit::Audit::open(
        &cfg.data_dir,
        km,
        Arc::new(store.clone()),
        Arc::new(SystemClock),
    )
    .await
    .map_err(|e| BackupError::new(format!("the restored audit log cannot be opened: {e}")))?;
    let v = audit.verify(&[]).await.map_err(store_err)?;
    if let Some(f) = v.findings.first() {
        return Err(BackupError::new(format!(
            "the restored audit log does not verify ({} finding(s), first at record {}: {}); the restore was undone",
            v.findings.len(),
            f.seq,
            f.detail
        )));
    }
    Ok(b.tables.iter().map(|t| t.rows.len()).sum())
}

/// Removes what a failed restore wrote (data_dir was empty before it started).
fn undo(cfg: &Config) {
    for d in [
        Some(cfg.data_dir.clone()),
        match &cfg.key_manager {
            KeyManagerConfig::Disk { dir } => Some(dir.clone()),
            _ => None,
        },
    ]
    .into_iter()
    .flatten()
    {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    }
    if let Some(f) = sqlite_file(&cfg.datastore_url) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", f.display()));
        }
    }
}
