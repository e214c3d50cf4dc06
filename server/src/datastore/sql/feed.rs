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

#[cfg(test)]
mod tests {
    use crate::datastore::{
        AuditStore, CaStore, ChangeFeed, ChangeKind, Entry, LeaseStore, StoreError, Write,
    };

    #[tokio::test]
    async fn a_lease_has_one_holder_until_it_expires_or_is_released() {
        let (dir, _url, s) = crate::datastore::scratch_sqlite("leases").await;
        assert!(s.try_lease("ca", "a", 100, 30).await.unwrap());
        assert!(!s.try_lease("ca", "b", 110, 30).await.unwrap());
        // The holder renews; the other still waits.
        assert!(s.try_lease("ca", "a", 125, 30).await.unwrap());
        assert!(!s.try_lease("ca", "b", 150, 30).await.unwrap());
        // Expired: the other takes it, and the old holder is refused.
        assert!(s.try_lease("ca", "b", 155, 30).await.unwrap());
        assert!(!s.try_lease("ca", "a", 156, 30).await.unwrap());
        // Other names are other leases; a release by a non-holder does nothing.
        assert!(s.try_lease("engines", "a", 156, 30).await.unwrap());
        s.release_lease("ca", "a").await.unwrap();
        assert!(!s.try_lease("ca", "a", 157, 30).await.unwrap());
        s.release_lease("ca", "b").await.unwrap();
        assert!(s.try_lease("ca", "a", 157, 30).await.unwrap());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn every_write_appends_one_numbered_change_in_its_transaction() {
        let (dir, url, s) = crate::datastore::scratch_sqlite("changes").await;
        assert_eq!(s.change_head().await.unwrap(), 0);
        let parent = continuity_common::SpiffeId::new("spiffe://example.org/node").unwrap();
        let e = Entry {
            id: "e1".into(),
            spiffe_id: continuity_common::SpiffeId::new("spiffe://example.org/w").unwrap(),
            parent_id: parent,
            selectors: vec![],
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            dns_names: vec![],
            hint: String::new(),
            admin: false,
            engine: None,
            federates_with: vec![],
            revision: 0,
            created_at: 0,
        };
        struct Unlinked;
        impl crate::datastore::AuditLinker for Unlinked {
            fn link(
                &self,
                _: &crate::datastore::AuditHead,
                _: &mut [crate::datastore::AuditRecord],
            ) -> Result<(), StoreError> {
                Ok(())
            }
        }
        s.apply(&[Write::CreateEntry(e)], &mut [], &Unlinked)
            .await
            .unwrap();
        // A failed write leaves no change and no gap.
        let dup = s
            .apply(&[Write::DeleteEntry("missing".into())], &mut [], &Unlinked)
            .await;
        assert!(dup.is_err());
        s.next_bundle_sequence().await.unwrap();
        let changes = s.changes_since(0, 10).await.unwrap();
        let seen: Vec<_> = changes
            .iter()
            .map(|c| (c.seq, c.kind, c.key.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                (1, Some(ChangeKind::Entry), "e1"),
                (2, Some(ChangeKind::Ca), "bundle")
            ]
        );
        assert!(changes.iter().all(|c| c.origin == s.origin()));
        assert_eq!(s.change_head().await.unwrap(), 2);
        assert_eq!(s.changes_since(2, 10).await.unwrap(), vec![]);
        // Another process on the same file has another origin.
        let other = super::SqlDataStore::connect(&url, crate::datastore::test_sealer())
            .await
            .unwrap();
        assert_ne!(other.origin(), s.origin());
        assert_eq!(s.prune_changes(2).await.unwrap(), 1);
        assert_eq!(s.changes_since(0, 10).await.unwrap()[0].seq, 2);
        // SQLite has no LISTEN: the poll does the work.
        assert!(s.wake_ups().await.unwrap().is_none());
        let _ = std::fs::remove_dir_all(dir);
    }
}
