//! `BackupAdmin` on the admin socket: verifies the audit chain, snapshots every table in one
//! read transaction, adds the key manager's part, and streams the file to the CLI.

use std::path::Path;
use std::pin::Pin;

use continuity_proto::admin::backup_admin_server::{BackupAdmin, BackupAdminServer};
use continuity_proto::admin::{BackupChunk, CreateBackupRequest};
use futures_util::Stream;
use tonic::{Request, Response, Status};

use super::{Backup, BackupError, FORMAT, Header, PassphraseKeys, VERSION, encode, new_kdf};
use crate::api::admin::AdminService;
use crate::config::Config;
use crate::datastore::{SqlDataStore, TableDump};
use crate::keys::config::KeyManagerConfig;

/// Bytes per streamed chunk.
const CHUNK: usize = 1024 * 1024;

/// Key files of the disk key manager that go into a backup (sealed).
const KEY_FILE_EXTENSIONS: [&str; 3] = ["key", "kek", "mac"];

/// The backup service.
#[derive(Clone)]
pub struct BackupService {
    admin: AdminService,
    datastore_url: String,
    /// The running server's record sealer (the snapshot reads rows as stored, MACs included).
    sealer: crate::datastore::RecordSealer,
    key_manager: KeyManagerConfig,
    trust_domain: String,
}

impl BackupService {
    /// The service for the server configured by `cfg`, authorizing callers like `admin`.
    pub fn server(
        cfg: &Config,
        admin: AdminService,
        sealer: crate::datastore::RecordSealer,
    ) -> BackupAdminServer<Self> {
        BackupAdminServer::new(Self {
            admin,
            datastore_url: cfg.datastore_url.clone(),
            sealer,
            key_manager: cfg.key_manager.clone(),
            trust_domain: cfg.trust_domain.to_string(),
        })
    }

    /// Verifies the audit chain, then snapshots every table: (schema version, tables).
    async fn snapshot(&self) -> Result<(i64, Vec<TableDump>), Status> {
        let v = self
            .admin
            .engines
            .audit()
            .verify(&[])
            .await
            .map_err(|e| Status::unavailable(format!("cannot read the audit log: {e}")))?;
        if let Some(f) = v.findings.first() {
            return Err(Status::failed_precondition(format!(
                "the audit log does not verify ({} finding(s), first at record {}: {}); no backup was made",
                v.findings.len(),
                f.seq,
                f.detail
            )));
        }
        let unavailable = |e: crate::datastore::StoreError| Status::unavailable(e.to_string());
        let store = SqlDataStore::connect(&self.datastore_url, self.sealer.clone())
            .await
            .map_err(unavailable)?;
        let schema_version = store.schema_version().await.map_err(unavailable)?;
        Ok((schema_version, store.dump().await.map_err(unavailable)?))
    }

    /// Builds the whole file.
    async fn build(&self, passphrase: Vec<u8>) -> Result<Vec<u8>, Status> {
        let disk = matches!(self.key_manager, KeyManagerConfig::Disk { .. });
        if disk && passphrase.is_empty() {
            return Err(Status::invalid_argument(
                "the disk key manager's keys go into a backup only sealed under a passphrase: give --passphrase-file",
            ));
        }
        let (schema_version, tables) = self.snapshot().await?;
        let kdf = if passphrase.is_empty() {
            None
        } else {
            Some(new_kdf().map_err(internal)?)
        };
        let keys = match kdf.clone() {
            Some(k) => Some(
                tokio::task::spawn_blocking(move || PassphraseKeys::derive(&passphrase, &k))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(internal)?,
            ),
            None => None,
        };
        // Key files are read after the snapshot: every key its rows name already exists.
        let sealed_keys = match (&self.key_manager, &keys) {
            (KeyManagerConfig::Disk { dir }, Some(k)) => Some(
                k.seal_files(&key_files(dir).map_err(internal)?)
                    .map_err(internal)?,
            ),
            _ => None,
        };
        let hsm_labels = match self.key_manager {
            KeyManagerConfig::Pkcs11 { .. } => hsm_labels(&tables),
            _ => Vec::new(),
        };
        let header = Header {
            format: FORMAT.into(),
            version: VERSION,
            created_at: self.admin.clock.unix(),
            trust_domain: self.trust_domain.clone(),
            key_manager: kind(&self.key_manager).into(),
            schema_version,
            kdf,
        };
        let backup = Backup {
            header,
            tables,
            sealed_keys,
            hsm_labels,
        };
        Ok(encode(&backup, keys.as_ref()))
    }
}

fn internal(e: BackupError) -> Status {
    Status::internal(e.0)
}

/// The name of a key manager kind.
pub fn kind(k: &KeyManagerConfig) -> &'static str {
    match k {
        KeyManagerConfig::Memory => "memory",
        KeyManagerConfig::Disk { .. } => "disk",
        KeyManagerConfig::Pkcs11 { .. } => "pkcs11",
    }
}

/// Whether `name` is a key file of the disk key manager (not a temp file).
pub fn is_key_file(name: &str) -> bool {
    !name.starts_with('.')
        && !name.contains('/')
        && name
            .rsplit_once('.')
            .is_some_and(|(stem, ext)| !stem.is_empty() && KEY_FILE_EXTENSIONS.contains(&ext))
}

/// The disk key manager's key files: (name, content).
fn key_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, BackupError> {
    let io = |e: std::io::Error| BackupError::new(format!("key directory {}: {e}", dir.display()));
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io)? {
        let e = e.map_err(io)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().map_err(io)?.is_file() && is_key_file(&name) {
            out.push((name, std::fs::read(e.path()).map_err(io)?));
        }
    }
    out.sort();
    Ok(out)
}

/// The token key labels the rows refer to: CA keys and HSM-custody Engine key versions.
fn hsm_labels(tables: &[TableDump]) -> Vec<String> {
    let mut out = Vec::new();
    for (table, column) in [("ca_keys", "key_id"), ("engine_key_versions", "hsm_id")] {
        let Some(t) = tables.iter().find(|t| t.name == table) else {
            continue;
        };
        let Some(i) = t.columns.iter().position(|(c, _)| c == column) else {
            continue;
        };
        // A destroyed version's token object is gone on purpose.
        let state = t.columns.iter().position(|(c, _)| c == "state");
        out.extend(
            t.rows
                .iter()
                .filter(|r| state.is_none_or(|s| r[s].as_str() != Some("DESTROYED")))
                .filter_map(|r| r[i].as_str())
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
    }
    out.sort();
    out.dedup();
    out
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<BackupChunk, Status>> + Send>>;

#[tonic::async_trait]
impl BackupAdmin for BackupService {
    type CreateBackupStream = ChunkStream;

    async fn create_backup(
        &self,
        req: Request<CreateBackupRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let actor = self.admin.authorize(&req)?;
        let bytes = self.build(req.into_inner().passphrase).await?;
        if let Err(e) = self
            .admin
            .engines
            .audit()
            .record(&actor, "backup.create", "datastore", 0, "ok")
            .await
        {
            tracing::warn!(error = %e, "cannot audit a backup");
        }
        tracing::info!(bytes = bytes.len(), "backup created");
        let chunks: Vec<Result<BackupChunk, Status>> = bytes
            .chunks(CHUNK)
            .map(|c| Ok(BackupChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}
