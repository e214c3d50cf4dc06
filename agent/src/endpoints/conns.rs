//! Caps on Workload API connections: in total, per workload (its pod if it runs in one, else
//! its uid), and an idle timeout.
//!
//! Every accepted connection takes a [`Slot`] from the [`Tracker`]; the slot is given back
//! when the connection's I/O is dropped, or at once when the tracker closes it. A connection is
//! *idle* when it has not sent its first request (cheap to kill: nobody waits on it), or when
//! it has had no call open for `idle_timeout` (each call holds a [`StreamGuard`] while its
//! handler runs or its response stream lives). At a cap the oldest idle connection in that
//! cap's scope (the workload's, or all) is closed to make room, so a flood of idle connections
//! never locks out a real client; only when every connection in scope is busy is the new one
//! refused. Idle connections are closed at `idle_timeout` by one sweeper task.
//!
//! Invariant: `total` and the per-scope counts equal the number of unreleased slots; every
//! unreleased connection without an open call is in the idle index (by `since`, oldest
//! first) and its scope's idle set, and no connection with an open call is.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

use super::authority::Activity;
use crate::limits::CallerKey;

/// The uid counted for a connection whose peer credentials could not be read.
pub const UNKNOWN_UID: u32 = u32::MAX;

/// The limits the tracker enforces.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open connections in total.
    pub max_total: usize,
    /// Open connections per workload (pod, else uid).
    pub max_per_uid: usize,
    /// Time a connection may take to send its first request, or stay without an open call.
    pub idle_timeout: Duration,
}

/// Why a new connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Every connection is busy and there are `max_connections` of them.
    #[error("{0} Workload API connections are open and all busy (workload_api.max_connections)")]
    Total(usize),
    /// This workload's connections are all busy and at the per-uid cap.
    #[error(
        "{who} has {max} Workload API connections open and all busy (workload_api.max_connections_per_uid)"
    )]
    PerUid {
        /// The workload (pod or uid).
        who: CallerKey,
        /// The cap.
        max: usize,
    },
}

/// Shared between a connection's I/O and the tracker: lets the tracker close it.
#[derive(Debug)]
pub struct Control {
    id: u64,
    scope: CallerKey,
    closed: AtomicBool,
    released: AtomicBool,
    waker: AtomicWaker,
}

impl Control {
    /// True once the tracker closed this connection (its reads then return EOF).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Registers the task to wake when the connection is closed.
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// One connection's place under the caps; given back on drop.
#[derive(Debug)]
pub struct Slot {
    tracker: Arc<Tracker>,
    control: Arc<Control>,
}

impl Slot {
    /// The handle the connection's I/O checks.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// A handle calls on this connection take [`StreamGuard`]s from.
    pub fn calls(&self) -> ConnCalls {
        ConnCalls {
            tracker: self.tracker.clone(),
            control: self.control.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.tracker.lock();
        inner.release(&self.control);
    }
}

/// Lets the calls of one connection mark it busy (cloned into each request's extensions).
#[derive(Debug, Clone)]
pub struct ConnCalls {
    tracker: Arc<Tracker>,
    control: Arc<Control>,
}

impl ConnCalls {
    /// Marks one call open until the guard drops.
    pub fn open(&self) -> StreamGuard {
        self.tracker.lock().call_opened(&self.control);
        StreamGuard(self.clone())
    }
}

/// One open call on a connection: while any is held the connection is busy, never idle.
#[derive(Debug)]
pub struct StreamGuard(ConnCalls);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0
            .tracker
            .lock()
            .call_closed(&self.0.control, Instant::now());
    }
}

/// Counts connections and closes idle ones.
#[derive(Debug)]
pub struct Tracker {
    limits: ConnLimits,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    next_seq: u64,
    total: usize,
    scopes: HashMap<CallerKey, ScopeConns>,
    /// Open calls and idle-index position of each unreleased connection.
    conns: HashMap<u64, ConnState>,
    /// Connections without an open call, by when they became so (oldest first).
    idle: BTreeMap<u64, IdleConn>,
    refused: u64,
    last_refusal_log: Option<Instant>,
}

