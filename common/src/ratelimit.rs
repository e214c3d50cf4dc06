//! Per-key token buckets with a bounded table: the agent limits workloads with it (per pod or
//! uid), the server limits agents (per agent SPIFFE ID).
//!
//! Invariant: the table keeps at most `max_keys` buckets. A full bucket is the same as no
//! bucket, so refilled buckets are dropped first; only if none has refilled does the least
//! recently used one go (which at worst hands that key a fresh burst).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A request refused by [`TokenBuckets`]: when the tokens it needs would be there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Denied {
    /// When the next request of the same cost would be admitted (at most an hour).
    pub retry_after: Duration,
    /// True when the request costs more than the burst: it can never be admitted.
    pub over_burst: bool,
}

/// Token buckets keyed by `K`: `rate` tokens per second, at most `burst` held.
#[derive(Debug)]
pub struct TokenBuckets<K> {
    rate: f64,
    burst: u32,
    max_keys: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Tokens the bucket would hold at `now`.
    fn level(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * rate).min(burst)
    }
}

impl<K: Hash + Eq + Clone> TokenBuckets<K> {
    /// `rate` tokens per second (callers validate it positive), bursts of `burst` (≥ 1), at
    /// most `max_keys` (≥ 1) buckets kept.
    pub fn new(rate: f64, burst: u32, max_keys: usize) -> Self {
        Self {
            rate: if rate.is_finite() && rate > 0.0 {
                rate
            } else {
                f64::MIN_POSITIVE
            },
            burst: burst.max(1),
            max_keys: max_keys.max(1),
            buckets: Mutex::default(),
        }
    }

    /// Tokens added per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Most tokens a bucket holds.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Takes `cost` tokens for `who` at `now`, or says when to retry. Takes nothing when
    /// refused.
    pub fn take_at(&self, who: &K, cost: u32, now: Instant) -> Result<(), Denied> {
        if cost > self.burst {
            return Err(Denied {
                retry_after: Duration::from_secs(3600),
                over_burst: true,
            });
        }
        let (cost, burst) = (f64::from(cost), f64::from(self.burst));
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(who) && buckets.len() >= self.max_keys {
            self.evict(&mut buckets, now);
        }
        let b = buckets.entry(who.clone()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        b.tokens = b.level(now, self.rate, burst);
        b.last = now;
        if b.tokens >= cost {
            b.tokens -= cost;
            return Ok(());
        }
        Err(Denied {
            retry_after: Duration::from_secs_f64(((cost - b.tokens) / self.rate).min(3600.0)),
            over_burst: false,
        })
    }

    /// [`TokenBuckets::take_at`] now.
    pub fn take(&self, who: &K, cost: u32) -> Result<(), Denied> {
        self.take_at(who, cost, Instant::now())
    }

    /// Keys with a bucket right now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Drops refilled buckets (same as absent); if none, the least recently used one.
    fn evict(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        let burst = f64::from(self.burst);
        buckets.retain(|_, b| b.level(now, self.rate, burst) < burst);
        if buckets.len() >= self.max_keys
            && let Some(oldest) = buckets
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(k, _)| k.clone())
        {
            buckets.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_taken_whole_or_not_at_all() {
        let l = TokenBuckets::new(10.0, 100, 8);
        let t0 = Instant::now();
        l.take_at(&"a", 60, t0).unwrap();
        let e = l.take_at(&"a", 60, t0).unwrap_err();
        assert!(!e.over_burst);
        assert!(e.retry_after <= Duration::from_secs(2), "{e:?}");
        // The refused request took nothing: 40 are still there.
        l.take_at(&"a", 40, t0).unwrap();
        assert!(l.take_at(&"a", 101, t0).unwrap_err().over_burst);
        // Other keys are unaffected.
        l.take_at(&"b", 100, t0).unwrap();
    }

    #[test]
    fn table_is_bounded() {
        let l = TokenBuckets::new(1.0, 1, 8);
        let t0 = Instant::now();
        for u in 0..10_000u32 {
            let _ = l.take_at(&u, 1, t0);
            assert!(l.tracked() <= 8);
        }
    }
}
