//! The audit log: append-only, hash-chained records of admin actions and key uses — who,
//! what, which key version, the result; never key material or plaintext. `verify` recomputes
//! the chain and names the first record that was edited, deleted or moved.

use std::collections::VecDeque;
use std::sync::Arc;

use continuity_common::Clock;

use crate::datastore::{Applied, AuditRecord, AuditStore, StoreError, Write};

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

/// Most key-use records committed in one transaction.
const MAX_BATCH: usize = 512;

/// The audit log.
///
/// Every append is durable before its caller returns, and appends are group-committed: a
/// caller queues its job and, if no commit is in flight, starts the writer; the writer takes
/// every key use queued so far ([`Audit::record`]), chains and commits them in one
/// transaction, wakes each of their callers with the result, and goes on while jobs are
/// queued. An admin write ([`Audit::commit`]) is its own transaction (its write and its
/// records, all or none), in queue order with the key uses around it. Records are chained
/// when their batch is taken, from the last committed record, so hash-chain order is commit
/// order and a failed batch leaves no trace. The writer is a task of its own, so a caller
/// that gives up waiting cannot strand the callers batched with it.
pub struct Audit {
    backend: Arc<dyn AuditStore>,
    clock: Arc<dyn Clock>,
    state: Arc<std::sync::Mutex<State>>,
}

/// The queue and the chain head, shared with the writer task.
struct State {
    /// seq and hash of the last committed record.
    seq: i64,
    hash: String,
    /// Jobs not yet taken by the writer, in arrival order.
    queue: VecDeque<Job>,
    /// A writer task is running (it clears this when it finds the queue empty).
    writing: bool,
}

type Reply<T> = tokio::sync::oneshot::Sender<Result<T, StoreError>>;

enum Job {
    /// One key use.
    Use {
        time: i64,
        event: AuditEvent,
        done: Reply<()>,
    },
    /// An admin write with its records.
    Admin {
        time: i64,
        writes: Vec<Write>,
        events: Vec<AuditEvent>,
        done: Reply<Vec<Applied>>,
    },
}

/// What the writer commits next: key uses, or one admin write.
enum Batch {
    Uses(Vec<AuditRecord>, Vec<Reply<()>>),
    Admin(Vec<Write>, Vec<AuditRecord>, Reply<Vec<Applied>>),
}

impl State {
    fn chain(&self, prev: Option<&AuditRecord>, time: i64, ev: &AuditEvent) -> AuditRecord {
        let (seq, prev_hash) = prev.map_or((self.seq, &self.hash), |r| (r.seq, &r.hash));
        let mut r = AuditRecord {
            seq: seq + 1,
            time,
            actor: ev.actor.clone(),
            action: ev.action.clone(),
            target: ev.target.clone(),
            key_version: ev.key_version,
            result: ev.result.clone(),
            prev_hash: prev_hash.clone(),
            hash: String::new(),
        };
        r.hash = chain_hash(&r);
        r
    }

    /// The next batch, chained from the last committed record; None (and the writer stops)
    /// when nothing is queued.
    fn take(&mut self) -> Option<Batch> {
        let Some(front) = self.queue.pop_front() else {
            self.writing = false;
            return None;
        };
        let mut records: Vec<AuditRecord> = Vec::new();
        match front {
            Job::Admin {
                time,
                writes,
                events,
                done,
            } => {
                for ev in &events {
                    let r = self.chain(records.last(), time, ev);
                    records.push(r);
                }
                Some(Batch::Admin(writes, records, done))
            }
            Job::Use { time, event, done } => {
                let mut replies = vec![done];
                records.push(self.chain(None, time, &event));
                while records.len() < MAX_BATCH
                    && matches!(self.queue.front(), Some(Job::Use { .. }))
                {
                    let Some(Job::Use { time, event, done }) = self.queue.pop_front() else {
                        break;
                    };
                    let r = self.chain(records.last(), time, &event);
                    records.push(r);
                    replies.push(done);
                }
                Some(Batch::Uses(records, replies))
            }
        }
    }