#[derive(Debug, Default)]
struct ScopeConns {
    count: usize,
    idle: BTreeSet<u64>,
}

#[derive(Debug, Default)]
struct ConnState {
    calls: usize,
    seq: Option<u64>,
}

#[derive(Debug)]
struct IdleConn {
    since: Instant,
    /// Some until the connection is seen to have sent a request: until then it is evictable
    /// at once; after, only once it has had no call for `idle_timeout`.
    fresh: Option<Activity>,
    control: Arc<Control>,
}

impl Inner {
    /// Gives a slot back (once) and forgets the connection.
    fn release(&mut self, c: &Control) {
        if c.released.swap(true, Ordering::AcqRel) {
            return;
        }
        self.total = self.total.saturating_sub(1);
        self.unindex(c);
        self.conns.remove(&c.id);
        if let Some(u) = self.scopes.get_mut(&c.scope) {
            u.count = u.count.saturating_sub(1);
            if u.count == 0 {
                self.scopes.remove(&c.scope);
            }
        }
    }

    /// Adds a connection to the idle indexes as idle since `since`.
    fn index(&mut self, control: &Arc<Control>, since: Instant, fresh: Option<Activity>) {
        self.unindex(control);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.conns.entry(control.id).or_default().seq = Some(seq);
        self.scopes
            .entry(control.scope.clone())
            .or_default()
            .idle
            .insert(seq);
        self.idle.insert(
            seq,
            IdleConn {
                since,
                fresh,
                control: control.clone(),
            },
        );
    }

    /// Takes a connection out of the idle indexes.
    fn unindex(&mut self, c: &Control) {
        let Some(seq) = self.conns.get_mut(&c.id).and_then(|s| s.seq.take()) else {
            return;
        };
        self.idle.remove(&seq);
        if let Some(u) = self.scopes.get_mut(&c.scope) {
            u.idle.remove(&seq);
        }
    }

    fn call_opened(&mut self, c: &Arc<Control>) {
        if c.released.load(Ordering::Acquire) {
            return;
        }
        self.unindex(c);
        if let Some(s) = self.conns.get_mut(&c.id) {
            s.calls += 1;
        }
    }

    fn call_closed(&mut self, c: &Arc<Control>, now: Instant) {
        let Some(s) = self.conns.get_mut(&c.id) else {
            return;
        };
        s.calls = s.calls.saturating_sub(1);
        if s.calls == 0 && !c.released.load(Ordering::Acquire) {
            self.index(c, now, None);
        }
    }

    /// Closes the oldest idle connection (of `scope`, or of anyone) that may go now; false if
    /// none may. A connection that has sent a request may go once it had no call for `timeout`.
    fn evict_oldest_idle(
        &mut self,
        scope: Option<&CallerKey>,
        now: Instant,
        timeout: Duration,
    ) -> bool {
        let seqs: Vec<u64> = match scope {
            Some(k) => self
                .scopes
                .get(k)
                .map(|u| u.idle.iter().copied().collect())
                .unwrap_or_default(),
            None => self.idle.keys().copied().collect(),
        };
        let mut quiet = None;
        for seq in seqs {
            let Some(conn) = self.idle.get(&seq) else {
                continue;
            };
            let control = conn.control.clone();
            match &conn.fresh {
                Some(a) if !a.request_seen() => {
                    control.close();
                    self.release(&control);
                    return true;
                }
                // It sent a request (not one we saw open, or it ended): idle from now.
                Some(_) => self.index(&control, now, None),
                None if quiet.is_none() && conn.since + timeout <= now => quiet = Some(control),
                None => {}
            }
        }
        let Some(control) = quiet else {
            return false;
        };
        control.close();
        self.release(&control);
        true
    }
}

