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
mod tests {
    use super::*;

    fn uid(u: u32) -> CallerKey {
        CallerKey::Uid(u)
    }

    fn tracker(total: usize, per_uid: usize) -> Arc<Tracker> {
        Tracker::new(ConnLimits {
            max_total: total,
            max_per_uid: per_uid,
            idle_timeout: Duration::from_secs(10),
        })
    }

    /// An activity handle that has seen a request: a real adapter fed a HEADERS frame.
    fn busy() -> Activity {
        use tokio::io::AsyncReadExt;
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // An empty HEADERS frame on stream 1 with END_HEADERS (an empty block decodes fine).
        bytes.extend_from_slice(&[0, 0, 0, 0x1, 0x4, 0, 0, 0, 1]);
        let mut fix = super::super::authority::AuthorityFix::new(std::io::Cursor::new(bytes));
        let activity = fix.activity();
        assert!(!activity.request_seen());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut buf = vec![0u8; 256];
            while let Ok(n) = fix.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        assert!(activity.request_seen());
        activity
    }

    #[test]
    fn total_cap_evicts_the_oldest_idle_connection() {
        let t = tracker(3, 3);
        let a = t.admit(uid(1), Activity::default()).unwrap();
        let b = t.admit(uid(2), busy()).unwrap();
        let c = t.admit(uid(3), Activity::default()).unwrap();
        let d = t.admit(uid(4), Activity::default()).unwrap();
        assert!(a.control().is_closed(), "oldest idle one goes");
        assert!(!b.control().is_closed() && !c.control().is_closed());
        assert_eq!(t.open(), 3);
        // The evicted connection's I/O drops later: it is not counted twice.
        drop(a);
        assert_eq!(t.open(), 3);
        let e = t.admit(uid(5), Activity::default()).unwrap();
        assert!(c.control().is_closed() && !b.control().is_closed());
        drop((d, e));
        assert_eq!(t.open(), 1);
    }

    #[test]
    fn refused_only_when_every_connection_is_busy() {
        let t = tracker(2, 2);
        let _a = t.admit(uid(1), busy()).unwrap();
        let _b = t.admit(uid(2), busy()).unwrap();
        assert_eq!(
            t.admit(uid(3), Activity::default()).unwrap_err(),
            Refused::Total(2)
        );
        assert_eq!(t.open(), 2);
    }

    #[test]
    fn per_uid_cap_touches_only_that_uid() {
        let t = tracker(10, 2);
        let other = t.admit(uid(7), Activity::default()).unwrap();
        let a = t.admit(uid(1), Activity::default()).unwrap();
        let b = t.admit(uid(1), busy()).unwrap();
        let c = t.admit(uid(1), Activity::default()).unwrap();
        assert!(a.control().is_closed() && !other.control().is_closed());
        let _ = (b, c);
        let t = tracker(10, 1);
        let _busy = t.admit(uid(1), busy()).unwrap();
        let err = t.admit(uid(1), Activity::default()).unwrap_err();
        assert!(err.to_string().contains("max_connections_per_uid"), "{err}");
        t.admit(uid(2), Activity::default()).unwrap();
    }

    #[test]
    fn sweep_closes_idle_connections_after_the_timeout() {
        let t = tracker(10, 10);
        let idle = t.admit(uid(1), Activity::default()).unwrap();
        let active = t.admit(uid(1), busy()).unwrap();
        let now = Instant::now();
        let next = t.sweep_at(now);
        assert!(next > now && !idle.control().is_closed());
        t.sweep_at(now + Duration::from_secs(11));
        assert!(idle.control().is_closed());
        assert!(!active.control().is_closed());
        assert_eq!(t.open(), 1);
    }

    #[test]
    fn a_connection_without_open_calls_is_idle_again_after_the_timeout() {
        let t = tracker(10, 10);
        let conn = t.admit(uid(1), busy()).unwrap();
        let watching = t.admit(uid(1), busy()).unwrap();
        let guard = conn.calls().open();
        let _watch = watching.calls().open();
        let now = Instant::now();
        t.sweep_at(now + Duration::from_secs(60));
        assert!(!conn.control().is_closed() && !watching.control().is_closed());
        // The call ends; the connection stays open for idle_timeout, then goes.
        drop(guard);
        let now = Instant::now();
        t.sweep_at(now + Duration::from_secs(5));
        assert!(!conn.control().is_closed());
        t.sweep_at(now + Duration::from_secs(11));
        assert!(
            conn.control().is_closed(),
            "a connection with no call was kept"
        );
        assert!(
            !watching.control().is_closed(),
            "a connection with a watch was closed"
        );
        assert_eq!(t.open(), 1);
    }

    #[test]
    fn a_connection_that_sent_headers_but_holds_no_call_is_swept() {
        // The first request was seen, but no call is open (e.g. it was refused or reset).
        let t = tracker(10, 10);
        let conn = t.admit(uid(1), busy()).unwrap();
        let now = Instant::now();
        t.sweep_at(now);
        t.sweep_at(now + Duration::from_secs(11));
        assert!(conn.control().is_closed());
    }

    #[test]
    fn at_the_per_uid_cap_a_quiet_connection_of_that_uid_is_evicted() {
        let t = Tracker::new(ConnLimits {
            max_total: 10,
            max_per_uid: 2,
            idle_timeout: Duration::from_millis(100),
        });
        let quiet = t.admit(uid(1), busy()).unwrap();
        drop(quiet.calls().open());
        let watching = t.admit(uid(1), busy()).unwrap();
        let _watch = watching.calls().open();
        let other = t.admit(uid(2), busy()).unwrap();
        drop(other.calls().open());
        // Too early: the quiet one has not been quiet for idle_timeout.
        assert!(t.admit(uid(1), Activity::default()).is_err());
        std::thread::sleep(Duration::from_millis(150));
        let _new = t.admit(uid(1), Activity::default()).unwrap();
        assert!(quiet.control().is_closed());
        assert!(!watching.control().is_closed() && !other.control().is_closed());
    }

    #[test]
    fn pods_sharing_a_uid_have_their_own_caps() {
        let t = tracker(10, 1);
        let _a = t.admit(CallerKey::Pod("a".into()), busy()).unwrap();
        let _b = t.admit(CallerKey::Pod("b".into()), busy()).unwrap();
        let err = t.admit(CallerKey::Pod("a".into()), busy()).unwrap_err();
        assert!(err.to_string().contains("pod a"), "{err}");
    }
}
