//! The audit log, and the audited transaction every state change goes through.

use async_trait::async_trait;
use sqlx::{AnyConnection, Row};

use super::SqlDataStore;
use crate::datastore::{Applied, AuditRecord, AuditStore, StoreError, Write};

impl SqlDataStore {
    async fn append_audit_on(
        c: &mut AnyConnection,
        records: &[AuditRecord],
    ) -> Result<(), StoreError> {
        let Some(last) = records.last() else {
            return Ok(());
        };
        for a in records {
            sqlx::query(
                "INSERT INTO audit_log (seq, time, actor, action, target, key_version, result, prev_hash, hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(a.seq)
            .bind(a.time)
            .bind(&a.actor)
            .bind(&a.action)
            .bind(&a.target)
            .bind(a.key_version as i64)
            .bind(&a.result)
            .bind(&a.prev_hash)
            .bind(&a.hash)
            .execute(&mut *c)
            .await?;
        }
        sqlx::query("UPDATE meta SET value = $1 WHERE name = 'audit_head'")
            .bind(last.seq)
            .execute(&mut *c)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl AuditStore for SqlDataStore {
    async fn apply(
        &self,
        writes: &[Write],
        audit: &[AuditRecord],
    ) -> Result<Vec<Applied>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if self.sqlite {
            // Take SQLite's write lock first (waiting on busy_timeout) so a transaction that
            // reads before it writes cannot fail at once with SQLITE_BUSY on the upgrade.
            sqlx::query("UPDATE meta SET value = value WHERE name = 'audit_head'")
                .execute(&mut *tx)
                .await?;
        }
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            out.push(self.apply_tx(&mut tx, w).await?);
        }
        Self::append_audit_on(&mut tx, audit)
            .await
            .map_err(|e| StoreError::Audit(e.to_string()))?;
        tx.commit().await?;
        Ok(out)
    }

    async fn append_audit_batch(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        Self::append_audit_on(&mut tx, records).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit_head(&self) -> Result<i64, StoreError> {
        self.meta("audit_head").await
    }

    async fn list_audit(&self) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM audit_log ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditRecord {
                    seq: r.try_get("seq")?,
                    time: r.try_get("time")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    key_version: r.try_get::<i64, _>("key_version")? as u32,
                    result: r.try_get("result")?,
                    prev_hash: r.try_get("prev_hash")?,
                    hash: r.try_get("hash")?,
                })
            })
            .collect()
    }
}
