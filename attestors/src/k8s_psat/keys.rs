//! The issuer keys of one OIDC-discovery cluster, cached so that attestation attempts do not
//! make the server fetch: a key set is fresh for `ttl`; an unknown `kid` or a stale set
//! triggers a refresh, but at most one fetch attempt starts per `refresh_interval` (success or
//! failure), and concurrent attempts wait for the fetch in flight instead of starting their
//! own. A failed refresh keeps serving the previous set for up to [`STALE_GRACE`] past its TTL.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::PsatError;

/// How long past its TTL a key set stays usable while refreshes fail.
pub const STALE_GRACE: Duration = Duration::from_secs(3600);
/// Longest an attempt waits for a fetch another attempt has in flight.
const FETCH_WAIT: Duration = Duration::from_secs(15);
/// Most attempts waiting (each on a blocking thread) for a fetch in flight; more, or any
/// while a usable key set is cached, are answered from the cache at once.
pub const MAX_WAITERS: usize = 32;

/// Keys by `kid`, as SubjectPublicKeyInfo DER.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet(Vec<(String, Vec<u8>)>);

impl KeySet {
    /// The usable keys of a JWKS document (entries without `kid` or of unsupported types are
    /// skipped); an error if none is left.
    pub fn from_jwks(jwks: &Value) -> Result<Self, String> {
        let keys: Vec<_> = jwks["keys"]
            .as_array()
            .ok_or("the JWKS has no \"keys\" array")?
            .iter()
            .filter_map(|k| {
                Some((
                    k["kid"].as_str()?.to_string(),
                    continuity_common::jwk::to_spki(k).ok()?,
                ))
            })
            .collect();
        if keys.is_empty() {
            return Err("the JWKS has no usable key (EC P-256/P-384 or RSA with a kid)".into());
        }
        Ok(Self(keys))
    }

    /// The `(kid, SubjectPublicKeyInfo)` pairs.
    pub fn into_pairs(self) -> Vec<(String, Vec<u8>)> {
        self.0
    }

    /// The key named `kid`.
    pub fn get(&self, kid: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k == kid)
            .map(|(_, s)| s.as_slice())
    }
}

/// The cache (see the module docs).
#[derive(Debug)]
pub struct KeyCache {
    ttl: Duration,
    refresh_interval: Duration,
    state: Mutex<State>,
    fetched: Condvar,
}

#[derive(Debug, Default)]
struct State {
    keys: Option<(KeySet, Instant)>,
    last_attempt: Option<Instant>,
    in_flight: bool,
    waiters: usize,
    last_error: Option<String>,
}

impl KeyCache {
    /// An empty cache.
    pub fn new(ttl: Duration, refresh_interval: Duration) -> Self {
        Self {
            ttl,
            refresh_interval,
            state: Mutex::new(State::default()),
            fetched: Condvar::new(),
        }
    }

