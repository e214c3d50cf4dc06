//! A CA shared by several servers on one datastore and one set of CA keys (the same PKCS#11
//! token, or the same disk key directory): exactly one of them, the holder of the
//! [`CA_LEASE`] lease, advances the rotation schedule and writes the CA journal; the others
//! build their signers and bundle from that journal (read again on every change the feed
//! reports, and on every rotation check), so the bundle is the same from every server.

use std::sync::Arc;
use std::time::Duration;

use super::{CaError, CaManager};
use crate::datastore::{CaKeyState, KeyPurpose, LeaseStore};

/// How a CA shares its trust domain with other servers on the same datastore and keys: only
/// the holder of the `ca` lease advances the rotation schedule; every other server builds its
/// signers and bundle from the CA journal the leader writes.
#[derive(Clone)]
pub struct SharedAuthority {
    /// Where the lease lives (the datastore).
    pub leases: Arc<dyn LeaseStore>,
    /// This server's holder name (unique per process).
    pub holder: String,
    /// How long the lease lasts without renewal.
    pub lease_ttl: Duration,
}

impl std::fmt::Debug for SharedAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedAuthority")
            .field("holder", &self.holder)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

/// The lease that makes one server the CA's rotator.
pub const CA_LEASE: &str = "ca-rotation";

impl CaManager {
    /// Whether this server may advance the schedule now (it alone, or it holds the lease).
    pub(super) async fn leads(&self, now: i64) -> Result<bool, CaError> {
        let Some(s) = &self.shared else {
            return Ok(true);
        };
        let ttl = i64::try_from(s.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        Ok(s.leases.try_lease(CA_LEASE, &s.holder, now, ttl).await?)
    }

    /// How often the rotation job must run: the schedule's check period, and for a shared CA
    /// at most a third of the lease lifetime (so the leader renews it in time).
    pub fn check_period(&self) -> Duration {
        let check = self.next_check_in();
        match &self.shared {
            Some(s) => check.min(s.lease_ttl / 3),
            None => check,
        }
    }

    /// Builds the signers and bundle again from the CA journal (another server rotated);
    /// returns true if they changed. Rows whose record MAC fails are left out (reported by
    /// the datastore).
    pub async fn reload(&self) -> Result<bool, CaError> {
        let _guard = self.rotate_lock.lock().await;
        self.reload_locked().await
    }

    pub(super) async fn reload_locked(&self) -> Result<bool, CaError> {
        let now = self.clock.unix();
        let mut records = self.store.list_ca_keys().await?;
        records.retain(|r| !(r.state.is_old() && r.not_after <= now));
        let sequence = self.store.bundle_sequence().await?;
        if let Some(cur) = self.snapshot_opt() {
            let active = |p: KeyPurpose| {
                records
                    .iter()
                    .find(|r| r.purpose == p && r.state == CaKeyState::Active)
            };
            let same = cur.bundle.sequence == sequence
                && active(KeyPurpose::X509) == Some(&cur.x509.record)
                && active(KeyPurpose::Jwt) == Some(&cur.jwt.record)
                && self.bundle_of(&records, sequence) == *cur.bundle;
            if same {
                return Ok(false);
            }
        }
        let snap = self.build_snapshot(&records, sequence).await?;
        let bundle = snap.bundle.clone();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(snap));
        self.bundle_tx.send_replace(bundle);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use continuity_common::{ManualClock, TrustDomain};

    use super::SharedAuthority;
    use crate::ca::{CaConfig, CaManager};
    use crate::datastore::DataStore;
    use crate::keys::{KeyManager, KeyType, MemoryKeyManager};

    const HOUR: u64 = 3600;

    async fn server(
        store: &Arc<dyn DataStore>,
        keys: &Arc<dyn KeyManager>,
        clock: &Arc<ManualClock>,
        holder: &str,
    ) -> Arc<CaManager> {
        let cfg = CaConfig {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            x509_key_type: KeyType::EcP256,
            jwt_key_type: KeyType::EcP256,
            ttl: Duration::from_secs(24 * HOUR),
            jwt_issuer: None,
            upstream: None,
        };
        let shared = SharedAuthority {
            leases: store.clone(),
            holder: holder.into(),
            lease_ttl: Duration::from_secs(30),
        };
        CaManager::start_shared(
            cfg,
            keys.clone(),
            store.clone(),
            clock.clone(),
            Some(shared),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn only_the_lease_holder_rotates_and_every_server_serves_its_bundle() {
        let (dir, _, store) = crate::datastore::scratch_sqlite("ca-shared").await;
        let store: Arc<dyn DataStore> = Arc::new(store);
        let keys: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::default());
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let a = server(&store, &keys, &clock, "a").await;
        let b = server(&store, &keys, &clock, "b").await;
        assert_eq!(*a.bundle(), *b.bundle());
        assert_eq!(a.active_x509_key_id(), b.active_x509_key_id());
        // Half the lifetime: A (holding the lease) prepares the next authority once.
        clock.advance(Duration::from_secs(12 * HOUR + 60));
        assert!(a.rotate().await.unwrap());
        assert_eq!(a.bundle().x509_authorities.len(), 2);
        // B's check does not hold the lease: it only follows what A wrote.
        assert!(b.rotate().await.unwrap());
        assert_eq!(*a.bundle(), *b.bundle());
        assert!(!b.rotate().await.unwrap());
        assert!(!b.reload().await.unwrap());
        // A dies; once its lease expired B takes over and activates, exactly once.
        clock.advance(Duration::from_secs(8 * HOUR));
        assert!(b.rotate().await.unwrap());
        assert!(!b.rotate().await.unwrap());
        assert_ne!(b.active_x509_key_id(), a.active_x509_key_id());
        // A comes back as a follower: the same signers and bundle.
        assert!(a.reload().await.unwrap());
        assert_eq!(a.active_x509_key_id(), b.active_x509_key_id());
        assert_eq!(*a.bundle(), *b.bundle());
        let records = store.list_ca_keys().await.unwrap();
        assert_eq!(
            records.len(),
            4,
            "two X.509 and two JWT authorities: {records:?}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
