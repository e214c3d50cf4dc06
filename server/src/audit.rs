//! The audit log: append-only, hash-chained records of admin actions and key uses — who,
//! what, which key version, the result; never key material or plaintext. `verify` recomputes
//! the chain and names the first record that was edited, deleted or moved.

use std::sync::Arc;

use continuity_common::Clock;

use crate::datastore::{AuditRecord, DataStore, StoreError};

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Records checked.
    pub records: i64,
    /// The first bad record and why (None: the chain is intact).
    pub problem: Option<(i64, String)>,
}

/// The audit log.
///
/// Appends use group commit: a record is chained in memory under a short lock, and whoever
/// then holds the flush lock writes every pending record in one transaction. `record`
/// returns only once its own record is committed, so the log is durable per call while
/// concurrent key uses share one database commit.
pub struct Audit {
    store: Arc<dyn DataStore>,
    clock: Arc<dyn Clock>,
    head: std::sync::Mutex<Head>,
    flush: tokio::sync::Mutex<()>,
}

struct Head {
    seq: i64,
    hash: String,
    pending: Vec<AuditRecord>,
    committed: i64,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
    }
}

fn chain_hash(r: &AuditRecord) -> String {
    let fields = serde_json::json!([
        r.seq,
        r.time,
        r.actor,
        r.action,
        r.target,
        r.key_version,
        r.result,
        r.prev_hash
    ]);
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        fields.to_string().as_bytes(),
    ))
}

impl Audit {
    /// Opens the log, continuing its chain.
    pub async fn load(
        store: Arc<dyn DataStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, StoreError> {
        let last = store.list_audit().await?.pop();
        let (seq, hash) = last.map(|r| (r.seq, r.hash)).unwrap_or_default();
        Ok(Arc::new(Self {
            store,
            clock,
            head: std::sync::Mutex::new(Head {
                seq,
                hash,
                pending: Vec::new(),
                committed: seq,
            }),
            flush: tokio::sync::Mutex::new(()),
        }))
    }

    /// Appends one record; returns once it is committed.
    pub async fn record(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        key_version: u32,
        result: &str,
    ) -> Result<(), StoreError> {
        let mine = {
            let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
            let mut r = AuditRecord {
                seq: head.seq + 1,
                time: self.clock.unix(),
                actor: actor.into(),
                action: action.into(),
                target: target.into(),
                key_version,
                result: result.into(),
                prev_hash: head.hash.clone(),
                hash: String::new(),
            };
            r.hash = chain_hash(&r);
            head.seq = r.seq;
            head.hash = r.hash.clone();
            head.pending.push(r);
            head.seq
        };
        let _flushing = self.flush.lock().await;
        let batch = {
            let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
            if head.committed >= mine {
                return Ok(());
            }
            std::mem::take(&mut head.pending)
        };
        let last = batch.last().map_or(mine, |r| r.seq);
        if let Err(e) = self.store.append_audit_batch(&batch).await {
            // Put them back in order so a later flush retries them; the chain stays intact.
            let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
            let mut rest = std::mem::take(&mut head.pending);
            head.pending = batch;
            head.pending.append(&mut rest);
            return Err(e);
        }
        self.head
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .committed = last;
        Ok(())
    }

    /// Records, oldest first; the last `limit` when limit > 0.
    pub async fn records(&self, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        let mut all = self.store.list_audit().await?;
        if limit > 0 && all.len() as i64 > limit {
            all.drain(..all.len() - limit as usize);
        }
        Ok(all)
    }

    /// Recomputes the chain.
    pub async fn verify(&self) -> Result<Verification, StoreError> {
        let records = self.store.list_audit().await?;
        let head = self.store.audit_head().await?;
        let mut prev = String::new();
        let mut expected = 1;
        for r in &records {
            let problem = if r.seq != expected {
                Some((
                    expected,
                    format!(
                        "record {expected} is missing (the next record is {})",
                        r.seq
                    ),
                ))
            } else if r.prev_hash != prev {
                Some((
                    r.seq,
                    format!(
                        "record {} does not follow record {} (moved, or the record before it was replaced)",
                        r.seq,
                        r.seq - 1
                    ),
                ))
            } else if chain_hash(r) != r.hash {
                Some((
                    r.seq,
                    format!("record {} was modified after it was written", r.seq),
                ))
            } else {
                None
            };
            if problem.is_some() {
                return Ok(Verification {
                    records: records.len() as i64,
                    problem,
                });
            }
            prev = r.hash.clone();
            expected += 1;
        }
        if head >= expected {
            return Ok(Verification {
                records: records.len() as i64,
                problem: Some((
                    expected,
                    format!("records {expected}..={head} were deleted from the end of the log"),
                )),
            });
        }
        Ok(Verification {
            records: records.len() as i64,
            problem: None,
        })
    }
}
