//! [`DataStore`] over sqlx's `Any` driver: SQLite (default) and PostgreSQL share every query.
//!
//! One file per concept: [`entries`], [`agents`] (and join tokens), [`ca`], [`engines`],
//! [`audit`] (with the audited transaction [`AuditStore::apply`]); the pool, the dialect and
//! [`migrations`] live here.
//!
//! # Durability (SQLite)
//!
//! A kill -9 (or a power cut) at any moment loses no acknowledged write and leaves nothing
//! half-written. Every SQLite connection of the pool runs with:
//!
//! - `journal_mode=WAL`: a commit appends its pages and a commit frame to the `-wal` file; a
//!   torn tail (a transaction cut short) has no valid commit frame and is ignored when the
//!   next connection recovers the log, so a transaction is all or nothing. Readers never block
//!   the single writer, which the group-committed audit log needs.
//! - `synchronous=FULL`: the WAL is fsynced at every commit, before the commit returns, so an
//!   acknowledged write survives an operating-system crash or power loss too, not only the death
//!   of the process (`NORMAL` would already survive kill -9, since the page cache outlives the
//!   process, but could lose the last commits on power loss; the group commit of the audit log
//!   keeps the cost of one fsync per commit small).
//! - `busy_timeout=5s`: a writer waits for the write lock instead of failing at once with
//!   `SQLITE_BUSY` (a CLI reading the file while the server writes, a second pool connection).
//!
//! Every multi-row change that must be atomic is one transaction: entry writes with their
//! revision bump and tombstone, agent compare-and-set writes, Engine key creation, rotation
//! and version-state changes, secrets — each an [`AuditStore::apply`] together with its audit
//! records; the encryption-budget reservation and the bundle sequence bump have their own
//! transactions; a join token is used by one `DELETE ... RETURNING` statement before the agent
//! is recorded (a crash in between burns the token, never lets it be used twice). The CA's
//! switch to its next authority is two single-row writes, retire then activate, so a crash in
//! between leaves a prepared authority the next start activates, never two active ones.
//! PostgreSQL is durable at commit by default (`synchronous_commit=on`) and is left as
//! configured.
//!
//! # PostgreSQL
//!
//! The same SQL runs on both: `$n` placeholders, `BIGINT` for every integer and boolean (0/1),
//! `BYTEA` where SQLite has `BLOB` (the `{BLOB}` of [`migrations`]), `ON CONFLICT` upserts and
//! `RETURNING`. Where the two lock differently the code says so: SQLite takes its single write
//! lock with a first no-op write, PostgreSQL locks rows (`SELECT … FOR UPDATE` on the audit
//! head and on an incarnation being merged) under its default READ COMMITTED isolation; a
//! backup dump reads in one REPEATABLE READ, READ ONLY transaction. Servers starting together
//! on one new database migrate it once, in turn, under an advisory lock. Connections use TLS
//! as the URL's `sslmode` says (rustls). Every test of this module runs on both backends.
//!
//! [`DataStore`]: crate::datastore::DataStore
//! [`AuditStore::apply`]: crate::datastore::AuditStore::apply

use std::path::Path;

use async_trait::async_trait;
use continuity_common::SpiffeId;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::{Applied, BadRows, Canon, ChangeKind, RecordSealer, StoreError, StoreHealth, Write};

mod agents;
mod audit;
pub(super) mod backup;
mod bundles;
mod ca;
mod endorsements;
mod engines;
#[cfg(test)]
mod engines_tests;
mod entries;
mod feed;
mod import_jobs;
mod integrity;
#[cfg(test)]
mod integrity_tests;
mod key_versions;
mod migrations;
mod relationships;
#[cfg(test)]
pub(crate) mod scratch;
mod serving;
#[cfg(test)]
mod tests;

