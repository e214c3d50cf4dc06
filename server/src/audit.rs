//! The audit log: append-only, hash-chained records of admin actions and key uses — who,
//! what, which key version, the result; never key material or plaintext. `verify` recomputes
//! the chain and names the first record that was edited, deleted or moved.

use std::sync::Arc;

use continuity_common::Clock;

use crate::datastore::{Applied, AuditRecord, DataStore, StoreError, Write};

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Records checked.
    pub records: i64,
    /// The first bad record and why (None: the chain is intact).
    pub problem: Option<(i64, String)>,
}

/// One audit record to append, before it is chained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Who.
    pub actor: String,
    /// What (entry.create, agent.ban, ...).
    pub action: String,
    /// On what.
    pub target: String,
    /// Key version involved (0 = none).
    pub key_version: u32,
    /// ok, or the refusal.
    pub result: String,
}

impl AuditEvent {
    /// A successful action without a key version.
    pub fn ok(actor: &str, action: &str, target: &str) -> Self {
        Self {
            actor: actor.into(),
            action: action.into(),
            target: target.into(),
            key_version: 0,
            result: "ok".into(),
        }
    }

    /// The same event naming a key version.
    pub fn version(mut self, key_version: u32) -> Self {
        self.key_version = key_version;
        self
    }

    /// The same event with another result text.
    pub fn result(mut self, result: impl Into<String>) -> Self {
        self.result = result.into();
        self
    }
}

/// The audit log.
///
/// Key-use appends ([`Audit::record`]) use group commit: a record is chained in memory under
/// a short lock, and whoever then holds the flush lock writes every pending record in one
/// transaction. `record` returns only once its own record is committed, so the log is durable
/// per call while concurrent key uses share one database commit.
///
/// Admin writes go through [`Audit::commit`]: the write and its records (and whatever is
/// pending) commit in one transaction, or none of it does and the chain continues as if the
/// records never existed.
pub struct Audit {
    store: Arc<dyn DataStore>,
    clock: Arc<dyn Clock>,
    head: std::sync::Mutex<Head>,
    flush: tokio::sync::Mutex<()>,
}

struct Head {
    /// seq and hash of the last chained record (committed or pending).
    seq: i64,
    hash: String,
    /// Chained, not yet committed key-use records, with their tickets, in seq order.
    pending: Vec<(u64, AuditRecord)>,
    next_ticket: u64,
    /// Every pending ticket up to this one is committed.
    committed_ticket: u64,
    /// seq and hash of the last committed record.
    committed_seq: i64,
    committed_hash: String,
}

impl Head {
    fn chain(&mut self, time: i64, ev: &AuditEvent) -> AuditRecord {
        let mut r = AuditRecord {
            seq: self.seq + 1,
            time,
            actor: ev.actor.clone(),
            action: ev.action.clone(),
            target: ev.target.clone(),
            key_version: ev.key_version,
            result: ev.result.clone(),
            prev_hash: self.hash.clone(),
            hash: String::new(),
        };
        r.hash = chain_hash(&r);
        self.seq = r.seq;
        self.hash = r.hash.clone();
        r
    }

    /// Puts `taken` (a failed batch) back in front of the pending records and chains them
    /// all again from the last committed record.
    fn restore(&mut self, taken: Vec<(u64, AuditRecord)>) {
        let rest = std::mem::take(&mut self.pending);
        self.pending = taken;
        self.pending.extend(rest);
        self.seq = self.committed_seq;
        self.hash = self.committed_hash.clone();
        for (_, r) in self.pending.iter_mut() {
            r.seq = self.seq + 1;
            r.prev_hash = self.hash.clone();
            r.hash = chain_hash(r);
            self.seq = r.seq;
            self.hash = r.hash.clone();
        }
    }

    fn committed(&mut self, taken: &[(u64, AuditRecord)], last: Option<&AuditRecord>) {
        if let Some((t, _)) = taken.last() {
            self.committed_ticket = self.committed_ticket.max(*t);
        }
        if let Some(r) = last {
            self.committed_seq = r.seq;
            self.committed_hash = r.hash.clone();
        }
    }
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
                hash: hash.clone(),
                pending: Vec::new(),
                next_ticket: 1,
                committed_ticket: 0,
                committed_seq: seq,
                committed_hash: hash,
            }),
            flush: tokio::sync::Mutex::new(()),
        }))
    }

    fn head(&self) -> std::sync::MutexGuard<'_, Head> {
        self.head.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one record (a key use); returns once it is committed.
    pub async fn record(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        key_version: u32,
        result: &str,
    ) -> Result<(), StoreError> {
        let ev = AuditEvent::ok(actor, action, target)
            .version(key_version)
            .result(result);
        let mine = {
            let now = self.clock.unix();
            let mut head = self.head();
            let r = head.chain(now, &ev);
            let ticket = head.next_ticket;
            head.next_ticket += 1;
            head.pending.push((ticket, r));
            ticket
        };
        let _flushing = self.flush.lock().await;
        let taken = {
            let mut head = self.head();
            if head.committed_ticket >= mine {
                return Ok(());
            }
            std::mem::take(&mut head.pending)
        };
        let batch: Vec<AuditRecord> = taken.iter().map(|(_, r)| r.clone()).collect();
        if let Err(e) = self.store.append_audit_batch(&batch).await {
            // Put them back in order so a later flush retries them; the chain stays intact.
            self.head().restore(taken);
            return Err(e);
        }
        self.head().committed(&taken, batch.last());
        Ok(())
    }

    /// Applies `writes` and appends `events` (after any pending key-use records) in one
    /// datastore transaction. On failure nothing is applied and the chain continues as if
    /// `events` had never been chained.
    pub async fn commit(
        &self,
        writes: &[Write],
        events: &[AuditEvent],
    ) -> Result<Vec<Applied>, StoreError> {
        if events.is_empty() {
            return self.store.apply(writes, &[]).await;
        }
        let _flushing = self.flush.lock().await;
        let (taken, batch) = {
            let now = self.clock.unix();
            let mut head = self.head();
            let taken = std::mem::take(&mut head.pending);
            let mut batch: Vec<AuditRecord> = taken.iter().map(|(_, r)| r.clone()).collect();
            for ev in events {
                let r = head.chain(now, ev);
                batch.push(r);
            }
            (taken, batch)
        };
        match self.store.apply(writes, &batch).await {
            Ok(applied) => {
                self.head().committed(&taken, batch.last());
                Ok(applied)
            }
            Err(e) => {
                // Records chained behind ours while the transaction ran are chained again.
                self.head().restore(taken);
                Err(e)
            }
        }
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

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;