    fn committed(&mut self, records: &[AuditRecord]) {
        if let Some(last) = records.last() {
            self.seq = last.seq;
            self.hash = last.hash.clone();
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

/// A copy of `e` for another caller of the same failed batch, with the same message
/// (`Database` and `Migration` hold a `sqlx::Error`, which cannot be cloned).
fn share(e: &StoreError) -> StoreError {
    match e {
        StoreError::NotFound(s) => StoreError::NotFound(s.clone()),
        StoreError::Corrupt(s) => StoreError::Corrupt(s.clone()),
        StoreError::Io(s) => StoreError::Io(s.clone()),
        StoreError::Conflict(s) => StoreError::Conflict(s.clone()),
        StoreError::Audit(s) => StoreError::Audit(s.clone()),
        StoreError::Integrity { table, key } => StoreError::Integrity {
            table: table.clone(),
            key: key.clone(),
        },
        StoreError::MacKey(s) => StoreError::MacKey(s.clone()),
        StoreError::Database(inner) => StoreError::Io(inner.to_string()),
        StoreError::Migration { .. } => StoreError::Corrupt(e.to_string()),
    }
}

/// Armed while the writer runs: if it ends any other way (a panic, the runtime shutting
/// down), the queued jobs are dropped (their callers get an error) and the next caller
/// starts a new writer.
struct Stopped(Option<Arc<std::sync::Mutex<State>>>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            st.queue.clear();
            st.writing = false;
        }
    }
}

/// Wakes every caller of a key-use batch with its result: the first gets the error itself,
/// the others a copy.
fn answer(replies: Vec<Reply<()>>, result: Result<(), StoreError>) {
    let mut replies = replies.into_iter();
    let first = replies.next();
    for r in replies {
        let _ = r.send(result.as_ref().map(|_| ()).map_err(share));
    }
    if let Some(first) = first {
        let _ = first.send(result);
    }
}

/// The writer: commits queued batches until the queue is empty.
async fn write_queued(backend: Arc<dyn AuditStore>, state: Arc<std::sync::Mutex<State>>) {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let mut stopped = Stopped(Some(state.clone()));
    loop {
        let Some(batch) = lock().take() else {
            // take() cleared `writing` under the lock: a new caller starts a new writer.
            stopped.0 = None;
            return;
        };
        match batch {
            Batch::Uses(records, replies) => {
                let result = backend.append_audit_batch(&records).await;
                if result.is_ok() {
                    lock().committed(&records);
                }
                answer(replies, result);
            }
            Batch::Admin(writes, records, done) => {
                let result = backend.apply(&writes, &records).await;
                if result.is_ok() {
                    lock().committed(&records);
                }
                let _ = done.send(result);
            }
        }
    }
}

impl Audit {
    /// Opens the log, continuing its chain.
    pub async fn load(
        backend: Arc<dyn AuditStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, StoreError> {
        let last = backend.list_audit().await?.pop();
        let (seq, hash) = last.map(|r| (r.seq, r.hash)).unwrap_or_default();
        Ok(Arc::new(Self {
            backend,
            clock,
            state: Arc::new(std::sync::Mutex::new(State {
                seq,
                hash,
                queue: VecDeque::new(),
                writing: false,
            })),
        }))
    }

    /// Queues `job` and starts the writer unless one is running.
    fn enqueue(&self, job: Job) {
        let start = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.queue.push_back(job);
            !std::mem::replace(&mut st.writing, true)
        };
        if start {
            tokio::spawn(write_queued(self.backend.clone(), self.state.clone()));
        }
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
        let event = AuditEvent::ok(actor, action, target)
            .version(key_version)
            .result(result);
        let (done, wait) = tokio::sync::oneshot::channel();
        self.enqueue(Job::Use {
            time: self.clock.unix(),
            event,
            done,
        });
        wait.await.unwrap_or_else(|_| Err(writer_gone()))
    }

    /// Applies `writes` and appends `events` (after every key use queued before it) in one
    /// datastore transaction. On failure nothing is applied and the chain continues as if
    /// `events` had never been chained.
    pub async fn commit(
        &self,
        writes: &[Write],
        events: &[AuditEvent],
    ) -> Result<Vec<Applied>, StoreError> {
        if events.is_empty() {
            return self.backend.apply(writes, &[]).await;
        }
        let (done, wait) = tokio::sync::oneshot::channel();
        self.enqueue(Job::Admin {
            time: self.clock.unix(),
            writes: writes.to_vec(),
            events: events.to_vec(),
            done,
        });
        wait.await.unwrap_or_else(|_| Err(writer_gone()))
    }

    /// Records, oldest first; the last `limit` when limit > 0.
    pub async fn records(&self, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        let mut all = self.backend.list_audit().await?;
        if limit > 0 && all.len() as i64 > limit {
            all.drain(..all.len() - limit as usize);
        }
        Ok(all)
    }

    /// Recomputes the chain.
    pub async fn verify(&self) -> Result<Verification, StoreError> {
        let records = self.backend.list_audit().await?;
        let head = self.backend.audit_head().await?;
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

/// The writer task ended without answering (the runtime is shutting down).
fn writer_gone() -> StoreError {
    StoreError::Io("the audit log writer stopped before committing".into())
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;