/// SQL datastore (SQLite or PostgreSQL, chosen by the URL).
#[derive(Debug, Clone)]
pub struct SqlDataStore {
    pool: AnyPool,
    sqlite: bool,
    sealer: RecordSealer,
    bad: std::sync::Arc<BadRows>,
    upgraded: Option<u64>,
    /// Written with this process's changes (see [`crate::datastore::ChangeFeed::origin`]).
    origin: String,
    /// Where the change feed's LISTEN connects (PostgreSQL only).
    listen_url: ListenUrl,
}

/// A PostgreSQL URL kept for the LISTEN connection; never printed (it may hold a password).
#[derive(Clone, Default)]
struct ListenUrl(Option<String>);

impl ListenUrl {
    fn get(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl std::fmt::Debug for ListenUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

impl SqlDataStore {
    /// Connects (creating the SQLite file and its directory as needed), migrates the schema,
    /// and seals (once) the rows of a datastore made before record MACs. Rows are sealed and
    /// checked with `sealer`.
    pub async fn connect(url: &str, sealer: RecordSealer) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        // The directory of a SQLite file is private (0700) and refused if another user could
        // have made or changed it; a bare file name lives in the working directory.
        if sqlite
            && let Some(dir) = sqlite_path(url).as_deref().and_then(Path::parent)
            && !dir.as_os_str().is_empty()
        {
            continuity_common::fsperm::secure_dir(dir, 0o700, "datastore directory")
                .map_err(|e| StoreError::Io(e.to_string()))?;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 16 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        for pragma in SQLITE_PRAGMAS {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        if sqlite {
            // Persistent in the file: set once; SQLite answers the mode it is now in.
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode=WAL")
                .fetch_one(&pool)
                .await?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::Io(format!(
                    "{url}: SQLite cannot use write-ahead logging here (journal_mode is {mode}); put the datastore on a local file system"
                )));
            }
        }
        let origin = hex::encode(
            continuity_common::rand::array::<8>().map_err(|e| StoreError::Io(e.to_string()))?,
        );
        let mut store = Self {
            pool,
            sqlite,
            sealer,
            bad: std::sync::Arc::default(),
            upgraded: None,
            origin,
            listen_url: ListenUrl((!sqlite).then(|| url.to_string())),
        };
        store.upgraded = store.migrate(if sqlite { "BLOB" } else { "BYTEA" }).await?;
        Ok(store)
    }
}

/// Run on every new SQLite connection (see the module doc: durability).
const SQLITE_PRAGMAS: [&str; 2] = ["PRAGMA synchronous = FULL", "PRAGMA busy_timeout = 5000"];

/// A MACed table: how to read every row and turn one into its canonical encoding.
pub(crate) struct Table {
    /// The table's name.
    pub(crate) name: &'static str,
    /// Its primary-key columns.
    pub(crate) pk: &'static [&'static str],
    /// Every row of it that is MACed.
    pub(crate) select: &'static str,
    /// Decodes a row and encodes it canonically.
    pub(crate) canon: fn(&AnyRow) -> Result<Canon, StoreError>,
}

fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| path.into())
}

fn json_list<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<Vec<T>, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// The SPIFFE ID in `column` of the row `row` names (e.g. "entry 42"): a stored value that no
/// longer parses is [`StoreError::Corrupt`] naming the row and column, never a panic.
fn id_column(r: &AnyRow, column: &str, row: &str) -> Result<SpiffeId, StoreError> {
    let raw: String = r.try_get(column)?;
    SpiffeId::new(&raw).map_err(|e| StoreError::Corrupt(format!("{row}: {column}: {e}")))
}

