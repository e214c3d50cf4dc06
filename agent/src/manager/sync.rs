//! The sync loop: wakes at the sync interval (with jitter) or when an SVID is due, runs one
//! round with the server, and backs off exponentially (jittered) while the server is
//! unreachable, moving to the next configured server after each such failure.

use std::time::Duration;

use continuity_proto::agent::{FetchBundleRequest, SyncAuthorizedEntriesRequest};

use super::{AgentApi, Manager};
use crate::client::ClientError;
use crate::state::{BundleState, Entry};

/// Longest one sync round may take before the server in use counts as unreachable (a
/// server that accepts calls and never answers them must not hold the agent forever).
pub const ROUND_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait between two attempts while the servers are unreachable.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A random fraction in [0, 1) (spreads syncs and retries; not a secret).
fn jitter() -> f64 {
    continuity_common::rand::jitter_fraction()
}

impl Manager {
    /// Runs the sync loop forever.
    pub async fn run(self: std::sync::Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let server = self.client.server();
            let round = tokio::time::timeout(ROUND_TIMEOUT, self.sync_once()).await;
            // The first round resolves the addresses: the server it used is known after it.
            let server = server.or_else(|| self.client.server());
            let wait = match round.unwrap_or(Err(ClientError::Timeout(ROUND_TIMEOUT))) {
                Ok(()) => {
                    self.connected
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    self.last_sync
                        .store(self.clock.unix(), std::sync::atomic::Ordering::Relaxed);
                    backoff = Duration::from_millis(500);
                    self.next_wake()
                }
                Err(e) => {
                    self.connected
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    // What the round applied before it failed is served and kept.
                    self.publish_pending();
                    // Unreachable: the next server. Otherwise a local failure (a reply that
                    // did not parse, data_dir not writable) gets a fresh connection.
                    if !self.client.failed(server, &e) && e.status().is_none() {
                        self.client.reset();
                    }
                    // The back-off alone, even when moving on and even past the sync interval
                    // or an SVID's rotation time: a fleet that lost its server must not land on
                    // the next one all at once, nor retry in a loop while an SVID is due.
                    let wait = backoff.mul_f64(0.75 + 0.5 * jitter());
                    tracing::warn!(error = %e, server = ?server, retry_in = ?wait, "sync with the server failed; serving from cache");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Time until the next sync or rotation is due.
    fn next_wake(&self) -> Duration {
        let now_ms = self
            .clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let interval = self.sync_interval.mul_f64(0.9 + 0.2 * jitter());
        let renew_at = self.agent_renewal_at();
        let next_rotation = {
            let st = self.state();
            st.svids.values().map(|s| s.rotate_at).chain(renew_at).min()
        };
        match next_rotation {
            Some(at) => {
                // `at` may come from the state file: saturate, never overflow. One already
                // past was not rotated by the last round (the server did not sign it): no
                // sooner than a second, never a loop.
                let until = at.saturating_mul(1000).saturating_sub(now_ms);
                let until = if until <= 0 { 1000 } else { until.max(50) };
                interval.min(Duration::from_millis(until as u64))
            }
            None => interval,
        }
    }

    /// One round with the server. Each step reads what it needs under a short lock, calls the
    /// server with the lock released, and applies the answer under a short lock; rounds are
    /// serialized by their own mutex, which nothing on the Workload API path takes.
    pub async fn sync_once(&self) -> Result<(), ClientError> {
        let _round = self.sync_round.lock().await;
        let agent_svid = self
            .state()
            .agent_svid
            .clone()
            .ok_or_else(|| ClientError::Protocol("no agent SVID".into()))?;
        let mut api = self.client.api(&agent_svid).await?;
        let now = self.clock.unix();
        // Each step's change is noted as soon as it is applied (no await in between), so a
        // round cut short (an error, the round timeout) still publishes what it applied.
        // The bundle first: it names the tainted authorities the renewals below look at.
        let bundle_changed = self.note(self.sync_bundle(&mut api).await?);
        let current = match self.renew_agent_if_due(&mut api, &agent_svid, now).await? {
            Some(svid) => {
                api = self.client.api(&svid).await?;
                svid
            }
            None => agent_svid,
        };
        let bundle_changed = self.note(self.sync_entries(&mut api).await?) || bundle_changed;
        self.refresh_svids(&mut api, now, bundle_changed).await?;
        // Engine JWKS and incarnation reports: a failure here must not lose the SVIDs above.
        self.note(self.sync_engines(&current).await);
        self.publish_pending();
        Ok(())
    }

    /// Records that the state changed since it was last published; returns `changed`.
    pub(super) fn note(&self, changed: bool) -> bool {
        if changed {
            self.unpublished
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        changed
    }

    /// Publishes and saves the state if it changed since it was last published.
    fn publish_pending(&self) {
        if self
            .unpublished
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            let st = self.state();
            self.publish(&st);
            self.save(&st);
        }
    }

    /// Fetches the bundle and the foreign bundles; true if either changed.
    async fn sync_bundle(&self, api: &mut AgentApi) -> Result<bool, ClientError> {
        let r = api.fetch_bundle(FetchBundleRequest {}).await?.into_inner();
        let federated_changed = self.apply_federated(r.federated_bundles);
        let Some(b) = r.bundle else {
            return Ok(federated_changed);
        };
        let mut st = self.state();
        if b.sequence_number == st.bundle.sequence {
            return Ok(federated_changed);
        }
        st.bundle = b.into();
        self.drop_tainted_jwts(&st.bundle.tainted_jwt);
        self.client
            .roots()
            .replace(st.bundle.x509_authorities.clone());
        tracing::info!(sequence = st.bundle.sequence, "bundle updated");
        Ok(true)
    }

    /// Replaces the foreign bundles with the server's answer; true if they changed. A bundle
    /// naming this agent's own trust domain is not taken (only the server's own bundle is).
    fn apply_federated(&self, bundles: Vec<continuity_proto::types::Bundle>) -> bool {
        let mut st = self.state();
        let own = crate::state::trust_domain_id(&st.bundle.trust_domain);
        let fresh: std::collections::BTreeMap<String, BundleState> = bundles
            .into_iter()
            .map(|b| {
                (
                    crate::state::trust_domain_id(&b.trust_domain),
                    BundleState::from(b),
                )
            })
            .filter(|(id, _)| *id != own)
            .collect();
        if fresh == st.federated_bundles {
            return false;
        }
        tracing::info!(trust_domains = ?fresh.keys().collect::<Vec<_>>(), "federated bundles updated");
        st.federated_bundles = fresh;
        true
    }

    /// What this agent serves now: the authorities that signed its X509-SVIDs (its own
    /// included) and its cached JWT-SVIDs, as of the bundle it holds. The server revokes a
    /// tainted authority only once every agent reports it no longer serves it.
    fn serving_report(&self) -> continuity_proto::agent::ServingReport {
        let st = self.state();
        let mut x509: Vec<String> = st
            .agent_svid
            .iter()
            .chain(st.svids.values())
            .filter_map(|s| crate::svid::authority_key_id(&s.chain))
            .collect();
        x509.sort();
        x509.dedup();
        continuity_proto::agent::ServingReport {
            bundle_sequence: i64::try_from(st.bundle.sequence).unwrap_or(i64::MAX),
            x509_authority_ids: x509,
            jwt_authority_ids: self.cached_jwt_kids(),
        }
    }

    /// Pulls entry changes since the revision held; true if the entries changed.
    async fn sync_entries(&self, api: &mut AgentApi) -> Result<bool, ClientError> {
        let since_revision = self.state().revision;
        let serving = Some(self.serving_report());
        let sync = api
            .sync_authorized_entries(SyncAuthorizedEntriesRequest {
                since_revision,
                serving,
            })
            .await?
            .into_inner();
        let mut st = self.state();
        let mut changed = false;
        if sync.full {
            let keep: std::collections::HashSet<&str> =
                sync.entries.iter().map(|e| e.id.as_str()).collect();
            let before = st.entries.len();
            st.entries.retain(|id, _| keep.contains(id.as_str()));
            changed |= st.entries.len() != before;
        }
        for id in &sync.removed_entry_ids {
            changed |= st.entries.remove(id).is_some();
        }
        for e in sync.entries {
            let e = Entry::from(e);
            if st.entries.get(&e.id) != Some(&e) {
                // A changed entry (new SPIFFE ID, TTL...) needs a new SVID.
                st.svids.remove(&e.id);
                st.entries.insert(e.id.clone(), e);
                changed = true;
            }
        }
        st.revision = sync.revision;
        let st = &mut *st;
        let before = st.svids.len();
        st.svids.retain(|id, _| st.entries.contains_key(id));
        changed |= st.svids.len() != before;
        Ok(changed)
    }
}