impl Tracker {
    /// A tracker enforcing `limits`.
    pub fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot for a new connection of `scope`, closing an idle one if a cap is reached.
    pub fn admit(self: &Arc<Self>, scope: CallerKey, activity: Activity) -> Result<Slot, Refused> {
        let now = Instant::now();
        let timeout = self.limits.idle_timeout;
        let mut inner = self.lock();
        let at_scope_cap = inner
            .scopes
            .get(&scope)
            .is_some_and(|u| u.count >= self.limits.max_per_uid);
        if at_scope_cap && !inner.evict_oldest_idle(Some(&scope), now, timeout) {
            return Err(self.refused(
                &mut inner,
                Refused::PerUid {
                    who: scope,
                    max: self.limits.max_per_uid,
                },
            ));
        }
        if inner.total >= self.limits.max_total && !inner.evict_oldest_idle(None, now, timeout) {
            return Err(self.refused(&mut inner, Refused::Total(self.limits.max_total)));
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let control = Arc::new(Control {
            id,
            scope: scope.clone(),
            closed: AtomicBool::new(false),
            released: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        inner.total += 1;
        inner.scopes.entry(scope).or_default().count += 1;
        inner.conns.insert(id, ConnState::default());
        inner.index(&control, now, Some(activity));
        Ok(Slot {
            tracker: self.clone(),
            control,
        })
    }

    /// Closes the oldest idle connection, if any (to free a file descriptor).
    pub fn evict_oldest_idle(&self) -> bool {
        self.lock()
            .evict_oldest_idle(None, Instant::now(), self.limits.idle_timeout)
    }

    /// Open connections right now.
    pub fn open(&self) -> usize {
        self.lock().total
    }

    /// Logs a refusal at most every 10 s (with how many since the last line).
    fn refused(&self, inner: &mut Inner, why: Refused) -> Refused {
        inner.refused += 1;
        let now = Instant::now();
        if inner
            .last_refusal_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            tracing::warn!(reason = %why, refused = inner.refused, "Workload API connection refused");
            inner.refused = 0;
            inner.last_refusal_log = Some(now);
        }
        why
    }

    /// Closes connections idle for `idle_timeout` (no first request, or no open call); returns
    /// when the next one is due.
    pub fn sweep_at(&self, now: Instant) -> Instant {
        let mut inner = self.lock();
        let mut closed = 0usize;
        let next = loop {
            let Some((_, conn)) = inner.idle.first_key_value() else {
                break now + self.limits.idle_timeout;
            };
            let (control, deadline) = (conn.control.clone(), conn.since + self.limits.idle_timeout);
            if conn.fresh.as_ref().is_some_and(Activity::request_seen) {
                // It sent a request: from now on idle only without calls.
                inner.index(&control, now, None);
            } else if deadline <= now {
                control.close();
                inner.release(&control);
                closed += 1;
            } else {
                break deadline;
            }
        };
        if closed > 0 {
            tracing::debug!(
                closed,
                "closed idle Workload API connections (no request, or no open call, within idle_timeout)"
            );
        }
        next
    }

    /// Runs [`Tracker::sweep_at`] forever (one task per listener).
    pub async fn sweep(self: Arc<Self>) {
        loop {
            let next = self.sweep_at(Instant::now());
            tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
        }
    }
}

/// Raises this process's RLIMIT_NOFILE soft limit to its hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let cur = getrlimit(Resource::Nofile);
    // An unlimited hard limit still stops at the kernel's nr_open.
    let hard = cur.maximum.or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })?;
    if cur.current.is_some_and(|soft| soft >= hard) {
        return cur.current;
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: cur.maximum,
        },
    ) {
        Ok(()) => Some(hard),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit (RLIMIT_NOFILE)");
            cur.current
        }
    }
}

#[cfg(test)]
mod tests;
