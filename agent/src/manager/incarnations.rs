//! Engine incarnations: which workloads received an identity bound to an Engine, queued
//! (bounded), persisted in the data_dir's journal ([`crate::journal`]) until the server
//! acknowledged them, and reported on the next sync. Reports survive an agent restart, a
//! crash, and a server outage of any length.

use std::collections::HashMap;
use std::path::Path;

use prost::Message;

use super::{Broker, Manager};
use crate::client::ClientError;
use crate::journal::Journal;

/// The journal file in data_dir.
pub const JOURNAL_FILE: &str = "incarnations.journal";

/// Reports kept waiting at most (in memory and in the journal).
const MAX_PENDING: usize = 10_000;

/// Incarnations waiting to be reported, and when each workload was last reported.
#[derive(Debug, Default)]
pub(super) struct IncarnationQueue {
    pending: Vec<continuity_proto::engine::Incarnation>,
    last: HashMap<(String, String), i64>,
    /// None when the journal cannot be opened (reports are then kept in memory only).
    journal: Option<Journal>,
}

impl IncarnationQueue {
    /// The queue persisted in `data_dir`, with the reports a previous run left in it.
    pub(super) fn open(data_dir: Option<&Path>) -> Self {
        let Some(dir) = data_dir else {
            return Self::default();
        };
        match Journal::open(dir, JOURNAL_FILE) {
            Ok((journal, records, dropped)) => {
                if dropped.torn_tail || dropped.corrupt > 0 {
                    tracing::warn!(
                        torn_tail = dropped.torn_tail,
                        corrupt = dropped.corrupt,
                        "incarnation journal: dropped damaged records, kept the others"
                    );
                }
                let pending: Vec<_> = records
                    .iter()
                    .filter_map(|r| continuity_proto::engine::Incarnation::decode(&r[..]).ok())
                    .take(MAX_PENDING)
                    .collect();
                if !pending.is_empty() {
                    tracing::info!(
                        reports = pending.len(),
                        "incarnation reports from the journal will be sent"
                    );
                }
                Self {
                    pending,
                    last: HashMap::new(),
                    journal: Some(journal),
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot open the incarnation journal; reports are kept in memory only");
                Self::default()
            }
        }
    }

    /// Rewrites the journal to hold exactly what is still pending.
    fn persist_pending(&mut self) {
        let records: Vec<Vec<u8>> = self.pending.iter().map(Message::encode_to_vec).collect();
        if let Some(j) = self.journal.as_mut()
            && let Err(e) = j.replace(&records)
        {
            tracing::error!(error = %e, "cannot rewrite the incarnation journal");
        }
    }
}

impl Manager {
    /// Notes that a workload received an identity bound to an Engine; persisted, and reported
    /// to the server on the next sync (again at most once a minute per workload, to refresh
    /// last_seen). `workload` is only called when a report is due (the hot path skips it).
    pub fn report_incarnation(
        &self,
        entry_id: &str,
        workload_id: &str,
        workload: &dyn Fn() -> continuity_proto::engine::Workload,
    ) {
        let now = self.clock.unix();
        let appended = {
            let mut guard = self.incarnations.lock().unwrap_or_else(|e| e.into_inner());
            let IncarnationQueue {
                pending,
                last,
                journal,
            } = &mut *guard;
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
            if pending.len() >= MAX_PENDING {
                return;
            }
            let inc = continuity_proto::engine::Incarnation {
                entry_id: entry_id.into(),
                workload: Some(workload()),
                seen_at: now,
            };
            let appended = journal.as_mut().map(|j| j.append(&inc.encode_to_vec()));
            pending.push(inc);
            appended
        };
        // Flushed to disk outside the lock, so other callers never wait on the disk.
        if let Some(Err(e)) = appended.map(|r| r.and_then(|f| f.sync_data())) {
            tracing::error!(error = %e, "cannot append to the incarnation journal");
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
        let sent = broker.report_incarnations(req).await;
        let mut q = self.incarnations.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = sent {
            // Keep them (they are still in the journal) for the next round.
            let newer = std::mem::replace(&mut q.pending, batch);
            q.pending.extend(newer);
            return Err(e.into());
        }
        // Acknowledged: the journal keeps only what arrived since the batch was taken.
        tokio::task::block_in_place(|| q.persist_pending());
        Ok(())
    }
}