/// [`id_column`] for a nullable column.
fn optional_id_column(r: &AnyRow, column: &str, row: &str) -> Result<Option<SpiffeId>, StoreError> {
    let raw: Option<String> = r.try_get(column)?;
    raw.map(|raw| {
        SpiffeId::new(&raw).map_err(|e| StoreError::Corrupt(format!("{row}: {column}: {e}")))
    })
    .transpose()
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

impl SqlDataStore {
    async fn bump(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        name: &str,
    ) -> Result<i64, StoreError> {
        let v: i64 =
            sqlx::query_scalar("UPDATE meta SET value = value + 1 WHERE name = $1 RETURNING value")
                .bind(name)
                .fetch_one(&mut **tx)
                .await?;
        Ok(v)
    }

    async fn meta(&self, name: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT value FROM meta WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?)
    }

    /// The writes of an [`AuditStore::apply`](crate::datastore::AuditStore::apply) transaction,
    /// then their changes for the other servers' feeds (the change counter is locked last, so
    /// it is held as briefly as possible and always after the rows it is about).
    async fn apply_all(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        writes: &[Write],
    ) -> Result<Vec<Applied>, StoreError> {
        let mut out = Vec::with_capacity(writes.len());
        let mut changes: Vec<(ChangeKind, String)> = Vec::new();
        for w in writes {
            let applied = self.apply_one(tx, w).await?;
            if let Some(c) = change_of(w, &applied).filter(|c| !changes.contains(c)) {
                changes.push(c);
            }
            out.push(applied);
        }
        for (kind, key) in &changes {
            self.note_change(tx, *kind, key).await?;
        }
        Ok(out)
    }

    async fn apply_one(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        w: &Write,
    ) -> Result<Applied, StoreError> {
        Ok(match w {
            Write::CreateEntry(e) => {
                Applied::Entry(self.create_entry_tx(tx, e.clone()).await?, None)
            }
            Write::UpdateEntry(e) => {
                let (e, t) = self.update_entry_tx(tx, e.clone()).await?;
                Applied::Entry(e, t)
            }
            Write::DeleteEntry(id) => {
                let (e, t) = self.delete_entry_tx(tx, id).await?;
                Applied::Entry(e, Some(t))
            }
            Write::CreateJoinToken(t) => {
                self.create_join_token_on(tx, t).await?;
                Applied::Done
            }
            Write::InsertAgent(a) => Applied::Agent(self.insert_agent_on(tx, a).await?),
            Write::UpdateAgent(a) => Applied::Agent(self.update_agent_on(tx, a).await?),
            Write::BanAgent(id) => Applied::Agent(self.ban_agent_on(tx, id).await?),
            Write::DeleteAgent(id) => {
                Self::delete_agent_on(tx, id).await?;
                Applied::Done
            }
            Write::PutEngine(_)
            | Write::PutEngineKey(_)
            | Write::PutKeyVersion(_)
            | Write::InsertKeyVersion(_)
            | Write::PutSecret(_)
            | Write::InsertEndorsement(_)
            | Write::PutImportJob(_) => {
                self.apply_engine_on(tx, w).await?;
                Applied::Done
            }
            Write::PutForeignBundle(..)
            | Write::DeleteForeignBundle(_)
            | Write::PutRelationship(..)
            | Write::DeleteRelationship(_) => {
                self.apply_federation_on(tx, w).await?;
                Applied::Done
            }
        })
    }

    /// Applies an Engine write (Engines, keys, versions, secrets, endorsements, import jobs)
    /// in `tx`; others are not the Engines'.
    async fn apply_engine_on(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        w: &Write,
    ) -> Result<(), StoreError> {
        match w {
            Write::PutEngine(e) => self.put_engine_on(tx, e).await,
            Write::PutEngineKey(k) => self.put_engine_key_on(tx, k).await,
            Write::PutKeyVersion(v) => self.put_key_version_on(tx, v, false).await,
            Write::InsertKeyVersion(v) => self.put_key_version_on(tx, v, true).await,
            Write::PutSecret(sec) => self.put_secret_on(tx, sec).await,
            Write::InsertEndorsement(e) => self.insert_endorsement_on(tx, e).await,
            Write::PutImportJob(j) => self.put_import_job_on(tx, j).await,
            _ => Ok(()),
        }
    }
}

