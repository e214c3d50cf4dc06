//! Bounds on what one workload can make the agent hold or send on: a per-caller token bucket
//! for the calls that reach the server (the buckets are
//! [`continuity_common::ratelimit::TokenBuckets`], shared with the server; the JWT-SVID
//! cache's LRU is [`continuity_common::lru::Lru`]).
//!
//! Invariant: the limiter keeps at most [`MAX_TRACKED_CALLERS`] buckets (a full bucket is the
//! same as no bucket, so those go first).

use std::time::{Duration, Instant};

use continuity_common::ratelimit::TokenBuckets;

/// Who a rate limit applies to: its pod if the caller runs in one, else its unix uid.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CallerKey {
    /// A Kubernetes pod, by UID (`k8s:pod-uid`).
    Pod(String),
    /// A local user.
    Uid(u32),
}

impl std::fmt::Display for CallerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pod(p) => write!(f, "pod {p}"),
            Self::Uid(u) => write!(f, "uid {u}"),
        }
    }
}

/// Most callers whose buckets are kept at once.
pub const MAX_TRACKED_CALLERS: usize = 4096;

/// A call refused by the rate limiter.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "rate limit: at most {rate} calls per second (burst {burst}) from one workload reach the server \
     (workload_api.server_calls_per_second / server_calls_burst); retry in {} ms",
    retry_after.as_millis().max(1)
)]
pub struct RateLimited {
    /// Calls per second allowed.
    pub rate: f64,
    /// Burst allowed.
    pub burst: u32,
    /// When the next call would be admitted.
    pub retry_after: Duration,
}

/// A per-caller token bucket limiter ([`TokenBuckets`] keyed by [`CallerKey`]).
#[derive(Debug)]
pub struct RateLimiter(TokenBuckets<CallerKey>);

impl RateLimiter {
    /// `rate` calls per second, bursts of up to `burst` (both validated positive by the config).
    pub fn new(rate: f64, burst: u32) -> Self {
        Self::with_capacity(rate, burst, MAX_TRACKED_CALLERS)
    }

    /// Like [`RateLimiter::new`], keeping at most `max_callers` buckets.
    pub fn with_capacity(rate: f64, burst: u32, max_callers: usize) -> Self {
        Self(TokenBuckets::new(rate, burst, max_callers))
    }

    /// Takes one token for `who`, or says when to retry.
    pub fn admit(&self, who: &CallerKey) -> Result<(), RateLimited> {
        self.admit_at(who, Instant::now())
    }

    /// [`RateLimiter::admit`] at a given instant (for tests).
    pub fn admit_at(&self, who: &CallerKey, now: Instant) -> Result<(), RateLimited> {
        self.0.take_at(who, 1, now).map_err(|d| RateLimited {
            rate: self.0.rate(),
            burst: self.0.burst(),
            retry_after: d.retry_after,
        })
    }

    /// Callers with a bucket right now.
    pub fn tracked(&self) -> usize {
        self.0.tracked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let l = RateLimiter::new(2.0, 3);
        let me = CallerKey::Uid(1);
        let t0 = Instant::now();
        for _ in 0..3 {
            l.admit_at(&me, t0).unwrap();
        }
        let e = l.admit_at(&me, t0).unwrap_err();
        assert!(e.retry_after <= Duration::from_millis(500), "{e}");
        assert!(e.to_string().contains("server_calls_per_second"), "{e}");
        // Another caller has its own bucket.
        l.admit_at(&CallerKey::Pod("p".into()), t0).unwrap();
        // Half a second later one token is back, not two.
        let t1 = t0 + Duration::from_millis(500);
        l.admit_at(&me, t1).unwrap();
        assert!(l.admit_at(&me, t1).is_err());
    }

    #[test]
    fn bucket_table_is_bounded() {
        let l = RateLimiter::with_capacity(1.0, 1, 8);
        let t0 = Instant::now();
        for u in 0..10_000 {
            let _ = l.admit_at(&CallerKey::Uid(u), t0);
            assert!(l.tracked() <= 8);
        }
    }

    #[test]
    fn refilled_buckets_are_evicted_first() {
        let l = RateLimiter::with_capacity(0.1, 1, 2);
        let t0 = Instant::now();
        let (a, b, c) = (CallerKey::Uid(1), CallerKey::Uid(2), CallerKey::Uid(3));
        l.admit_at(&a, t0).unwrap();
        let later = t0 + Duration::from_secs(20);
        l.admit_at(&b, later).unwrap();
        // Full: a has refilled (dropped, nothing lost), b has not (kept, still empty).
        l.admit_at(&c, later).unwrap();
        assert_eq!(l.tracked(), 2);
        assert!(l.admit_at(&b, later).is_err());
    }
}
