//! Engine incarnations: which workloads received an identity bound to an Engine, queued
//! (bounded) and reported to the server on the next sync.

use std::collections::HashMap;

use super::{Broker, Manager};
use crate::client::ClientError;

/// Incarnations waiting to be reported, and when each workload was last reported.
#[derive(Debug, Default)]
pub(super) struct IncarnationQueue {
    pending: Vec<continuity_proto::engine::Incarnation>,
    last: HashMap<(String, String), i64>,
}

impl Manager {
    /// Notes that a workload received an identity bound to an Engine; reported to the server
    /// on the next sync (again at most once a minute per workload, to refresh last_seen).
    /// `workload` is only called when a report is due (the hot path skips building it).
    pub fn report_incarnation(
        &self,
        entry_id: &str,
        workload_id: &str,
        workload: &dyn Fn() -> continuity_proto::engine::Workload,
    ) {
        let now = self.clock.unix();
        let mut guard = self.incarnations.lock().unwrap_or_else(|e| e.into_inner());
        let IncarnationQueue { pending, last } = &mut *guard;
        if let Some(t) = last.get_mut(&(entry_id.to_string(), workload_id.to_string())) {
            if now - *t < 60 {
                return;
            }
            *t = now;
        } else {
            if last.len() >= 100_000 {
                last.retain(|_, t| now - *t < 60);
            }
            last.insert((entry_id.to_string(), workload_id.to_string()), now);
        }
        if pending.len() < 10_000 {
            pending.push(continuity_proto::engine::Incarnation {
                entry_id: entry_id.into(),
                workload: Some(workload()),
                seen_at: now,
            });
        }
    }

    pub(super) async fn flush_incarnations(&self, broker: &mut Broker) -> Result<(), ClientError> {
        let batch = std::mem::take(
            &mut self
                .incarnations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pending,
        );
        if batch.is_empty() {
            return Ok(());
        }
        let req = continuity_proto::engine::ReportIncarnationsRequest {
            incarnations: batch.clone(),
        };
        if let Err(e) = broker.report_incarnations(req).await {
            // Keep them for the next round.
            self.incarnations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pending
                .extend(batch);
            return Err(e.into());
        }
        Ok(())
    }
}
