//! The controller's leader lease: with several servers on one datastore, every server watches
//! the API server (so a new leader starts from a warm view), but only the holder of the lease
//! `k8s-controller/<cluster>` writes entries. The holder renews it every third of
//! `[cluster] lease_ttl`; when it dies, another server takes the lease once it expires and
//! reconciles from its own view, against the registry the change feed keeps current.

use std::sync::Arc;
use std::time::Duration;

use continuity_common::Clock;

use crate::datastore::LeaseStore;

/// Shortest renewal period (a lease_ttl of 3 s renews every second).
const MIN_RENEW: Duration = Duration::from_secs(1);

/// The lease name of the controller of `cluster_name`.
pub fn lease_name(cluster_name: &str) -> String {
    format!("k8s-controller/{cluster_name}")
}

/// What the controller needs to take and renew its lease.
#[derive(Clone)]
pub struct Leadership {
    /// Where the lease lives (the shared datastore).
    pub leases: Arc<dyn LeaseStore>,
    /// This server's holder name.
    pub holder: String,
    /// `[cluster] lease_ttl`.
    pub lease_ttl: Duration,
    /// Time source of the lease's expiry.
    pub clock: Arc<dyn Clock>,
}

impl Leadership {
    /// How often the lease is renewed (and the view reconciled while held).
    pub fn renew_period(&self) -> Duration {
        (self.lease_ttl / 3).max(MIN_RENEW)
    }
}

/// One cluster's lease as this server sees it, logging each change of role.
pub struct Lease {
    leadership: Leadership,
    name: String,
    held: Option<bool>,
}

impl Lease {
    /// The lease of `cluster_name`, not yet tried.
    pub fn new(leadership: Leadership, cluster_name: &str) -> Self {
        Self {
            leadership,
            name: lease_name(cluster_name),
            held: None,
        }
    }

    /// How often [`Lease::hold`] must be called to keep the lease.
    pub fn renew_period(&self) -> Duration {
        self.leadership.renew_period()
    }

    /// Takes or renews the lease; whether this server may write now. A datastore failure
    /// counts as not holding it (writing without the lease could race another leader).
    pub async fn hold(&mut self) -> bool {
        let l = &self.leadership;
        let ttl = i64::try_from(l.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let now = l.clock.unix();
        let held = match l.leases.try_lease(&self.name, &l.holder, now, ttl).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "controller: lease not checked; not writing");
                false
            }
        };
        if self.held != Some(held) {
            if held {
                tracing::info!(lease = %self.name, "controller: leading (this server writes the entries)");
            } else {
                tracing::info!(lease = %self.name, "controller: standing by (another server holds the lease)");
            }
            self.held = Some(held);
        }
        held
    }
}