    /// The key `kid` at `now`, calling `fetch` (at most once, and only if the rate allows)
    /// when the cached set is missing, stale, or does not have it.
    pub fn key(
        &self,
        kid: &str,
        now: Instant,
        fetch: impl FnOnce() -> Result<KeySet, PsatError>,
    ) -> Result<Vec<u8>, PsatError> {
        let mut fetch = Some(fetch);
        let deadline = Instant::now() + FETCH_WAIT;
        let mut st = self.lock();
        loop {
            let age = st
                .keys
                .as_ref()
                .map(|(_, at)| now.saturating_duration_since(*at));
            if let (Some(age), Some((keys, _))) = (age, &st.keys)
                && age < self.ttl
                && let Some(k) = keys.get(kid)
            {
                return Ok(k.to_vec());
            }
            // Waiting holds a blocking thread, and any junk token with a fresh `kid` gets
            // here: wait only when there is nothing usable to answer from, and only a few.
            let usable = age.is_some_and(|a| a < self.ttl.saturating_add(STALE_GRACE));
            if st.in_flight && !usable && st.waiters < MAX_WAITERS {
                let left = deadline.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    st.waiters += 1;
                    st = self
                        .fetched
                        .wait_timeout(st, left)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                    st.waiters -= 1;
                    continue;
                }
            }
            let due = st
                .last_attempt
                .is_none_or(|t| now.saturating_duration_since(t) >= self.refresh_interval);
            if !st.in_flight
                && due
                && let Some(f) = fetch.take()
            {
                st.in_flight = true;
                st.last_attempt = Some(now);
                drop(st);
                let r = f();
                st = self.lock();
                st.in_flight = false;
                match r {
                    Ok(keys) => {
                        st.keys = Some((keys, now));
                        st.last_error = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "k8s_psat: fetching the issuer keys failed");
                        st.last_error = Some(e.to_string());
                    }
                }
                self.fetched.notify_all();
                continue;
            }
            return self.answer(&st, kid, age);
        }
    }

    /// The answer from the cached set alone (no fetch allowed now).
    fn answer(&self, st: &State, kid: &str, age: Option<Duration>) -> Result<Vec<u8>, PsatError> {
        match (&st.keys, age) {
            (Some((keys, _)), Some(age)) if age < self.ttl.saturating_add(STALE_GRACE) => {
                keys.get(kid).map(<[u8]>::to_vec).ok_or_else(|| {
                    PsatError::Token(format!(
                        "unknown key id (kid) {kid:?}: not in the issuer's keys (refreshed at most every {}s)",
                        self.refresh_interval.as_secs()
                    ))
                })
            }
            _ => Err(PsatError::Validator(format!(
                "no usable issuer keys (next fetch within {}s): {}",
                self.refresh_interval.as_secs(),
                st.last_error.as_deref().unwrap_or("a fetch is under way")
            ))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain data updated in one step: a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn set(kid: &str) -> KeySet {
        KeySet(vec![(kid.into(), kid.as_bytes().to_vec())])
    }

    #[test]
    fn unknown_kids_refresh_at_most_once_per_interval() {
        let cache = KeyCache::new(Duration::from_secs(300), Duration::from_secs(30));
        let t0 = Instant::now();
        let fetches = AtomicUsize::new(0);
        let fetch = |kid: &'static str| {
            let fetches = &fetches;
            move || {
                fetches.fetch_add(1, Ordering::SeqCst);
                Ok(set(kid))
            }
        };
        assert_eq!(cache.key("a", t0, fetch("a")).unwrap(), b"a");
        for i in 0..100 {
            let e = cache
                .key(&format!("junk{i}"), t0 + Duration::from_secs(1), fetch("a"))
                .unwrap_err();
            assert!(e.to_string().contains("unknown key id"), "{e}");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // The issuer rotated to "b": picked up once the interval has passed.
        assert!(
            cache
                .key("b", t0 + Duration::from_secs(29), fetch("b"))
                .is_err()
        );
        assert_eq!(
            cache
                .key("b", t0 + Duration::from_secs(31), fetch("b"))
                .unwrap(),
            b"b"
        );
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failed_refresh_keeps_the_cached_keys_until_the_grace_ends() {
        let cache = KeyCache::new(Duration::from_secs(300), Duration::from_secs(30));
        let t0 = Instant::now();
        cache.key("a", t0, || Ok(set("a"))).unwrap();
        let down = || Err(PsatError::Validator("issuer down".into()));
        // Stale, the refresh fails: the old key still validates.
        let stale = t0 + Duration::from_secs(400);
        assert_eq!(cache.key("a", stale, down).unwrap(), b"a");
        // Past the grace, it does not.
        let gone = t0 + Duration::from_secs(300) + STALE_GRACE + Duration::from_secs(60);
        let e = cache.key("a", gone, down).unwrap_err();
        assert!(matches!(e, PsatError::Validator(_)), "{e}");
        assert!(e.to_string().contains("issuer down"), "{e}");
    }

    #[test]
    fn a_failed_first_fetch_is_not_retried_within_the_interval() {
        let cache = KeyCache::new(Duration::from_secs(300), Duration::from_secs(30));
        let t0 = Instant::now();
        let fetches = AtomicUsize::new(0);
        for s in 0..20 {
            let r = cache.key("a", t0 + Duration::from_secs(s), || {
                fetches.fetch_add(1, Ordering::SeqCst);
                Err(PsatError::Validator("issuer down".into()))
            });
            assert!(matches!(r, Err(PsatError::Validator(_))));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    /// A fetch in flight that only ends when told to.
    fn blocked_fetch(
        cache: &KeyCache,
        kid: &'static str,
        now: Instant,
        release: std::sync::mpsc::Receiver<()>,
        started: std::sync::mpsc::Sender<()>,
    ) -> Result<Vec<u8>, PsatError> {
        cache.key(kid, now, move || {
            let _ = started.send(());
            let _ = release.recv_timeout(Duration::from_secs(60));
            Ok(set(kid))
        })
    }

    #[test]
    fn attempts_do_not_wait_on_a_fetch_in_flight_when_keys_are_cached() {
        let cache = KeyCache::new(Duration::from_secs(300), Duration::from_secs(30));
        let t0 = Instant::now();
        cache.key("a", t0, || Ok(set("a"))).unwrap();
        let later = t0 + Duration::from_secs(31);
        let (release_tx, release_rx) = std::sync::mpsc::channel();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            // An unknown kid refreshes; the issuer is slow.
            let fetcher = s.spawn(|| blocked_fetch(&cache, "b", later, release_rx, started_tx));
            started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            // Junk kids and the cached kid are answered at once, not after the fetch.
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            for kid in ["junk1", "junk2", "a"] {
                let (cache, done_tx) = (&cache, done_tx.clone());
                s.spawn(move || done_tx.send((kid, cache.key(kid, later, || unreachable!()))));
            }
            for _ in 0..3 {
                let (kid, r) = done_rx
                    .recv_timeout(Duration::from_secs(5))
                    .expect("an attempt waited for the fetch in flight");
                match kid {
                    "a" => assert_eq!(r.unwrap(), b"a"),
                    _ => assert!(r.unwrap_err().to_string().contains("unknown key id")),
                }
            }
            release_tx.send(()).unwrap();
            assert_eq!(fetcher.join().unwrap().unwrap(), b"b");
        });
    }

    #[test]
    fn at_most_max_waiters_wait_for_the_first_fetch() {
        let cache = KeyCache::new(Duration::from_secs(300), Duration::from_secs(30));
        let now = Instant::now();
        let (release_tx, release_rx) = std::sync::mpsc::channel();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let fetcher = s.spawn(|| blocked_fetch(&cache, "a", now, release_rx, started_tx));
            started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let extra = 8;
            for _ in 0..MAX_WAITERS + extra {
                let (cache, done_tx) = (&cache, done_tx.clone());
                s.spawn(move || done_tx.send(cache.key("a", now, || unreachable!())));
            }
            // Those beyond the cap are refused at once (retry), not parked on a thread.
            for _ in 0..extra {
                let r = done_rx
                    .recv_timeout(Duration::from_secs(5))
                    .expect("more than MAX_WAITERS attempts waited");
                assert!(matches!(r, Err(PsatError::Validator(_))), "{r:?}");
            }
            release_tx.send(()).unwrap();
            for _ in 0..MAX_WAITERS {
                let r = done_rx.recv_timeout(Duration::from_secs(20)).unwrap();
                assert_eq!(r.unwrap(), b"a");
            }
            assert_eq!(fetcher.join().unwrap().unwrap(), b"a");
        });
    }

    #[test]
    fn concurrent_attempts_share_one_fetch() {
        let cache = KeyCache::new(Duration::from_secs(300), Duration::from_secs(30));
        let fetches = AtomicUsize::new(0);
        let now = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    let k = cache.key("a", now, || {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(200));
                        Ok(set("a"))
                    });
                    assert_eq!(k.unwrap(), b"a");
                });
            }
        });
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }
}
