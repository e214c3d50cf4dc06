//! Engine key import jobs (migration 13): one row per job, record-MACed, written with the
//! audit record of the change ([`crate::datastore::Write::PutImportJob`]) and read from the
//! datastore on each use, so every server sees the same jobs without a change feed.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{SqlDataStore, Table, parse};
use crate::datastore::{Canon, StoreError};
use crate::model::engine::ImportJob;

const SELECT: &str = "SELECT id, engine, method, custody, public_key, private_ref, state, created_at, expires_at, mac FROM engine_import_jobs";

/// The import jobs, MACed (created by migration 13).
pub(super) const IMPORT_JOBS: Table = Table {
    name: "engine_import_jobs",
    pk: &["id"],
    select: SELECT,
    canon: |r| job_from_row(r).map(|j| job_canon(&j)),
};

/// The canonical encoding of a job row (every column).
fn job_canon(j: &ImportJob) -> Canon {
    Canon::new("engine_import_jobs")
        .key(&j.id)
        .text(&j.engine)
        .text(j.method.as_str())
        .text(j.custody.as_str())
        .bytes(&j.public_key)
        .bytes(&j.private_ref)
        .text(j.state.as_str())
        .int(j.created_at)
        .int(j.expires_at)
}

fn job_from_row(r: &AnyRow) -> Result<ImportJob, StoreError> {
    Ok(ImportJob {
        id: r.try_get("id")?,
        engine: r.try_get("engine")?,
        method: parse(r.try_get::<String, _>("method")?)?,
        custody: parse(r.try_get::<String, _>("custody")?)?,
        public_key: r.try_get("public_key")?,
        private_ref: r.try_get("private_ref")?,
        state: parse(r.try_get::<String, _>("state")?)?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
    })
}

impl SqlDataStore {
    /// Inserts or replaces an import job (in the transaction of its audit record).
    pub(super) async fn put_import_job_on(
        &self,
        c: &mut AnyConnection,
        j: &ImportJob,
    ) -> Result<(), StoreError> {
        let mac = self.seal(&job_canon(j))?;
        sqlx::query(
            "INSERT INTO engine_import_jobs (id, engine, method, custody, public_key, private_ref, state, created_at, expires_at, mac)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (id) DO UPDATE SET engine = $2, method = $3, custody = $4, public_key = $5,
             private_ref = $6, state = $7, created_at = $8, expires_at = $9, mac = $10",
        )
        .bind(&j.id)
        .bind(&j.engine)
        .bind(j.method.as_str())
        .bind(j.custody.as_str())
        .bind(j.public_key.clone())
        .bind(j.private_ref.clone())
        .bind(j.state.as_str())
        .bind(j.created_at)
        .bind(j.expires_at)
        .bind(mac)
        .execute(&mut *c)
        .await?;
        Ok(())
    }

    /// Every intact import job, oldest first (a row whose MAC fails is left out and reported).
    pub(super) async fn list_import_jobs_all(&self) -> Result<Vec<ImportJob>, StoreError> {
        let rows = sqlx::query(&format!("{SELECT} ORDER BY created_at, id"))
            .fetch_all(&self.pool)
            .await?;
        self.screen(&rows, job_from_row, job_canon)
    }

    /// The import job `id`, checked (a row whose MAC fails is an error, never used).
    pub(super) async fn get_import_job_checked(
        &self,
        id: &str,
    ) -> Result<Option<ImportJob>, StoreError> {
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| self.checked(&r, job_from_row, job_canon))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use crate::datastore::{EngineStore, IntegrityStore, Write, on_both_backends};
    use crate::keys::import_wrap::ImportMethod;
    use crate::model::engine::{Custody, ImportJob, ImportJobState};

    fn job(id: &str) -> ImportJob {
        ImportJob {
            id: id.into(),
            engine: "e".into(),
            method: ImportMethod::RsaOaep3072Sha256Aes256,
            custody: Custody::Transit,
            public_key: vec![1, 2, 3],
            private_ref: vec![4, 5, 6],
            state: ImportJobState::Active,
            created_at: 1_700_000_000,
            expires_at: 1_700_259_200,
        }
    }

    on_both_backends! {
        /// Jobs are written through `apply`, read back as written, replaced on expiry, and
        /// record-MACed: an edited row is named by `integrity verify` and never used.
        async fn import_jobs_round_trip_and_are_record_maced(s) {
            let a = job("ij-a");
            crate::datastore::sql::tests::apply(&s.store, &[Write::PutImportJob(a.clone())]).await.unwrap();
            assert_eq!(s.store.get_import_job(&a.id).await.unwrap(), Some(a.clone()));
            assert_eq!(s.store.get_import_job("ij-none").await.unwrap(), None);
            let expired = ImportJob { state: ImportJobState::Expired, private_ref: vec![], ..a.clone() };
            crate::datastore::sql::tests::apply(&s.store, &[Write::PutImportJob(expired.clone())]).await.unwrap();
            assert_eq!(s.store.list_import_jobs().await.unwrap(), vec![expired]);
            assert!(s.store.verify_integrity().await.unwrap().bad.is_empty());
            sqlx::query("UPDATE engine_import_jobs SET expires_at = expires_at + 1")
                .execute(&s.store.pool)
                .await
                .unwrap();
            let report = s.store.verify_integrity().await.unwrap();
            assert_eq!(report.bad.len(), 1, "{:?}", report.bad);
            assert!(s.store.get_import_job(&a.id).await.is_err(), "a tampered job was used");
            assert!(s.store.list_import_jobs().await.unwrap().is_empty());
        }
    }
}