/// The change a write makes for the other servers (None: nothing they hold in memory).
fn change_of(w: &Write, applied: &Applied) -> Option<(ChangeKind, String)> {
    Some(match (w, applied) {
        (Write::CreateEntry(_) | Write::UpdateEntry(_), Applied::Entry(e, _)) => {
            (ChangeKind::Entry, e.id.clone())
        }
        (Write::DeleteEntry(id), _) => (ChangeKind::Entry, id.clone()),
        (Write::InsertAgent(a) | Write::UpdateAgent(a), _) => {
            (ChangeKind::Agent, a.spiffe_id.to_string())
        }
        (Write::BanAgent(id) | Write::DeleteAgent(id), _) => (ChangeKind::Agent, id.clone()),
        (Write::PutEngine(e), _) => (ChangeKind::Engine, e.name.clone()),
        (Write::PutEngineKey(k), _) => (ChangeKind::Engine, k.engine.clone()),
        (Write::PutKeyVersion(v) | Write::InsertKeyVersion(v), _) => {
            (ChangeKind::Engine, v.engine.clone())
        }
        (Write::PutSecret(s), _) => (ChangeKind::Engine, s.engine.clone()),
        (Write::PutForeignBundle(b, _), _) => {
            (ChangeKind::ForeignBundle, b.trust_domain.name().to_string())
        }
        (Write::DeleteForeignBundle(td) | Write::DeleteRelationship(td), _) => {
            (ChangeKind::ForeignBundle, td.clone())
        }
        (Write::PutRelationship(r, _), _) => {
            (ChangeKind::ForeignBundle, r.trust_domain.name().to_string())
        }
        (Write::InsertEndorsement(e), _) => (ChangeKind::Engine, e.engine.clone()),
        // Import jobs are read from the datastore on each use: nothing held in memory.
        (
            Write::CreateJoinToken(_)
            | Write::CreateEntry(_)
            | Write::UpdateEntry(_)
            | Write::PutImportJob(_),
            _,
        ) => {
            return None;
        }
    })
}

fn parse<T: std::str::FromStr<Err = String>>(s: String) -> Result<T, StoreError> {
    s.parse().map_err(StoreError::Corrupt)
}

/// The record sealer of unit tests: a fixed software key.
#[cfg(test)]
pub(crate) fn test_sealer() -> RecordSealer {
    RecordSealer::new(std::sync::Arc::new(crate::keys::SoftwareMac::new(&[5; 32])))
}

/// A throwaway SQLite datastore for unit tests: a fresh directory under the system temp dir
/// named after `what` (remove it when done), the store's URL, and the store.
#[cfg(test)]
pub(crate) async fn scratch_sqlite(what: &str) -> (std::path::PathBuf, String, SqlDataStore) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "continuity-{what}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let url = format!("sqlite://{}?mode=rwc", dir.join("ds.sqlite3").display());
    let store = SqlDataStore::connect(&url, test_sealer())
        .await
        .unwrap_or_else(|e| panic!("scratch datastore {url}: {e}"));
    (dir, url, store)
}

#[async_trait]
impl StoreHealth for SqlDataStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod durability_tests {
    /// Every connection of the pool (not only the first) commits durably: WAL, fsync at each
    /// commit, and waits for the write lock.
    #[tokio::test]
    async fn sqlite_connections_are_durable() {
        let (dir, _url, store) = super::scratch_sqlite("durability").await;
        let mut conns = Vec::new();
        for _ in 0..4 {
            conns.push(store.pool.acquire().await.unwrap());
        }
        for c in &mut conns {
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(&mut **c)
                .await
                .unwrap();
            assert_eq!(mode, "wal");
            let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&mut **c)
                .await
                .unwrap();
            assert_eq!(sync, 2, "synchronous=FULL");
            let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
                .fetch_one(&mut **c)
                .await
                .unwrap();
            assert_eq!(busy, 5000);
        }
        drop(conns);
        let _ = std::fs::remove_dir_all(dir);
    }
}
