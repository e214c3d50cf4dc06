//! SVID renewal: the agent SVID at half-life, and workload SVIDs that are missing, due, or
//! signed by a CA that left the bundle, signed in batches of at most [`MAX_BATCH`] CSRs.

use std::collections::HashMap;

use continuity_common::secret::SecretBytes;
use continuity_proto::agent::{BatchNewX509svidRequest, NewX509svidParams, RenewAgentRequest};

use super::{AgentApi, Manager};
use crate::client::ClientError;
use crate::state::Svid;
use crate::svid::{issued_by_bundle, new_key_and_csr, signed_by_tainted, svid_from_proto};

/// Most CSRs sent in one batch (the server's limit).
pub const MAX_BATCH: usize = 500;

/// Back-off of agent SVID renewals the server answered but could not make (its datastore is
/// unavailable, say): the first retry after about a second, doubling to this.
pub const MAX_RENEWAL_BACKOFF_SECS: i64 = 60;

/// When a failed agent SVID renewal may be tried again.
#[derive(Debug, Default)]
pub(super) struct RenewalRetry {
    /// Unix seconds; 0: no failure pending.
    at: i64,
    /// Failures in a row.
    failures: u32,
}

impl Manager {
    /// When the agent SVID is next to be renewed: its rotation time, or later while a failed
    /// renewal backs off.
    pub(super) fn agent_renewal_at(&self) -> Option<i64> {
        let retry = self.renew_retry().at;
        self.state()
            .agent_svid
            .as_ref()
            .map(|s| s.rotate_at.max(retry))
    }

    /// Renews the agent SVID if it is due; the new one, or None (not due, or backing off). A
    /// renewal the server answered but refused (its datastore is unavailable: `Unavailable`
    /// naming the reason) does not fail the round: the current SVID is still good for the
    /// rest of it (workload SVIDs need no datastore write), and the renewal is retried after a
    /// jittered back-off. An unreachable server fails the round.
    pub(super) async fn renew_agent_if_due(
        &self,
        api: &mut AgentApi,
        current: &Svid,
        now: i64,
    ) -> Result<Option<Svid>, ClientError> {
        let tainted = signed_by_tainted(&current.chain, &self.state().bundle.tainted_x509);
        if tainted {
            tracing::warn!("the agent SVID was signed by a tainted authority; renewing it");
        }
        if (now < current.rotate_at && !tainted) || now < self.renew_retry().at {
            return Ok(None);
        }
        match self.renew_agent(api).await {
            Ok(svid) => {
                *self.renew_retry() = RenewalRetry::default();
                Ok(Some(svid))
            }
            Err(e) if e.is_answer() => {
                let mut r = self.renew_retry();
                r.failures = r.failures.saturating_add(1);
                let base = 1i64
                    .checked_shl(r.failures - 1)
                    .unwrap_or(i64::MAX)
                    .min(MAX_RENEWAL_BACKOFF_SECS);
                let wait = (base as f64 * (0.75 + 0.5 * continuity_common::rand::jitter_fraction()))
                    .ceil() as i64;
                r.at = now.saturating_add(wait.max(1));
                tracing::warn!(error = %e, retry_in_s = wait, expires_at = current.expires_at, "agent SVID renewal failed; keeping the current one");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn renew_retry(&self) -> std::sync::MutexGuard<'_, RenewalRetry> {
        self.renew_retry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Renews the agent SVID, persists it, and returns it.
    pub(super) async fn renew_agent(&self, api: &mut AgentApi) -> Result<Svid, ClientError> {
        let (key, csr) = tokio::task::spawn_blocking(new_key_and_csr)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .map_err(ClientError::Protocol)?;
        let r = api
            .renew_agent(RenewAgentRequest { csr })
            .await?
            .into_inner();
        let svid = r
            .svid
            .ok_or_else(|| ClientError::Protocol("no SVID in RenewAgent".into()))?;
        let svid = svid_from_proto(svid, key).map_err(|e| ClientError::Protocol(e.to_string()))?;
        // On disk before its first use: the server takes the previous SVID back only while the
        // new one is unused, so an agent that used an unsaved SVID and then crashed would come
        // back with the previous one and be flagged as a forked (cloned) agent.
        {
            let mut st = self.state();
            let previous = st.agent_svid.replace(svid.clone());
            if let Err(e) = tokio::task::block_in_place(|| self.storage.save(&st)) {
                st.agent_svid = previous;
                return Err(ClientError::Persist(e.to_string()));
            }
        }
        *self.agent_svid.write().unwrap_or_else(|e| e.into_inner()) = Some(svid.clone());
        tracing::info!(server = ?self.client.server(), "agent SVID renewed");
        Ok(svid)
    }

    /// Entries without an SVID, due for rotation, signed by a CA that left the bundle, or
    /// signed by a tainted authority (checked on every round while one is tainted, so a round
    /// cut short does not leave such an SVID in service).
    fn due_svids(&self, now: i64, bundle_changed: bool) -> Vec<String> {
        let st = self.state();
        let tainted = &st.bundle.tainted_x509;
        st.entries
            .keys()
            .filter(|id| match st.svids.get(*id) {
                None => true,
                Some(s) => {
                    now >= s.rotate_at
                        || signed_by_tainted(&s.chain, tainted)
                        || (bundle_changed
                            && !issued_by_bundle(&s.chain, &st.bundle.x509_authorities))
                }
            })
            .cloned()
            .collect()
    }

    /// Signs new SVIDs for the entries that are due, noting each batch that brought some
    /// (see [`Manager::note`]).
    pub(super) async fn refresh_svids(
        &self,
        api: &mut AgentApi,
        now: i64,
        bundle_changed: bool,
    ) -> Result<(), ClientError> {
        let due = self.due_svids(now, bundle_changed);
        for chunk in due.chunks(MAX_BATCH) {
            let ids = chunk.to_vec();
            let keys = tokio::task::spawn_blocking(move || {
                ids.into_iter()
                    .map(|id| new_key_and_csr().map(|(k, c)| (id, k, c)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .map_err(ClientError::Protocol)?;
            let params = keys
                .iter()
                .map(|(id, _, csr)| NewX509svidParams {
                    entry_id: id.clone(),
                    csr: csr.clone(),
                })
                .collect();
            let resp = api
                .batch_new_x509svid(BatchNewX509svidRequest { params })
                .await?
                .into_inner();
            let keys = keys.into_iter().map(|(id, k, _)| (id, k)).collect();
            self.note(self.apply_svids(resp.results, keys));
        }
        Ok(())
    }

    /// Stores the SVIDs the server signed (for entries still held); true if any was stored.
    fn apply_svids(
        &self,
        results: Vec<continuity_proto::agent::BatchNewX509svidResult>,
        mut keys: HashMap<String, SecretBytes>,
    ) -> bool {
        let mut st = self.state();
        let mut changed = false;
        for r in results {
            match (r.status.as_ref().map(|s| s.code), r.svid) {
                (Some(0), Some(svid)) => {
                    let Some(key) = keys.remove(&r.entry_id) else {
                        continue;
                    };
                    match svid_from_proto(svid, key) {
                        Ok(svid) if st.entries.contains_key(&r.entry_id) => {
                            st.svids.insert(r.entry_id.clone(), svid);
                            changed = true;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(entry = %r.entry_id, error = %e, "unusable SVID from the server")
                        }
                    }
                }
                (_, _) => {
                    let msg = r.status.map(|s| s.message).unwrap_or_default();
                    tracing::warn!(entry = %r.entry_id, reason = %msg, "server did not sign an SVID");
                }
            }
        }
        changed
    }
}
