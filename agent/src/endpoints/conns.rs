//! Caps on Workload API connections: in total, per uid, and an idle timeout for connections
//! that never send a request.
//!
//! Every accepted connection takes a [`Slot`] from the [`Tracker`]; the slot is given back
//! when the connection's I/O is dropped, or at once when the tracker closes it. A connection
//! that has not sent its first HEADERS frame is *idle* (cheap to kill: nobody waits on it).
//! At a cap the oldest idle connection in that cap's scope (the uid's, or all) is closed to make
//! room, so a flood of idle connections never locks out a real client; only when every
//! connection in scope is busy is the new one refused. Idle connections are closed at
//! `idle_timeout` by one sweeper task. Invariant: `total` and the per-uid counts equal the
//! number of unreleased slots, and every idle connection is in both idle indexes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

use super::authority::Activity;

/// The uid counted for a connection whose peer credentials could not be read.
pub const UNKNOWN_UID: u32 = u32::MAX;

/// The limits the tracker enforces.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open connections in total.
    pub max_total: usize,
    /// Open connections per uid.
    pub max_per_uid: usize,
    /// Time a connection may take to send its first request.
    pub idle_timeout: Duration,
}

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Every connection is busy and there are `max_connections` of them.
    #[error("{0} Workload API connections are open and all busy (workload_api.max_connections)")]
    Total(usize),
    /// This uid's connections are all busy and at the per-uid cap.
    #[error(
        "uid {uid} has {max} Workload API connections open and all busy (workload_api.max_connections_per_uid)"
    )]
    PerUid {
        /// The uid.
        uid: u32,
        /// The cap.
        max: usize,
    },
}

/// Shared between a connection's I/O and the tracker: lets the tracker close it.
#[derive(Debug)]
pub struct Control {
    id: u64,
    uid: u32,
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
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.tracker.lock();
        inner.release(&self.control);
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
    total: usize,
    uids: HashMap<u32, UidConns>,
    /// Connections that have not sent a request yet (as far as we last looked), oldest first.
    idle: BTreeMap<u64, IdleConn>,
    refused: u64,
    last_refusal_log: Option<Instant>,
}

#[derive(Debug, Default)]
struct UidConns {
    count: usize,
    idle: BTreeSet<u64>,
}

#[derive(Debug)]
struct IdleConn {
    accepted: Instant,
    activity: Activity,
    control: Arc<Control>,
}

impl Inner {
    /// Gives a slot back (once) and forgets the connection.
    fn release(&mut self, c: &Control) {
        if c.released.swap(true, Ordering::AcqRel) {
            return;
        }
        self.total = self.total.saturating_sub(1);
        self.idle.remove(&c.id);
        if let Some(u) = self.uids.get_mut(&c.uid) {
            u.count = u.count.saturating_sub(1);
            u.idle.remove(&c.id);
            if u.count == 0 {
                self.uids.remove(&c.uid);
            }
        }
    }

    /// Forgets a connection that turned out to be busy (it stays counted).
    fn mark_busy(&mut self, id: u64, uid: u32) {
        self.idle.remove(&id);
        if let Some(u) = self.uids.get_mut(&uid) {
            u.idle.remove(&id);
        }
    }

