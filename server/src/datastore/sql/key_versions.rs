//! Key versions and their encryption reservations, record-MACed. A write that keeps stored
//! columns (the reservations) reads and checks the row first, so no tampered column is ever
//! re-sealed.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{SqlDataStore, Table, parse};
use crate::datastore::{Canon, StoreError};
use crate::model::engine::KeyVersion;

/// The key versions as the record-MAC upgrade (migration 5) seals them: before migration 13
/// added `imported` (so none were; the canonical encoding then omits it).
pub(super) const KEY_VERSIONS_AT_RECORD_MACS: Table = Table {
    select: "SELECT engine, key_name, version, state, kid, public_key, sealed, mechanism, hsm_id, created_at, destroy_at, encryptions_reserved, mac FROM engine_key_versions",
    ..KEY_VERSIONS
};

/// The key versions, MACed (state, sealed material, hsm_id, destroy_at, reservations and
/// whether the material was imported).
pub(super) const KEY_VERSIONS: Table = Table {
    name: "engine_key_versions",
    pk: &["engine", "key_name", "version"],
    select: "SELECT engine, key_name, version, state, kid, public_key, sealed, mechanism, hsm_id, created_at, destroy_at, encryptions_reserved, imported, mac FROM engine_key_versions",
    canon: |r| key_version_from_row(r).map(|v| key_version_canon(&v)),
};

/// The canonical encoding of a key version row (every column). `imported` (added later) is
/// encoded only when set, so rows sealed before it existed still verify.
fn key_version_canon(v: &KeyVersion) -> Canon {
    let c = Canon::new("engine_key_versions")
        .key(&v.engine)
        .key(&v.key)
        .key_int(i64::from(v.version))
        .text(v.state.as_str())
        .text(&v.kid)
        .bytes(&v.public_key)
        .opt_bytes(v.sealed.as_deref())
        .text(&v.mechanism)
        .text(&v.hsm_id)
        .int(v.created_at)
        .int(v.destroy_at)
        .int(i64::try_from(v.encryptions).unwrap_or(i64::MAX));
    if v.imported { c.int(1) } else { c }
}

fn key_version_from_row(r: &AnyRow) -> Result<KeyVersion, StoreError> {
    Ok(KeyVersion {
        engine: r.try_get("engine")?,
        key: r.try_get("key_name")?,
        version: r.try_get::<i64, _>("version")? as u32,
        state: parse(r.try_get::<String, _>("state")?)?,
        kid: r.try_get("kid")?,
        public_key: r.try_get("public_key")?,
        sealed: r.try_get("sealed")?,
        mechanism: r.try_get("mechanism")?,
        hsm_id: r.try_get("hsm_id")?,
        created_at: r.try_get("created_at")?,
        destroy_at: r.try_get("destroy_at")?,
        encryptions: r.try_get::<i64, _>("encryptions_reserved")?.max(0) as u64,
        // Absent when migration 5 reads the rows (before migration 13 added it).
        imported: match r.try_get::<i64, _>("imported") {
            Ok(v) => v != 0,
            Err(sqlx::Error::ColumnNotFound(_)) => false,
            Err(e) => return Err(e.into()),
        },
    })
}

