//! Endorsements of key versions (continuity proofs), record-MACed; inserted with the version
//! they endorse and never changed or deleted afterwards.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{SqlDataStore, Table};
use crate::datastore::{Canon, StoreError};
use crate::model::engine::Endorsement;

const SELECT: &str = "SELECT engine, key_name, version, previous_version, jws, created_at, mac FROM engine_endorsements";

/// The endorsements, MACed.
pub(super) const ENDORSEMENTS: Table = Table {
    name: "engine_endorsements",
    pk: &["engine", "key_name", "version"],
    select: SELECT,
    canon: |r| endorsement_from_row(r).map(|e| endorsement_canon(&e)),
};

fn endorsement_canon(e: &Endorsement) -> Canon {
    Canon::new("engine_endorsements")
        .key(&e.engine)
        .key(&e.key)
        .key_int(i64::from(e.version))
        .int(i64::from(e.previous_version))
        .text(&e.jws)
        .int(e.created_at)
}

fn version(r: &AnyRow, column: &str) -> Result<u32, StoreError> {
    let v: i64 = r.try_get(column)?;
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("endorsement {column} {v}")))
}

fn endorsement_from_row(r: &AnyRow) -> Result<Endorsement, StoreError> {
    Ok(Endorsement {
        engine: r.try_get("engine")?,
        key: r.try_get("key_name")?,
        version: version(r, "version")?,
        previous_version: version(r, "previous_version")?,
        jws: r.try_get("jws")?,
        created_at: r.try_get("created_at")?,
    })
}

impl SqlDataStore {
    /// Inserts an endorsement (in the transaction of the version it endorses).
    pub(super) async fn insert_endorsement_on(
        &self,
        c: &mut AnyConnection,
        e: &Endorsement,
    ) -> Result<(), StoreError> {
        let mac = self.seal(&endorsement_canon(e))?;
        sqlx::query(
            "INSERT INTO engine_endorsements (engine, key_name, version, previous_version, jws, created_at, mac) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&e.engine)
        .bind(&e.key)
        .bind(i64::from(e.version))
        .bind(i64::from(e.previous_version))
        .bind(&e.jws)
        .bind(e.created_at)
        .bind(mac)
        .execute(&mut *c)
        .await?;
        Ok(())
    }

    /// Every intact endorsement (a row whose MAC fails is left out and reported).
    pub(super) async fn list_endorsements_all(&self) -> Result<Vec<Endorsement>, StoreError> {
        let rows = sqlx::query(&format!("{SELECT} ORDER BY engine, key_name, version"))
            .fetch_all(&self.pool)
            .await?;
        self.screen(&rows, endorsement_from_row, endorsement_canon)
    }
}
