//! [`DataStore`] over sqlx's `Any` driver: SQLite (default) and PostgreSQL share every query.
//!
//! One file per concept: [`entries`], [`agents`] (and join tokens), [`ca`], [`engines`],
//! [`audit`] (with the audited transaction [`AuditStore::apply`]); the pool, the dialect and
//! [`migrations`] live here.
//!
//! [`DataStore`]: crate::datastore::DataStore
//! [`AuditStore::apply`]: crate::datastore::AuditStore::apply

use std::path::Path;

use async_trait::async_trait;
use continuity_common::SpiffeId;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::{Applied, StoreError, StoreHealth, Write};

mod agents;
mod audit;
pub(super) mod backup;
mod ca;
mod engines;
mod entries;
mod migrations;
#[cfg(test)]
mod tests;

/// SQL datastore (SQLite or PostgreSQL, chosen by the URL).
#[derive(Debug, Clone)]
pub struct SqlDataStore {
    pool: AnyPool,
    sqlite: bool,
}

impl SqlDataStore {
    /// Connects (creating the SQLite file and its directory as needed) and migrates the schema.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
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
            .connect(url)
            .await?;
        if sqlite {
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
        }
        let store = Self { pool, sqlite };
        store.migrate(if sqlite { "BLOB" } else { "BYTEA" }).await?;
        Ok(store)
    }
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

    /// One write of an [`AuditStore::apply`](crate::datastore::AuditStore::apply) transaction.
    async fn apply_tx(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        w: &Write,
    ) -> Result<Applied, StoreError> {
        Ok(match w {
            Write::CreateEntry(e) => {
                Applied::Entry(Self::create_entry_tx(tx, e.clone()).await?, None)
            }
            Write::UpdateEntry(e) => {
                let (e, t) = Self::update_entry_tx(tx, e.clone()).await?;
                Applied::Entry(e, t)
            }
            Write::DeleteEntry(id) => {
                let (e, t) = Self::delete_entry_tx(tx, id).await?;
                Applied::Entry(e, Some(t))
            }
            Write::CreateJoinToken(t) => {
                Self::create_join_token_on(tx, t).await?;
                Applied::Done
            }
            Write::InsertAgent(a) => Applied::Agent(Self::insert_agent_on(tx, a).await?),
            Write::UpdateAgent(a) => Applied::Agent(Self::update_agent_on(tx, a).await?),
            Write::BanAgent(id) => Applied::Agent(Self::ban_agent_on(tx, id).await?),
            Write::DeleteAgent(id) => {
                Self::delete_agent_on(tx, id).await?;
                Applied::Done
            }
            Write::PutEngine(e) => {
                Self::put_engine_on(tx, e).await?;
                Applied::Done
            }
            Write::PutEngineKey(k) => {
                Self::put_engine_key_on(tx, k).await?;
                Applied::Done
            }
            Write::PutKeyVersion(v) => {
                Self::put_key_version_on(tx, v).await?;
                Applied::Done
            }
            Write::PutSecret(sec) => {
                Self::put_secret_on(tx, sec).await?;
                Applied::Done
            }
        })
    }
}

fn parse<T: std::str::FromStr<Err = String>>(s: String) -> Result<T, StoreError> {
    s.parse().map_err(StoreError::Corrupt)
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
    let store = SqlDataStore::connect(&url)
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
