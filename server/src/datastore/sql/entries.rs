//! Registration entries and their tombstones.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{SqlDataStore, Table, id_column, json_list, to_json};
use crate::datastore::{Canon, Entry, EntryStore, StoreError, Tombstone};

/// The entries table, MACed.
pub(super) const ENTRIES: Table = Table {
    name: "entries",
    pk: &["id"],
    select: "SELECT id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, hint, admin, engine, federates_with, revision, created_at, mac FROM entries",
    canon: |r| entry_from_row(r).map(|e| entry_canon(&e)),
};

/// The entry tombstones, MACed.
pub(super) const TOMBSTONES: Table = Table {
    name: "entry_tombstones",
    pk: &["entry_id", "revision"],
    select: "SELECT entry_id, parent_id, revision, mac FROM entry_tombstones",
    canon: |r| tombstone_from_row(r).map(|t| tombstone_canon(&t)),
};

/// The canonical encoding of an entry row (every column).
fn entry_canon(e: &Entry) -> Canon {
    Canon::new("entries")
        .key(&e.id)
        .text(e.spiffe_id.as_str())
        .text(e.parent_id.as_str())
        .text(&to_json(&e.selectors))
        .int(i64::from(e.x509_svid_ttl))
        .int(i64::from(e.jwt_svid_ttl))
        .text(&to_json(&e.dns_names))
        .text(&e.hint)
        .int(i64::from(e.admin))
        .opt_text(e.engine.as_deref())
        .text(&to_json(&e.federates_with))
        .int(e.revision)
        .int(e.created_at)
}

/// The canonical encoding of a tombstone row.
fn tombstone_canon(t: &Tombstone) -> Canon {
    Canon::new("entry_tombstones")
        .key(&t.entry_id)
        .key_int(t.revision)
        .text(t.parent_id.as_str())
}

fn tombstone_from_row(r: &AnyRow) -> Result<Tombstone, StoreError> {
    let entry_id: String = r.try_get("entry_id")?;
    let revision: i64 = r.try_get("revision")?;
    let row = format!("tombstone of entry {entry_id} at revision {revision}");
    Ok(Tombstone {
        parent_id: id_column(r, "parent_id", &row)?,
        entry_id,
        revision,
    })
}

fn entry_from_row(r: &AnyRow) -> Result<Entry, StoreError> {
    let id: String = r.try_get("id")?;
    let row = format!("entry {id}");
    Ok(Entry {
        spiffe_id: id_column(r, "spiffe_id", &row)?,
        parent_id: id_column(r, "parent_id", &row)?,
        id,
        selectors: json_list(&r.try_get::<String, _>("selectors")?, "entry selectors")?,
        x509_svid_ttl: r.try_get::<i64, _>("x509_svid_ttl")? as i32,
        jwt_svid_ttl: r.try_get::<i64, _>("jwt_svid_ttl")? as i32,
        dns_names: json_list(&r.try_get::<String, _>("dns_names")?, "entry dns_names")?,
        hint: r.try_get("hint")?,
        admin: r.try_get::<i64, _>("admin")? != 0,
        engine: r.try_get("engine")?,
        federates_with: json_list(
            &r.try_get::<String, _>("federates_with")?,
            "entry federates_with",
        )?,
        revision: r.try_get("revision")?,
        created_at: r.try_get("created_at")?,
    })
}

const ENTRY_UPSERT: &str = "INSERT INTO entries (id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl,
    dns_names, hint, admin, engine, federates_with, revision, created_at, mac)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
    ON CONFLICT (id) DO UPDATE SET spiffe_id = $2, parent_id = $3, selectors = $4, x509_svid_ttl = $5,
    jwt_svid_ttl = $6, dns_names = $7, hint = $8, admin = $9, engine = $10, federates_with = $11, revision = $12,
    created_at = $13, mac = $14";

