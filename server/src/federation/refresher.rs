//! The federation refresher: fetches each relationship's SPIFFE bundle endpoint on the peer's
//! `spiffe_refresh_hint` and stores a newer bundle through [`Federation::accept_fetched`]
//! (so delivery to agents, record MACs and the change feed are those of `bundle set`).
//!
//! Only the holder of the `federation-refresher` lease refreshes on schedule; `federation
//! refresh` fetches at once on whichever server it reaches. Every response is hostile: its
//! size is bounded, it is parsed by the bundle parser, and the TLS peer is checked first
//! (`https_spiffe`: an X509-SVID with the endpoint SPIFFE ID chaining to the bundle held for
//! the trust domain; `https_web`: the roots of `[federation] web_ca_file`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use continuity_common::https::{ServerTrust, request_capped};
use continuity_common::tls::{SpiffeServerVerifier, TrustRoots};
use continuity_common::{Clock, TrustDomain};

use super::{Federation, FederationError};
use crate::datastore::LeaseStore;
use crate::trust_bundle::{
    BundleFormat, EndpointAuth, MAX_BUNDLE_BYTES, Relationship, parse_bundle,
};

/// The lease whose holder refreshes on schedule.
pub const REFRESHER_LEASE: &str = "federation-refresher";
/// Wait when the peer gives no refresh hint (SPIRE's default).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Longest wait between two fetches of one endpoint.
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// Timeout of every connect, read and write of a fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response accepted (the bundle plus its headers).
const MAX_RESPONSE: usize = MAX_BUNDLE_BYTES + 16 * 1024;
/// How often the task looks for due relationships.
const TICK: Duration = Duration::from_secs(1);

/// Why a fetch failed; the message names the URL.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// No relationship with the trust domain.
    #[error("no federation relationship with {0}")]
    NoRelationship(TrustDomain),
    /// The endpoint could not be fetched or its answer was refused.
    #[error("{url}: {reason}")]
    Fetch {
        /// The bundle endpoint URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The fetched bundle was refused or could not be stored.
    #[error("{url}: {source}")]
    Refused {
        /// The bundle endpoint URL.
        url: String,
        /// Why.
        source: FederationError,
    },
}

/// What a successful refresh did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refreshed {
    /// Whether the bundle was replaced (false: the same as stored).
    pub updated: bool,
    /// The sequence of the fetched bundle.
    pub sequence: u64,
    /// Seconds until the next scheduled fetch.
    pub next_in: Duration,
}

/// Fetches relationships' bundle endpoints.
pub struct Refresher {
    federation: Arc<Federation>,
    min_interval: Duration,
    web_roots: Option<Vec<Vec<u8>>>,
    /// Per trust domain: when the next fetch is due (Unix seconds) and failures in a row.
    schedule: Mutex<HashMap<TrustDomain, (i64, u32)>>,
}

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher")
            .field("min_interval", &self.min_interval)
            .finish_non_exhaustive()
    }
}

/// The wait before the next fetch: the peer's hint (default 5 min) within `[min, 1 h]`.
pub fn next_interval(refresh_hint: i64, min: Duration) -> Duration {
    let hint = u64::try_from(refresh_hint).unwrap_or(0);
    let d = if hint == 0 {
        DEFAULT_REFRESH
    } else {
        Duration::from_secs(hint)
    };
    d.clamp(min, MAX_REFRESH.max(min))
}

/// The wait after `failures` failed fetches in a row: doubling from `min`, at most 1 h.
pub fn backoff(failures: u32, min: Duration) -> Duration {
    min.saturating_mul(1 << failures.min(16))
        .min(MAX_REFRESH.max(min))
}