    /// Closes the oldest idle connection (of `uid`, or of anyone); false if none is idle.
    fn evict_oldest_idle(&mut self, uid: Option<u32>) -> bool {
        loop {
            let next = match uid {
                Some(u) => self
                    .uids
                    .get(&u)
                    .and_then(|c| c.idle.first().copied())
                    .and_then(|id| self.idle.get(&id).map(|i| (id, i))),
                None => self.idle.first_key_value().map(|(id, i)| (*id, i)),
            };
            let Some((id, conn)) = next else {
                return false;
            };
            let control = conn.control.clone();
            if conn.activity.request_seen() {
                self.mark_busy(id, control.uid);
                continue;
            }
            control.close();
            self.release(&control);
            return true;
        }
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

    /// Takes a slot for a new connection of `uid`, closing an idle one if a cap is reached.
    pub fn admit(self: &Arc<Self>, uid: u32, activity: Activity) -> Result<Slot, Refused> {
        let mut inner = self.lock();
        let at_uid_cap = inner
            .uids
            .get(&uid)
            .is_some_and(|u| u.count >= self.limits.max_per_uid);
        if at_uid_cap && !inner.evict_oldest_idle(Some(uid)) {
            return Err(self.refused(
                &mut inner,
                Refused::PerUid {
                    uid,
                    max: self.limits.max_per_uid,
                },
            ));
        }
        if inner.total >= self.limits.max_total && !inner.evict_oldest_idle(None) {
            return Err(self.refused(&mut inner, Refused::Total(self.limits.max_total)));
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let control = Arc::new(Control {
            id,
            uid,
            closed: AtomicBool::new(false),
            released: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        inner.total += 1;
        let u = inner.uids.entry(uid).or_default();
        u.count += 1;
        u.idle.insert(id);
        inner.idle.insert(
            id,
            IdleConn {
                accepted: Instant::now(),
                activity,
                control: control.clone(),
            },
        );
        Ok(Slot {
            tracker: self.clone(),
            control,
        })
    }

    /// Closes the oldest idle connection, if any (to free a file descriptor).
    pub fn evict_oldest_idle(&self) -> bool {
        self.lock().evict_oldest_idle(None)
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

    /// Closes connections that have not sent a request within `idle_timeout`; returns when
    /// the next one is due. Connections found busy leave the idle index.
    pub fn sweep_at(&self, now: Instant) -> Instant {
        let mut inner = self.lock();
        let mut closed = 0usize;
        let next = loop {
            let Some((&id, conn)) = inner.idle.first_key_value() else {
                break now + self.limits.idle_timeout;
            };
            let (control, deadline) = (
                conn.control.clone(),
                conn.accepted + self.limits.idle_timeout,
            );
            if conn.activity.request_seen() {
                inner.mark_busy(id, control.uid);
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
                "closed Workload API connections that sent no request within idle_timeout"
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
        let a = t.admit(1, Activity::default()).unwrap();
        let b = t.admit(2, busy()).unwrap();
        let c = t.admit(3, Activity::default()).unwrap();
        let d = t.admit(4, Activity::default()).unwrap();
        assert!(a.control().is_closed(), "oldest idle one goes");
        assert!(!b.control().is_closed() && !c.control().is_closed());
        assert_eq!(t.open(), 3);
        // The evicted connection's I/O drops later: it is not counted twice.
        drop(a);
        assert_eq!(t.open(), 3);
        let e = t.admit(5, Activity::default()).unwrap();
        assert!(c.control().is_closed() && !b.control().is_closed());
        drop((d, e));
        assert_eq!(t.open(), 1);
    }

    #[test]
    fn refused_only_when_every_connection_is_busy() {
        let t = tracker(2, 2);
        let _a = t.admit(1, busy()).unwrap();
        let _b = t.admit(2, busy()).unwrap();
        assert_eq!(
            t.admit(3, Activity::default()).unwrap_err(),
            Refused::Total(2)
        );
        assert_eq!(t.open(), 2);
    }

    #[test]
    fn per_uid_cap_touches_only_that_uid() {
        let t = tracker(10, 2);
        let other = t.admit(7, Activity::default()).unwrap();
        let a = t.admit(1, Activity::default()).unwrap();
        let b = t.admit(1, busy()).unwrap();
        let c = t.admit(1, Activity::default()).unwrap();
        assert!(a.control().is_closed() && !other.control().is_closed());
        let _ = (b, c);
        let t = tracker(10, 1);
        let _busy = t.admit(1, busy()).unwrap();
        let err = t.admit(1, Activity::default()).unwrap_err();
        assert!(err.to_string().contains("max_connections_per_uid"), "{err}");
        t.admit(2, Activity::default()).unwrap();
    }

    #[test]
    fn sweep_closes_idle_connections_after_the_timeout() {
        let t = tracker(10, 10);
        let idle = t.admit(1, Activity::default()).unwrap();
        let active = t.admit(1, busy()).unwrap();
        let now = Instant::now();
        let next = t.sweep_at(now);
        assert!(next > now && !idle.control().is_closed());
        t.sweep_at(now + Duration::from_secs(11));
        assert!(idle.control().is_closed());
        assert!(!active.control().is_closed());
        assert_eq!(t.open(), 1);
    }
}
