//! The change feed and the leases over SQL (see [`crate::datastore::ChangeFeed`]).
//!
//! Every write transaction that changes what servers hold in memory ends with
//! [`SqlDataStore::note_change`]: it bumps `meta.change_seq` (a row lock held until commit, so
//! change numbers commit in order and a rolled-back write leaves no gap) and appends a row to
//! `changes`. On PostgreSQL it also sends `NOTIFY continuity_changes`, delivered at commit, as
//! a wake-up for the other servers' listeners.

use async_trait::async_trait;
use sqlx::Row;

use super::SqlDataStore;
use crate::datastore::{Change, ChangeFeed, ChangeKind, LeaseStore, StoreError};

/// The PostgreSQL notification channel of the change feed.
const CHANNEL: &str = "continuity_changes";

impl SqlDataStore {
    /// Appends a change of `kind` about `key` inside the write transaction `tx`.
    pub(super) async fn note_change(
        &self,
        tx: &mut sqlx::AnyConnection,
        kind: ChangeKind,
        key: &str,
    ) -> Result<(), StoreError> {
        let seq: i64 = sqlx::query_scalar(
            "UPDATE meta SET value = value + 1 WHERE name = 'change_seq' RETURNING value",
        )
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO changes (seq, kind, change_key, origin, at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(seq)
        .bind(kind.as_str())
        .bind(key)
        .bind(&self.origin)
        .bind(continuity_common::clock::unix_seconds(
            std::time::SystemTime::now(),
        ))
        .execute(&mut *tx)
        .await?;
        if !self.sqlite {
            // A SELECT (not a bare NOTIFY) so every driver path accepts it; sent at commit.
            sqlx::query("SELECT 1 AS sent FROM (SELECT pg_notify($1, '')) AS n")
                .bind(CHANNEL)
                .fetch_one(&mut *tx)
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl ChangeFeed for SqlDataStore {
    fn origin(&self) -> &str {
        &self.origin
    }

    async fn change_head(&self) -> Result<i64, StoreError> {
        self.meta("change_seq").await
    }

    async fn changes_since(&self, seq: i64, limit: i64) -> Result<Vec<Change>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, kind, change_key, origin FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Change {
                    seq: r.try_get("seq")?,
                    kind: ChangeKind::parse(&r.try_get::<String, _>("kind")?),
                    key: r.try_get("change_key")?,
                    origin: r.try_get("origin")?,
                })
            })
            .collect()
    }

    async fn prune_changes(&self, seq: i64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM changes WHERE seq < $1")
            .bind(seq)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    async fn wake_ups(&self) -> Result<Option<tokio::sync::mpsc::Receiver<()>>, StoreError> {
        let Some(url) = self.listen_url.get() else {
            return Ok(None);
        };
        let mut listener = sqlx::postgres::PgListener::connect(url).await?;
        listener.listen(CHANNEL).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    // A full channel already holds a wake-up: one is enough.
                    Ok(_) => {
                        if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) =
                            tx.try_send(())
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "change feed: LISTEN connection lost; reconnecting (the poll covers the gap)");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        if tx.is_closed() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Some(rx))
    }
}

#[async_trait]
impl LeaseStore for SqlDataStore {
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        ttl_secs: i64,
    ) -> Result<bool, StoreError> {
        let until = now.saturating_add(ttl_secs);
        let taken = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(holder)
        .bind(until)
        .execute(&self.pool)
        .await?;
        if taken.rows_affected() == 1 {
            return Ok(true);
        }
        // Compare-and-set: only a free (expired) lease or our own is taken.
        let renewed = sqlx::query(
            "UPDATE leases SET holder = $2, expires_at = $3 WHERE name = $1 AND (holder = $2 OR expires_at <= $4)",
        )
        .bind(name)
        .bind(holder)
        .bind(until)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
