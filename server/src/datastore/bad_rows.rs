//! The rows known to have failed their record MAC: kept while the server runs, reported once
//! each (an error log naming table and key, never content), and shown by `/ready` and the
//! `continuity_integrity_bad_rows` gauge until a verify finds them intact again.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// One row that failed its check.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BadRow {
    /// The table.
    pub table: String,
    /// The primary key, its parts joined with `/`.
    pub key: String,
    /// Why it failed.
    pub reason: String,
}

/// The shared set of known bad rows, with the ones not yet audited.
#[derive(Debug, Default)]
pub struct BadRows {
    inner: Mutex<Inner>,
    changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Inner {
    known: BTreeMap<(String, String), String>,
    unaudited: Vec<BadRow>,
}

impl BadRows {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a bad row; logs and queues it for the audit log the first time it is seen.
    pub fn report(&self, table: &str, key: &str, reason: &str) {
        let new = {
            let mut g = self.lock();
            let new = g
                .known
                .insert((table.to_string(), key.to_string()), reason.to_string())
                .is_none();
            if new {
                g.unaudited.push(BadRow {
                    table: table.into(),
                    key: key.into(),
                    reason: reason.into(),
                });
            }
            new
        };
        if new {
            tracing::error!(
                table,
                key,
                reason,
                "datastore row failed its integrity check; it is not used"
            );
            self.changed.notify_one();
        }
    }

    /// A row read intact: no longer known bad.
    pub fn clear(&self, table: &str, key: &str) {
        let mut g = self.lock();
        if !g.known.is_empty() {
            g.known.remove(&(table.to_string(), key.to_string()));
        }
    }

    /// After a full verify: exactly `rows` are bad (new ones are reported).
    pub fn replace(&self, rows: &[BadRow]) {
        self.lock()
            .known
            .retain(|(t, k), _| rows.iter().any(|r| &r.table == t && &r.key == k));
        for r in rows {
            self.report(&r.table, &r.key, &r.reason);
        }
    }

    /// Why the row (`table`, `key`) failed, if it is known bad.
    pub fn reason(&self, table: &str, key: &str) -> Option<String> {
        self.lock()
            .known
            .get(&(table.to_string(), key.to_string()))
            .cloned()
    }

    /// How many bad rows are known.
    pub fn count(&self) -> usize {
        self.lock().known.len()
    }

    /// Every known bad row, ordered by table and key.
    pub fn list(&self) -> Vec<BadRow> {
        self.lock()
            .known
            .iter()
            .map(|((table, key), reason)| BadRow {
                table: table.clone(),
                key: key.clone(),
                reason: reason.clone(),
            })
            .collect()
    }

    /// Takes the rows reported since the last call (for the audit log).
    pub fn take_unaudited(&self) -> Vec<BadRow> {
        std::mem::take(&mut self.lock().unaudited)
    }

    /// Puts back rows whose audit record could not be written.
    pub fn requeue(&self, rows: Vec<BadRow>) {
        self.lock().unaudited.extend(rows);
    }

    /// Resolves when a new bad row was reported.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_once_listed_until_verified_again() {
        let b = BadRows::default();
        b.report("entries", "e1", "no record MAC");
        b.report("entries", "e1", "no record MAC");
        b.report(
            "agents",
            "spiffe://td/a",
            "record MAC does not match the row",
        );
        assert_eq!(b.count(), 2);
        assert_eq!(b.take_unaudited().len(), 2);
        assert!(b.take_unaudited().is_empty());
        b.clear("entries", "e1");
        assert_eq!(b.list()[0].table, "agents");
        b.replace(&[]);
        assert_eq!(b.count(), 0);
    }
}
