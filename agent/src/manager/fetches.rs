//! Single-flight for server fetches: concurrent misses for one key share one spawned fetch
//! that no caller can cancel.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

/// A spawned fetch any number of callers can await; none of them can cancel it.
type SharedFetch<T> = futures_util::future::Shared<futures_util::future::BoxFuture<'static, T>>;

/// Fetches in flight, by key: concurrent misses for one key share one spawned fetch. An entry
/// lives while someone waits on it. Invariant: an entry's `shares` is the number of live
/// [`FetchShare`]s made for it, counted and discounted only under the lock.
pub(super) struct Fetches<K, T: Clone> {
    map: Mutex<FetchMap<K, T>>,
}

struct FetchMap<K, T: Clone> {
    next_id: u64,
    entries: HashMap<K, FetchEntry<T>>,
}

struct FetchEntry<T: Clone> {
    id: u64,
    shares: usize,
    fetch: SharedFetch<T>,
}

impl<K, T: Clone> Default for Fetches<K, T> {
    fn default() -> Self {
        Self {
            map: Mutex::new(FetchMap {
                next_id: 0,
                entries: HashMap::new(),
            }),
        }
    }
}

impl<K, T: Clone> std::fmt::Debug for Fetches<K, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetches").finish_non_exhaustive()
    }
}

/// A waiter's share of a fetch in flight; the last one out removes it.
pub(super) struct FetchShare<'a, K: Hash + Eq, T: Clone> {
    fetches: &'a Fetches<K, T>,
    key: K,
    id: u64,
    fetch: SharedFetch<T>,
}

impl<K: Hash + Eq, T: Clone> FetchShare<'_, K, T> {
    /// The fetch's result (cancelling this wait leaves the fetch running for the others).
    pub(super) async fn wait(&self) -> T {
        self.fetch.clone().await
    }
}

impl<K: Hash + Eq, T: Clone> Drop for FetchShare<'_, K, T> {
    fn drop(&mut self) {
        let mut map = self.fetches.lock();
        if let Some(e) = map.entries.get_mut(&self.key)
            && e.id == self.id
        {
            e.shares = e.shares.saturating_sub(1);
            if e.shares == 0 {
                map.entries.remove(&self.key);
            }
        }
    }
}

impl<K, T: Clone> Fetches<K, T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, FetchMap<K, T>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K: Hash + Eq + Clone, T: Clone + Send + Sync + 'static> Fetches<K, T> {
    /// Joins the fetch in flight for `key`, or, if `admit` allows, spawns `start()` as a new
    /// one (a finished fetch counts as none: its result is in the cache or was an error).
    pub(super) fn join<E, F>(
        &self,
        key: &K,
        admit: impl FnOnce() -> Result<(), E>,
        start: impl FnOnce() -> F,
        panicked: fn(tokio::task::JoinError) -> T,
    ) -> Result<FetchShare<'_, K, T>, E>
    where
        F: std::future::Future<Output = T> + Send + 'static,
    {
        use futures_util::FutureExt;
        let mut map = self.lock();
        if let Some(e) = map.entries.get_mut(key)
            && e.fetch.peek().is_none()
        {
            e.shares += 1;
            return Ok(FetchShare {
                fetches: self,
                key: key.clone(),
                id: e.id,
                fetch: e.fetch.clone(),
            });
        }
        admit()?;
        let task = tokio::spawn(start());
        let fetch = async move { task.await.unwrap_or_else(panicked) }
            .boxed()
            .shared();
        let id = map.next_id;
        map.next_id += 1;
        map.entries.insert(
            key.clone(),
            FetchEntry {
                id,
                shares: 1,
                fetch: fetch.clone(),
            },
        );
        Ok(FetchShare {
            fetches: self,
            key: key.clone(),
            id,
            fetch,
        })
    }

    /// Keys with a fetch in flight or waited on.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type F = Fetches<u32, u32>;

    fn lost(_: tokio::task::JoinError) -> u32 {
        u32::MAX
    }

    /// A caller waiting on the fetch for `key`, counting admissions and fetches started.
    async fn call(
        f: &F,
        key: u32,
        admits: &AtomicUsize,
        started: &AtomicUsize,
        gate: Arc<tokio::sync::Notify>,
    ) -> Result<u32, ()> {
        let share = f.join(
            &key,
            || {
                admits.fetch_add(1, Ordering::SeqCst);
                Ok::<(), ()>(())
            },
            || {
                started.fetch_add(1, Ordering::SeqCst);
                async move {
                    gate.notified().await;
                    key * 10
                }
            },
            lost,
        )?;
        Ok(share.wait().await)
    }

    #[tokio::test]
    async fn a_cancelled_first_caller_neither_cancels_the_fetch_nor_frees_a_token() {
        let f = Arc::new(F::default());
        let (admits, started) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let gate = Arc::new(tokio::sync::Notify::new());
        let spawn_caller = || {
            let (f, a, s, g) = (f.clone(), admits.clone(), started.clone(), gate.clone());
            tokio::spawn(async move { call(&f, 7, &a, &s, g).await })
        };
        let first = spawn_caller();
        tokio::task::yield_now().await;
        let waiters: Vec<_> = (0..4).map(|_| spawn_caller()).collect();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // The attack: reset the stream that started the fetch, again and again.
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for w in waiters {
            assert_eq!(w.await.unwrap(), Ok(70));
        }
        assert_eq!(admits.load(Ordering::SeqCst), 1, "only one token taken");
        assert_eq!(started.load(Ordering::SeqCst), 1, "only one server call");
        assert_eq!(f.len(), 0, "the last waiter removed the entry");
    }

    #[test]
    fn shares_finishing_together_always_remove_the_entry() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let _guard = rt.enter();
        let f = F::default();
        for i in 0..2000 {
            let join = || {
                f.join(&1, || Ok::<_, ()>(()), || async move { i }, lost)
                    .unwrap()
            };
            let (a, b) = (join(), join());
            let barrier = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                s.spawn(|| {
                    barrier.wait();
                    drop(a);
                });
                barrier.wait();
                drop(b);
            });
            assert_eq!(
                f.len(),
                0,
                "iteration {i}: a finished fetch stayed in the map"
            );
        }
    }

    #[tokio::test]
    async fn a_finished_fetch_is_not_joined() {
        let f = F::default();
        let first = f
            .join(&1, || Ok::<_, ()>(()), || async { 1 }, lost)
            .unwrap();
        assert_eq!(first.wait().await, 1);
        // Still held (its caller has not finished), but done: a new call fetches afresh.
        let mut admitted = false;
        let second = f
            .join(
                &1,
                || {
                    admitted = true;
                    Ok::<_, ()>(())
                },
                || async { 2 },
                lost,
            )
            .unwrap();
        assert!(admitted);
        assert_eq!(second.wait().await, 2);
        drop(first);
        assert_eq!(f.len(), 1, "the old share does not remove the new entry");
        drop(second);
        assert_eq!(f.len(), 0);
    }
}
