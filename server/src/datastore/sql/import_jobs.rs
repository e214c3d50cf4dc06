//! Engine key import jobs (migration 13): one row per job, record-MACed. Only the table, its
//! canonical encoding and a test-only writer exist so far; the write path through
//! [`crate::datastore::Write`] and the change feed are not wired yet.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::Table;
use crate::datastore::{Canon, StoreError};

/// The import jobs, MACed (created by migration 13).
pub(super) const IMPORT_JOBS: Table = Table {
    name: "engine_import_jobs",
    pk: &["id"],
    select: "SELECT id, engine, method, custody, public_key, private_ref, state, created_at, expires_at, mac FROM engine_import_jobs",
    canon: |r| raw_from_row(r).map(|raw| raw.canon()),
};

/// A row as stored.
pub(super) struct Raw {
    /// The job's id.
    pub(super) id: String,
    /// The engine it belongs to.
    pub(super) engine: String,
    /// The import method (`RSA_OAEP_3072_SHA256_AES_256` or the SHA-1 variant).
    pub(super) method: String,
    /// `hsm` or `transit`.
    pub(super) custody: String,
    /// The wrapping public key (SPKI DER).
    pub(super) public_key: Vec<u8>,
    /// The private half: sealed under the KEK (transit) or the token object's id (hsm).
    pub(super) private_ref: Vec<u8>,
    /// `active` or `expired`.
    pub(super) state: String,
    /// Unix seconds.
    pub(super) created_at: i64,
    /// Unix seconds.
    pub(super) expires_at: i64,
}

impl Raw {
    /// The canonical encoding of the row (every column).
    pub(super) fn canon(&self) -> Canon {
        Canon::new("engine_import_jobs")
            .key(&self.id)
            .text(&self.engine)
            .text(&self.method)
            .text(&self.custody)
            .bytes(&self.public_key)
            .bytes(&self.private_ref)
            .text(&self.state)
            .int(self.created_at)
            .int(self.expires_at)
    }
}

fn raw_from_row(r: &AnyRow) -> Result<Raw, StoreError> {
    Ok(Raw {
        id: r.try_get("id")?,
        engine: r.try_get("engine")?,
        method: r.try_get("method")?,
        custody: r.try_get("custody")?,
        public_key: r.try_get("public_key")?,
        private_ref: r.try_get("private_ref")?,
        state: r.try_get("state")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{IntegrityStore, on_both_backends};

    /// Writes `raw` sealed, as the future write path will.
    async fn put(s: &super::super::SqlDataStore, raw: &Raw) {
        let mac = s.seal(&raw.canon()).unwrap();
        sqlx::query(
            "INSERT INTO engine_import_jobs (id, engine, method, custody, public_key, private_ref, state, created_at, expires_at, mac)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(raw.id.clone())
        .bind(raw.engine.clone())
        .bind(raw.method.clone())
        .bind(raw.custody.clone())
        .bind(raw.public_key.clone())
        .bind(raw.private_ref.clone())
        .bind(raw.state.clone())
        .bind(raw.created_at)
        .bind(raw.expires_at)
        .bind(mac)
        .execute(&s.pool)
        .await
        .unwrap();
    }

    on_both_backends! {
        /// Migration 13 makes the import-job table; a sealed row passes `integrity verify` and
        /// an edited one is named by it.
        async fn import_job_rows_are_record_maced(s) {
            let raw = Raw {
                id: "job1".into(),
                engine: "e".into(),
                method: "RSA_OAEP_3072_SHA256_AES_256".into(),
                custody: "transit".into(),
                public_key: vec![1, 2, 3],
                private_ref: vec![4, 5, 6],
                state: "active".into(),
                created_at: 1_700_000_000,
                expires_at: 1_700_259_200,
            };
            put(&s.store, &raw).await;
            assert!(s.store.verify_integrity().await.unwrap().bad.is_empty());
            sqlx::query("UPDATE engine_import_jobs SET expires_at = expires_at + 1")
                .execute(&s.store.pool)
                .await
                .unwrap();
            let report = s.store.verify_integrity().await.unwrap();
            assert_eq!(report.bad.len(), 1, "{:?}", report.bad);
        }
    }
}
