//! The audit log, and the audited transaction every state change goes through.
//!
//! Every append reads the head row (`audit_head`) inside its own write transaction, links its
//! records after it and writes them and the new head before it commits: the sequence numbers
//! come from the datastore, so two servers (or two writers) sharing one log serialize on the
//! head row and never reuse a number, and a commit whose outcome was never reported cannot
//! leave a writer on a stale head.

use async_trait::async_trait;
use sqlx::{AnyConnection, Row};

use super::SqlDataStore;
use crate::datastore::{
    Applied, AuditHead, AuditLinker, AuditRecord, AuditStore, StoreError, Write,
};

/// Records per INSERT statement (9 parameters each: well under SQLite's and PostgreSQL's
/// parameter limits).
const INSERT_CHUNK: usize = 500;

impl SqlDataStore {
    /// Takes the write lock on the head row and reads it, in one statement. SQLite: a no-op
    /// `UPDATE … RETURNING`, so the transaction holds SQLite's write lock (waiting on
    /// busy_timeout) before it reads; PostgreSQL: `SELECT … FOR UPDATE`.
    async fn lock_head(&self, c: &mut AnyConnection) -> Result<AuditHead, StoreError> {
        let query = if self.sqlite {
            "UPDATE audit_head SET seq = seq WHERE id = 1 RETURNING seq, hash"
        } else {
            "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE"
        };
        let row = sqlx::query(query)
            .fetch_optional(&mut *c)
            .await?
            .ok_or_else(|| StoreError::Corrupt("the audit head row is missing".into()))?;
        Ok(AuditHead {
            seq: row.try_get("seq")?,
            hash: row.try_get("hash")?,
        })
    }

    /// Links `records` after `head` and writes them and the new head.
    async fn append_audit_on(
        c: &mut AnyConnection,
        head: &AuditHead,
        records: &mut [AuditRecord],
        link: &dyn AuditLinker,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        link.link(head, records)?;
        // One multi-row INSERT per chunk: a group commit of N key uses costs a handful of
        // statements, not N (each statement is a round trip to the driver's worker).
        for chunk in records.chunks(INSERT_CHUNK) {
            let mut sql = String::with_capacity(128 + chunk.len() * 48);
            sql.push_str("INSERT INTO audit_log (seq, time, actor, action, target, key_version, result, prev_hash, hash) VALUES ");
            for i in 0..chunk.len() {
                let b = i * 9;
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7,
                    b + 8,
                    b + 9
                ));
            }
            let mut q = sqlx::query(&sql);
            for a in chunk {
                q = q
                    .bind(a.seq)
                    .bind(a.time)
                    .bind(&a.actor)
                    .bind(&a.action)
                    .bind(&a.target)
                    .bind(i64::from(a.key_version))
                    .bind(&a.result)
                    .bind(&a.prev_hash)
                    .bind(&a.hash);
            }
            q.execute(&mut *c).await?;
        }
        if let Some(last) = records.last() {
            sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
                .bind(last.seq)
                .bind(&last.hash)
                .execute(&mut *c)
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl AuditStore for SqlDataStore {
    async fn apply(
        &self,
        writes: &[Write],
        audit: &mut [AuditRecord],
        link: &dyn AuditLinker,
    ) -> Result<Vec<Applied>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The head is locked before any write, so the transaction never upgrades a read lock
        // (SQLITE_BUSY at once) and audited writes serialize in chain order.
        let head = if self.sqlite || !audit.is_empty() {
            Some(self.lock_head(&mut tx).await?)
        } else {
            None
        };
        let out = self.apply_all(&mut tx, writes).await?;
        if let Some(head) = head {
            Self::append_audit_on(&mut tx, &head, audit, link)
                .await
                .map_err(audit_error)?;
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn append_audit_batch(
        &self,
        records: &mut [AuditRecord],
        link: &dyn AuditLinker,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let head = self.lock_head(&mut tx).await?;
        Self::append_audit_on(&mut tx, &head, records, link).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit_head(&self) -> Result<AuditHead, StoreError> {
        let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::Corrupt("the audit head row is missing".into()))?;
        Ok(AuditHead {
            seq: row.try_get("seq")?,
            hash: row.try_get("hash")?,
        })
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
                    key_version: u32::try_from(r.try_get::<i64, _>("key_version")?).map_err(
                        |_| StoreError::Corrupt("audit_log: key_version out of range".into()),
                    )?,
                    result: r.try_get("result")?,
                    prev_hash: r.try_get("prev_hash")?,
                    hash: r.try_get("hash")?,
                })
            })
            .collect()
    }
}

/// An audit append that failed: the write it belongs to was not applied.
fn audit_error(e: StoreError) -> StoreError {
    match e {
        StoreError::Audit(_) => e,
        other => StoreError::Audit(other.to_string()),
    }
}
