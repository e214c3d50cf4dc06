//! The audit log: append-only, keyed-hash-chained records of admin actions and key uses — who,
//! what, which key version, the result; never key material or plaintext.
//!
//! Each record's hash is HMAC-SHA256 under the key manager's `audit-mac` key over a canonical
//! encoding of the record and the previous hash ([`chain`]), so a datastore writer, who never
//! holds the key, cannot edit, insert or reorder records undetected. Sequence numbers and the
//! head come from the datastore, read in each append's transaction ([`AuditStore`]), so
//! several servers can share one log. Signed [`checkpoint`]s of the head, kept outside the
//! datastore, show a tail cut back together with the stored head. [`verify`] names what it
//! finds.
//!
//! Upgrade from the plain SHA-256 chain: the old records are kept as they are; at the first
//! start with the key, the plain chain is verified and an anchor record (`audit.keyed`, saying
//! what the check found) is appended with the keyed hash. Its HMAC covers the last plain hash,
//! so the old records cannot be changed afterwards either; `audit verify` checks records
//! before the anchor as plain SHA-256 and every later one as keyed. A log that holds no keyed
//! record although checkpoints exist was rewritten: it is not anchored again.

use std::collections::VecDeque;
use std::sync::Arc;

use continuity_common::Clock;

use crate::datastore::{Applied, AuditRecord, AuditStore, StoreError, Write};
use crate::keys::MacKey;

pub mod chain;
pub mod checkpoint;
mod integrity;
pub mod verify;

pub use chain::AUDIT_MAC_KEY;
use chain::KeyedChain;
pub use checkpoint::{CHECKPOINT_KEY, Checkpoint, CheckpointError, Checkpoints};
pub use integrity::{ExportedCheckpoint, checkpoint_job};
pub use verify::{Finding, FindingKind, Verification};

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
/// every key use queued so far ([`Audit::record`]) and commits them in one transaction, wakes
/// each of their callers with the result, and goes on while jobs are queued. An admin write
/// ([`Audit::commit`]) is its own transaction (its write and its records, all or none), in
/// queue order with the key uses around it. Records are numbered and chained inside their
/// transaction, after the head the datastore holds, so chain order is commit order, a failed
/// batch leaves no trace, and a commit whose outcome was lost cannot leave this server on a
/// stale head. The writer is a task of its own, so a caller that gives up waiting cannot
/// strand the callers batched with it.
pub struct Audit {
    backend: Arc<dyn AuditStore>,
    clock: Arc<dyn Clock>,
    chain: Arc<KeyedChain>,
    checkpoints: Option<Arc<Checkpoints>>,
    state: Arc<std::sync::Mutex<State>>,
}

/// The queue, shared with the writer task.
struct State {
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

/// A record not yet numbered nor chained (the datastore's append does both).
fn unlinked(time: i64, ev: AuditEvent) -> AuditRecord {
    AuditRecord {
        seq: 0,
        time,
        actor: ev.actor,
        action: ev.action,
        target: ev.target,
        key_version: ev.key_version,
        result: ev.result,
        prev_hash: String::new(),
        hash: String::new(),
    }
}

impl State {
    /// The next batch; None (and the writer stops) when nothing is queued.
    fn take(&mut self) -> Option<Batch> {
        let Some(front) = self.queue.pop_front() else {
            self.writing = false;
            return None;
        };
        match front {
            Job::Admin {
                time,
                writes,
                events,
                done,
            } => {
                let records = events.into_iter().map(|ev| unlinked(time, ev)).collect();
                Some(Batch::Admin(writes, records, done))
            }
            Job::Use { time, event, done } => {
                let mut replies = vec![done];
                let mut records = vec![unlinked(time, event)];
                while records.len() < MAX_BATCH
                    && matches!(self.queue.front(), Some(Job::Use { .. }))
                {
                    let Some(Job::Use { time, event, done }) = self.queue.pop_front() else {
                        break;
                    };
                    records.push(unlinked(time, event));
                    replies.push(done);
                }
                Some(Batch::Uses(records, replies))
            }
        }
    }
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
    }
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
async fn write_queued(
    backend: Arc<dyn AuditStore>,
    chain: Arc<KeyedChain>,
    state: Arc<std::sync::Mutex<State>>,
) {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let mut stopped = Stopped(Some(state.clone()));
    loop {
        let Some(batch) = lock().take() else {
            // take() cleared `writing` under the lock: a new caller starts a new writer.
            stopped.0 = None;
            return;
        };
        match batch {
            Batch::Uses(mut records, replies) => {
                let result = backend.append_audit_batch(&mut records, &*chain).await;
                answer(replies, result);
            }
            Batch::Admin(writes, mut records, done) => {
                let result = backend.apply(&writes, &mut records, &*chain).await;
                let _ = done.send(result);
            }
        }
    }
}

impl Audit {
    /// Opens the log, keyed with `mac` (the key manager's [`AUDIT_MAC_KEY`]); `checkpoints`
    /// (None in tests without a data_dir) are written and checked outside the datastore. A
    /// log still on the plain SHA-256 chain is anchored once (see the module doc).
    pub async fn load(
        backend: Arc<dyn AuditStore>,
        clock: Arc<dyn Clock>,
        mac: Arc<dyn MacKey>,
        checkpoints: Option<Checkpoints>,
    ) -> Result<Arc<Self>, StoreError> {
        let audit = Arc::new(Self {
            backend,
            clock,
            chain: Arc::new(KeyedChain::new(mac)),
            checkpoints: checkpoints.map(Arc::new),
            state: Arc::new(std::sync::Mutex::new(State {
                queue: VecDeque::new(),
                writing: false,
            })),
        });
        audit.anchor_plain_chain().await?;
        Ok(audit)
    }

    /// A log for unit tests: keyed with a fixed software key, no checkpoints.
    #[cfg(test)]
    pub(crate) async fn scratch(backend: Arc<dyn AuditStore>, clock: Arc<dyn Clock>) -> Arc<Self> {
        let mac = Arc::new(crate::keys::SoftwareMac::new(&[7; 32]));
        Self::load(backend, clock, mac, None)
            .await
            .unwrap_or_else(|e| panic!("scratch audit log: {e}"))
    }

    /// Queues `job` and starts the writer unless one is running.
    fn enqueue(&self, job: Job) {
        let start = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.queue.push_back(job);
            !std::mem::replace(&mut st.writing, true)
        };
        if start {
            tokio::spawn(write_queued(
                self.backend.clone(),
                self.chain.clone(),
                self.state.clone(),
            ));
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
            return self.backend.apply(writes, &mut [], &*self.chain).await;
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
        let keep = usize::try_from(limit).unwrap_or(0);
        if keep > 0 && all.len() > keep {
            all.drain(..all.len() - keep);
        }
        Ok(all)
    }
}

/// The writer task ended without answering (the runtime is shutting down).
fn writer_gone() -> StoreError {
    StoreError::Io("the audit log writer stopped before committing".into())
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;
