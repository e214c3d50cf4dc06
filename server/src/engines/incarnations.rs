//! Incarnations: the workloads that were an Engine, as their agents report them.

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