impl SqlDataStore {
    /// Inserts or replaces a key version (`insert_only`: a version that exists is a
    /// [`StoreError::Conflict`], so two servers rotating one key at once cannot both make the
    /// same version). Its encryption reservations stay as stored (they only grow, through
    /// [`crate::datastore::EngineStore::reserve_encryptions`]), read from the row checked.
    pub(super) async fn put_key_version_on(
        &self,
        c: &mut AnyConnection,
        v: &KeyVersion,
        insert_only: bool,
    ) -> Result<(), StoreError> {
        let stored = sqlx::query(
            "SELECT engine, key_name, version, state, kid, public_key, sealed, mechanism, hsm_id, created_at, destroy_at, encryptions_reserved, imported, mac FROM engine_key_versions WHERE engine = $1 AND key_name = $2 AND version = $3",
        )
        .bind(&v.engine)
        .bind(&v.key)
        .bind(v.version as i64)
        .fetch_optional(&mut *c)
        .await?;
        let encryptions = match stored {
            Some(_) if insert_only => {
                return Err(StoreError::Conflict(format!(
                    "version {} of key {}/{}",
                    v.version, v.engine, v.key
                )));
            }
            Some(r) => {
                self.checked(&r, key_version_from_row, key_version_canon)?
                    .encryptions
            }
            None => 0,
        };
        let v = KeyVersion {
            encryptions,
            ..v.clone()
        };
        let mac = self.seal(&key_version_canon(&v))?;
        sqlx::query(
            "INSERT INTO engine_key_versions (engine, key_name, version, state, kid, public_key, sealed, mechanism, hsm_id, created_at, destroy_at, encryptions_reserved, mac, imported)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
             ON CONFLICT (engine, key_name, version) DO UPDATE SET state = $4, kid = $5, public_key = $6, sealed = $7,
             mechanism = $8, hsm_id = $9, created_at = $10, destroy_at = $11, encryptions_reserved = $12, mac = $13, imported = $14",
        )
        .bind(&v.engine)
        .bind(&v.key)
        .bind(v.version as i64)
        .bind(v.state.as_str())
        .bind(&v.kid)
        .bind(v.public_key.clone())
        .bind(v.sealed.clone())
        .bind(&v.mechanism)
        .bind(&v.hsm_id)
        .bind(v.created_at)
        .bind(v.destroy_at)
        .bind(i64::try_from(encryptions).unwrap_or(i64::MAX))
        .bind(mac)
        .bind(i64::from(v.imported))
        .execute(&mut *c)
        .await?;
        Ok(())
    }

    /// Every intact key version (a row whose MAC fails is left out and reported).
    pub(super) async fn list_key_versions_all(&self) -> Result<Vec<KeyVersion>, StoreError> {
        let rows =
            sqlx::query("SELECT engine, key_name, version, state, kid, public_key, sealed, mechanism, hsm_id, created_at, destroy_at, encryptions_reserved, imported, mac FROM engine_key_versions ORDER BY engine, key_name, version")
                .fetch_all(&self.pool)
                .await?;
        self.screen(&rows, key_version_from_row, key_version_canon)
    }

    /// [`crate::datastore::EngineStore::reserve_encryptions`]: the increment and the re-sealed row in one
    /// transaction, the row checked for the count before it.
    pub(super) async fn reserve_encryptions_on(
        &self,
        engine: &str,
        key: &str,
        version: u32,
        block: u64,
    ) -> Result<u64, StoreError> {
        let block = i64::try_from(block)
            .map_err(|_| StoreError::Corrupt(format!("encryption block {block} too large")))?;
        let mut tx = self.pool.begin().await?;
        // The increment first (it takes SQLite's write lock), then the row: its MAC must hold
        // for the count before the increment, and is then sealed for the new count.
        let updated = sqlx::query(
            "UPDATE engine_key_versions SET encryptions_reserved = encryptions_reserved + $1
             WHERE engine = $2 AND key_name = $3 AND version = $4",
        )
        .bind(block)
        .bind(engine)
        .bind(key)
        .bind(version as i64)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(StoreError::NotFound(format!(
                "version {version} of {engine}/{key}"
            )));
        }
        let row = sqlx::query(
            "SELECT engine, key_name, version, state, kid, public_key, sealed, mechanism, hsm_id, created_at, destroy_at, encryptions_reserved, imported, mac FROM engine_key_versions WHERE engine = $1 AND key_name = $2 AND version = $3",
        )
        .bind(engine)
        .bind(key)
        .bind(version as i64)
        .fetch_one(&mut *tx)
        .await?;
        let before = |r: &AnyRow| {
            let mut v = key_version_from_row(r)?;
            v.encryptions = v.encryptions.saturating_sub(block as u64);
            Ok(v)
        };
        let mut v = self.checked(&row, before, key_version_canon)?;
        v.encryptions += block as u64;
        sqlx::query(
            "UPDATE engine_key_versions SET mac = $1 WHERE engine = $2 AND key_name = $3 AND version = $4",
        )
        .bind(self.seal(&key_version_canon(&v))?)
        .bind(engine)
        .bind(key)
        .bind(version as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(v.encryptions)
    }
}