impl Refresher {
    /// A refresher of `federation`'s relationships; `web_roots` (DER) authenticate `https_web`.
    pub fn new(
        federation: Arc<Federation>,
        min_interval: Duration,
        web_roots: Option<Vec<Vec<u8>>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            federation,
            min_interval,
            web_roots,
            schedule: Mutex::default(),
        })
    }

    /// Fetches the endpoint of `trust_domain` now and stores a newer bundle, as `actor`.
    pub async fn refresh(
        &self,
        trust_domain: &TrustDomain,
        actor: &str,
    ) -> Result<Refreshed, RefreshError> {
        let rel = self
            .federation
            .relationship(trust_domain)
            .ok_or_else(|| RefreshError::NoRelationship(trust_domain.clone()))?;
        let result = self.fetch_and_store(&rel, actor).await;
        let now = self.federation.clock.unix();
        let mut schedule = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        let failures = schedule.get(trust_domain).map_or(0, |s| s.1);
        let (wait, failures) = match &result {
            Ok(r) => (r.next_in, 0),
            Err(_) => (
                backoff(failures, self.min_interval),
                failures.saturating_add(1),
            ),
        };
        let due = now.saturating_add(i64::try_from(wait.as_secs()).unwrap_or(i64::MAX));
        schedule.insert(trust_domain.clone(), (due, failures));
        result
    }

    async fn fetch_and_store(
        &self,
        rel: &Relationship,
        actor: &str,
    ) -> Result<Refreshed, RefreshError> {
        let url = rel.bundle_endpoint_url.clone();
        let fail = |reason: String| RefreshError::Fetch {
            url: url.clone(),
            reason,
        };
        let trust = self.trust_for(rel).map_err(&fail)?;
        let target = url.clone();
        let resp = tokio::task::spawn_blocking(move || {
            request_capped(
                "GET",
                &target,
                &trust,
                None,
                None,
                FETCH_TIMEOUT,
                MAX_RESPONSE,
            )
        })
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(e.to_string()))?;
        if resp.status != 200 {
            return Err(fail(format!("HTTP status {}", resp.status)));
        }
        let bundle = parse_bundle(&rel.trust_domain, &resp.body, BundleFormat::Spiffe)
            .map_err(|e| fail(format!("not a SPIFFE bundle of {}: {e}", rel.trust_domain)))?;
        let (sequence, hint) = (bundle.sequence, bundle.refresh_hint);
        let updated = self
            .federation
            .accept_fetched(bundle, actor)
            .await
            .map_err(|source| RefreshError::Refused {
                url: url.clone(),
                source,
            })?;
        Ok(Refreshed {
            updated,
            sequence,
            next_in: next_interval(hint, self.min_interval),
        })
    }

    /// How the endpoint of `rel` is authenticated.
    fn trust_for(&self, rel: &Relationship) -> Result<ServerTrust, String> {
        match &rel.auth {
            EndpointAuth::HttpsSpiffe(id) => {
                let held = self.federation.bundle(&rel.trust_domain).ok_or_else(|| {
                    format!(
                        "no bundle of {} is held to authenticate the endpoint",
                        rel.trust_domain
                    )
                })?;
                let roots = TrustRoots::new(held.x509_authorities.clone());
                Ok(ServerTrust::Verifier(Arc::new(SpiffeServerVerifier::new(
                    roots,
                    id.clone(),
                ))))
            }
            EndpointAuth::HttpsWeb => {
                self.web_roots
                    .clone()
                    .map(ServerTrust::Roots)
                    .ok_or_else(|| {
                        "https_web needs Web PKI roots: set [federation] web_ca_file".into()
                    })
            }
        }
    }

    /// The relationships due for a fetch at `now` (new ones are due at once).
    fn due(&self, now: i64) -> Vec<TrustDomain> {
        let schedule = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        self.federation
            .relationships()
            .into_iter()
            .map(|r| r.trust_domain)
            .filter(|td| schedule.get(td).is_none_or(|(due, _)| *due <= now))
            .collect()
    }

    /// Makes `trust_domain` due at once (its relationship was created or changed).
    pub fn reschedule(&self, trust_domain: &TrustDomain) {
        let mut schedule = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        schedule.remove(trust_domain);
    }

    /// Moves `due` to `now` plus the shortest interval, keeping their failure counts.
    fn postpone(&self, due: &[TrustDomain], now: i64) {
        let later =
            now.saturating_add(i64::try_from(self.min_interval.as_secs()).unwrap_or(i64::MAX));
        let mut schedule = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        for td in due {
            schedule.entry(td.clone()).or_insert((later, 0)).0 = later;
        }
    }

    /// Runs the schedule until the process ends, fetching only while holding the lease.
    pub fn spawn(
        self: Arc<Self>,
        leases: Arc<dyn LeaseStore>,
        holder: String,
        lease_ttl: Duration,
        clock: Arc<dyn Clock>,
    ) -> tokio::task::JoinHandle<()> {
        let ttl = i64::try_from(lease_ttl.as_secs()).unwrap_or(i64::MAX);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TICK).await;
                let due = self.due(clock.unix());
                if due.is_empty() {
                    continue;
                }
                match leases
                    .try_lease(REFRESHER_LEASE, &holder, clock.unix(), ttl)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        // Another server refreshes; look again after the shortest interval.
                        self.postpone(&due, clock.unix());
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "federation refresher: lease check failed; will retry");
                        continue;
                    }
                }
                for td in due {
                    match self.refresh(&td, "federation-refresher").await {
                        Ok(r) if r.updated => {
                            tracing::info!(trust_domain = %td, sequence = r.sequence, "federated bundle refreshed")
                        }
                        Ok(_) => tracing::debug!(trust_domain = %td, "federated bundle unchanged"),
                        Err(e) => {
                            tracing::warn!(trust_domain = %td, error = %e, "federated bundle refresh failed; will retry with backoff")
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_follows_the_hint_within_bounds() {
        let min = Duration::from_secs(30);
        assert_eq!(next_interval(0, min), DEFAULT_REFRESH);
        assert_eq!(next_interval(-5, min), DEFAULT_REFRESH);
        assert_eq!(next_interval(5, min), min);
        assert_eq!(next_interval(120, min), Duration::from_secs(120));
        assert_eq!(next_interval(86_400, min), MAX_REFRESH);
        assert_eq!(
            next_interval(2, Duration::from_secs(1)),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn failures_back_off_doubling_up_to_an_hour() {
        let min = Duration::from_secs(30);
        assert_eq!(backoff(0, min), min);
        assert_eq!(backoff(1, min), Duration::from_secs(60));
        assert_eq!(backoff(3, min), Duration::from_secs(240));
        assert_eq!(backoff(40, min), MAX_REFRESH);
    }
}
