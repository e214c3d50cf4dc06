//! Incarnations: the workloads that were an Engine, as their agents report them and as the
//! server sees them in the EngineBroker calls it serves ([`Sightings`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Engines, Result};
use crate::model::engine::Incarnation;

impl Engines {
    /// Records that a workload was (again) this Engine.
    pub async fn record_incarnation(&self, mut inc: Incarnation) -> Result<()> {
        self.engine(&inc.engine)?;
        inc.first_seen = inc.first_seen.min(inc.last_seen);
        self.store.upsert_incarnation(&inc).await?;
        Ok(())
    }

    /// When a reported sighting happened: the agent's time (`reported`, 0 when it gave
    /// none), never later than this server's clock.
    pub fn sighting_time(&self, reported: i64) -> i64 {
        let now = self.clock.unix();
        if reported > 0 { reported.min(now) } else { now }
    }

    /// The workloads that were this Engine.
    pub async fn incarnations(&self, engine: &str) -> Result<Vec<Incarnation>> {
        self.engine(engine)?;
        Ok(self.store.list_incarnations(engine).await?)
    }
}

/// A sighting of the same (Engine, entry, agent, workload) within this many seconds of the
/// last one written is not written again: last_seen is bumped at most this often.
pub const SIGHTING_COALESCE_SECS: i64 = 5;

/// Sightings queued for the writer at most; beyond, a sighting waits for the next call.
const SIGHTING_QUEUE: usize = 10_000;

/// Keys remembered for coalescing at most (older ones are forgotten first).
const SIGHTING_KEYS: usize = 100_000;

/// (engine, entry, agent, workload).
type SightingKey = (String, String, String, String);

/// Incarnations the server records itself for the Engine calls it serves, written off the
/// hot path: [`Sightings::note`] only checks a map and queues; one task writes the datastore.
#[derive(Debug)]
pub struct Sightings {
    last: Mutex<HashMap<SightingKey, i64>>,
    queue: tokio::sync::mpsc::Sender<Incarnation>,
}

impl Sightings {
    /// Starts the writer task (on the current runtime) recording into `engines`.
    pub fn start(engines: Arc<Engines>) -> Arc<Self> {
        let (queue, mut rx) = tokio::sync::mpsc::channel::<Incarnation>(SIGHTING_QUEUE);
        tokio::spawn(async move {
            while let Some(inc) = rx.recv().await {
                if let Err(e) = engines.record_incarnation(inc).await {
                    tracing::warn!(error = %e, "cannot record an Engine incarnation");
                }
            }
        });
        Arc::new(Self {
            last: Mutex::default(),
            queue,
        })
    }

    /// Notes that a workload of (engine, entry, agent, workload) used its Engine at `now`:
    /// `build` makes its record, queued for writing, unless the same workload was written
    /// less than [`SIGHTING_COALESCE_SECS`] ago (then nothing is built).
    pub fn note(&self, key: [&str; 4], now: i64, build: impl FnOnce() -> Incarnation) {
        let key: SightingKey = (key[0].into(), key[1].into(), key[2].into(), key[3].into());
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = last.get(&key)
            && now - *t < SIGHTING_COALESCE_SECS
        {
            return;
        }
        if last.len() >= SIGHTING_KEYS {
            last.retain(|_, t| now - *t < SIGHTING_COALESCE_SECS);
        }
        if self.queue.try_send(build()).is_ok() {
            last.insert(key, now);
        } else {
            // The writer is behind: the next call of this workload tries again.
            tracing::debug!("incarnation writer is behind; sighting deferred");
        }
    }
}
