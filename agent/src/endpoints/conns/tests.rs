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