impl SqlDataStore {
    async fn write_entry(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        e: &Entry,
    ) -> Result<(), StoreError> {
        let mac = self.seal(&entry_canon(e))?;
        sqlx::query(ENTRY_UPSERT)
            .bind(&e.id)
            .bind(e.spiffe_id.as_str())
            .bind(e.parent_id.as_str())
            .bind(to_json(&e.selectors))
            .bind(e.x509_svid_ttl as i64)
            .bind(e.jwt_svid_ttl as i64)
            .bind(to_json(&e.dns_names))
            .bind(&e.hint)
            .bind(e.admin as i64)
            .bind(e.engine.clone())
            .bind(to_json(&e.federates_with))
            .bind(e.revision)
            .bind(e.created_at)
            .bind(mac)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn tombstone(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        t: &Tombstone,
    ) -> Result<(), StoreError> {
        let mac = self.seal(&tombstone_canon(t))?;
        sqlx::query(
            "INSERT INTO entry_tombstones (entry_id, parent_id, revision, mac) VALUES ($1, $2, $3, $4)",
        )
        .bind(&t.entry_id)
        .bind(t.parent_id.as_str())
        .bind(t.revision)
        .bind(mac)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn get_entry_tx(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        id: &str,
    ) -> Result<Entry, StoreError> {
        let row = sqlx::query("SELECT id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, hint, admin, engine, federates_with, revision, created_at, mac FROM entries WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("entry {id}")))?;
        self.checked(&row, entry_from_row, entry_canon)
    }

    pub(super) async fn create_entry_tx(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        mut entry: Entry,
    ) -> Result<Entry, StoreError> {
        entry.revision = Self::bump(tx, "entry_revision").await?;
        self.write_entry(tx, &entry).await?;
        Ok(entry)
    }

    pub(super) async fn update_entry_tx(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        mut entry: Entry,
    ) -> Result<(Entry, Option<Tombstone>), StoreError> {
        let old = self.get_entry_tx(tx, &entry.id).await?;
        entry.revision = Self::bump(tx, "entry_revision").await?;
        entry.created_at = old.created_at;
        let moved = (old.parent_id != entry.parent_id).then(|| Tombstone {
            entry_id: old.id.clone(),
            parent_id: old.parent_id.clone(),
            revision: entry.revision,
        });
        if let Some(t) = &moved {
            self.tombstone(tx, t).await?;
        }
        self.write_entry(tx, &entry).await?;
        Ok((entry, moved))
    }

    pub(super) async fn delete_entry_tx(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        id: &str,
    ) -> Result<(Entry, Tombstone), StoreError> {
        let old = self.get_entry_tx(tx, id).await?;
        let revision = Self::bump(tx, "entry_revision").await?;
        sqlx::query("DELETE FROM entries WHERE id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?;
        let t = Tombstone {
            entry_id: old.id.clone(),
            parent_id: old.parent_id.clone(),
            revision,
        };
        self.tombstone(tx, &t).await?;
        Ok((old, t))
    }
}

#[async_trait]
impl EntryStore for SqlDataStore {
    async fn create_entry(&self, entry: Entry) -> Result<Entry, StoreError> {
        let mut tx = self.pool.begin().await?;
        let entry = self.create_entry_tx(&mut tx, entry).await?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn update_entry(&self, entry: Entry) -> Result<(Entry, Option<Tombstone>), StoreError> {
        let mut tx = self.pool.begin().await?;
        let r = self.update_entry_tx(&mut tx, entry).await?;
        tx.commit().await?;
        Ok(r)
    }

    async fn delete_entry(&self, id: &str) -> Result<(Entry, Tombstone), StoreError> {
        let mut tx = self.pool.begin().await?;
        let r = self.delete_entry_tx(&mut tx, id).await?;
        tx.commit().await?;
        Ok(r)
    }

    async fn list_entries(&self) -> Result<Vec<Entry>, StoreError> {
        let rows = sqlx::query("SELECT id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, hint, admin, engine, federates_with, revision, created_at, mac FROM entries ORDER BY revision")
            .fetch_all(&self.pool)
            .await?;
        self.screen(&rows, entry_from_row, entry_canon)
    }

    async fn list_tombstones(&self) -> Result<Vec<Tombstone>, StoreError> {
        let rows = sqlx::query(
            "SELECT entry_id, parent_id, revision, mac FROM entry_tombstones ORDER BY revision",
        )
        .fetch_all(&self.pool)
        .await?;
        self.screen(&rows, tombstone_from_row, tombstone_canon)
    }

    async fn entry_revision(&self) -> Result<i64, StoreError> {
        self.meta("entry_revision").await
    }

    async fn entries_between(&self, after: i64, upto: i64) -> Result<Vec<Entry>, StoreError> {
        let rows = sqlx::query("SELECT id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, hint, admin, engine, federates_with, revision, created_at, mac FROM entries WHERE revision > $1 AND revision <= $2 ORDER BY revision")
            .bind(after)
            .bind(upto)
            .fetch_all(&self.pool)
            .await?;
        self.screen(&rows, entry_from_row, entry_canon)
    }

    async fn tombstones_between(
        &self,
        after: i64,
        upto: i64,
    ) -> Result<Vec<Tombstone>, StoreError> {
        let rows = sqlx::query(
            "SELECT entry_id, parent_id, revision, mac FROM entry_tombstones WHERE revision > $1 AND revision <= $2 ORDER BY revision",
        )
        .bind(after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?;
        self.screen(&rows, tombstone_from_row, tombstone_canon)
    }
}
