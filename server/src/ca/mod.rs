//! The certificate authority: X.509 CA and JWT signing keys, their scheduled rotation, the bundle.
//!
//! Keys follow SPIRE's schedule: the next key is *prepared* (published in the bundle) at 1/2 of
//! the active key's lifetime and *activated* at 5/6; a retired key's public part stays in the
//! bundle until it expires, so everything it signed keeps verifying. Every bundle change bumps
//! the sequence number. Time comes from a [`Clock`], so tests drive the schedule.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use continuity_common::{Clock, TrustDomain};
use rcgen::Issuer;
use tokio::sync::watch;

mod authority;
pub mod csr;
pub mod profile;
mod shared;
mod sign;
pub mod upstream;

pub use crate::trust_bundle::{Bundle, JwtAuthority};
pub use authority::{AuthorityError, AuthorityKind, AuthoritySlots, AuthorityState};
pub use shared::{CA_LEASE, SharedAuthority};
pub use sign::SignedSvid;

use crate::datastore::{CaKeyRecord, CaKeyState, CaStore, KeyPurpose, StoreError};
use crate::keys::{KeyError, KeyHandle, KeyManager, KeyType, RcgenKey};

/// CA failures.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The key manager failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A certificate could not be built.
    #[error("certificate profile: {0}")]
    Profile(String),
    /// A CSR was malformed, refused by the CSR policy, or its signature did not verify.
    #[error(transparent)]
    Csr(#[from] csr::CsrError),
    /// rcgen refused to sign.
    #[error("signing failed: {0}")]
    Sign(String),
    /// No randomness for a serial number or key id.
    #[error(transparent)]
    Rng(#[from] continuity_common::rand::RngError),
    /// The upstream authority is unusable.
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
}

/// What the CA needs from the config.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// X.509 CA key type.
    pub x509_key_type: KeyType,
    /// JWT signing key type (ES256 → ec-p256).
    pub jwt_key_type: KeyType,
    /// Lifetime of each CA / JWT key.
    pub ttl: Duration,
    /// `iss` claim of JWT-SVIDs.
    pub jwt_issuer: Option<String>,
    /// The upstream authority that signs each X.509 CA (None: the CA is its own root).
    pub upstream: Option<Arc<upstream::UpstreamAuthority>>,
}

type CaIssuer = Issuer<'static, RcgenKey>;

struct X509Signer {
    record: CaKeyRecord,
    issuer: CaIssuer,
    intermediates: Vec<Vec<u8>>,
}

struct JwtSigner {
    record: CaKeyRecord,
    key: Arc<dyn KeyHandle>,
}

/// What signs right now, plus the bundle; replaced as a whole on rotation.
struct Snapshot {
    x509: Arc<X509Signer>,
    jwt: Arc<JwtSigner>,
    bundle: Arc<Bundle>,
}

/// The trust domain's certificate authority.
pub struct CaManager {
    cfg: CaConfig,
    keys: Arc<dyn KeyManager>,
    store: Arc<dyn CaStore>,
    clock: Arc<dyn Clock>,
    current: RwLock<Option<Arc<Snapshot>>>,
    rotate_lock: tokio::sync::Mutex<()>,
    bundle_tx: watch::Sender<Arc<Bundle>>,
    /// Set when several servers share the trust domain (None: this CA alone rotates).
    shared: Option<SharedAuthority>,
}

impl std::fmt::Debug for CaManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaManager")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn random_id(prefix: &str, now: i64) -> Result<String, CaError> {
    let b = continuity_common::rand::array::<6>()?;
    Ok(format!("{prefix}-{now}-{}", hex::encode(b)))
}

impl CaManager {
    /// Loads the CA state from the datastore and key manager, creating or rotating keys as the
    /// schedule requires. After this returns the CA can sign.
    pub async fn start(
        cfg: CaConfig,
        keys: Arc<dyn KeyManager>,
        store: Arc<dyn CaStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, CaError> {
        Self::start_shared(cfg, keys, store, clock, None).await
    }

    /// [`CaManager::start`] for one of several servers sharing the trust domain (`shared`):
    /// a server that does not hold the lease waits until the CA journal has authorities (made
    /// by the leader), for at most twice the lease lifetime plus a minute, then signs with them.
    pub async fn start_shared(
        cfg: CaConfig,
        keys: Arc<dyn KeyManager>,
        store: Arc<dyn CaStore>,
        clock: Arc<dyn Clock>,
        shared: Option<SharedAuthority>,
    ) -> Result<Arc<Self>, CaError> {
        let empty = Arc::new(Bundle {
            trust_domain: cfg.trust_domain.clone(),
            x509_authorities: vec![],
            jwt_authorities: vec![],
            tainted_x509: vec![],
            tainted_jwt: vec![],
            sequence: 0,
            refresh_hint: 0,
        });
        let (bundle_tx, _) = watch::channel(empty);
        let ca = Arc::new(Self {
            cfg,
            keys,
            store,
            clock,
            current: RwLock::new(None),
            rotate_lock: tokio::sync::Mutex::new(()),
            bundle_tx,
            shared,
        });
        let Some(wait) = ca
            .shared
            .as_ref()
            .map(|s| s.lease_ttl * 2 + Duration::from_secs(60))
        else {
            ca.rotate().await?;
            return Ok(ca);
        };
        let deadline = std::time::Instant::now() + wait;
        loop {
            match ca.rotate().await {
                Ok(_) if ca.snapshot_opt().is_some() => return Ok(ca),
                Ok(_) | Err(CaError::Profile(_)) if std::time::Instant::now() < deadline => {
                    tracing::info!("waiting for the CA leader to create the authorities");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Ok(_) => {
                    return Err(CaError::Profile(
                        "no CA authorities appeared in the datastore: is the leader stuck?".into(),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Advances the rotation schedule to the clock's now (only the lease holder, when shared;
    /// the others read what it wrote); returns true if the bundle changed.
    pub async fn rotate(&self) -> Result<bool, CaError> {
        let _guard = self.rotate_lock.lock().await;
        let now = self.clock.unix();
        if !self.leads(now).await? {
            return self.reload_locked().await;
        }
        let mut records = self.store.list_ca_keys().await?;
        let mut changed = false;
        for purpose in [KeyPurpose::X509, KeyPurpose::Jwt] {
            changed |= self.rotate_purpose(purpose, now, &mut records).await?;
        }
        for r in records
            .iter()
            .filter(|r| r.state.is_old() && r.not_after <= now)
        {
            tracing::info!(key_id = %r.key_id, "expired authority dropped from the bundle");
            self.store.delete_ca_key(&r.key_id).await?;
            changed = true;
        }
        records.retain(|r| !(r.state.is_old() && r.not_after <= now));
        let first_load = self.snapshot_opt().is_none();
        if !changed && !first_load && self.shared.is_some() {
            // What a former leader wrote since this server last looked.
            return self.reload_locked().await;
        }
        if changed || first_load {
            let sequence = if changed {
                self.store.next_bundle_sequence().await?
            } else {
                self.store.bundle_sequence().await?
            };
            let snap = self.build_snapshot(&records, sequence).await?;
            let bundle = snap.bundle.clone();
            *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(snap));
            self.bundle_tx.send_replace(bundle);
        }
        Ok(changed)
    }

    async fn rotate_purpose(
        &self,
        purpose: KeyPurpose,
        now: i64,
        records: &mut Vec<CaKeyRecord>,
    ) -> Result<bool, CaError> {
        let mut changed = false;
        // A signing key whose private part is gone (memory key manager restarted, token wiped)
        // cannot sign again: retire it, keeping its public part in the bundle until expiry.
        for r in records
            .iter_mut()
            .filter(|r| r.purpose == purpose && !r.state.is_old())
        {
            if r.not_after <= now || self.keys.get(&r.key_id).await?.is_none() {
                tracing::warn!(key_id = %r.key_id, "authority expired or its private key is unavailable; retiring it");
                r.state = CaKeyState::Retired;
                self.store.put_ca_key(r).await?;
                changed = true;
            }
        }
        let active = records
            .iter()
            .position(|r| r.purpose == purpose && r.state == CaKeyState::Active);
        let prepared = records
            .iter()
            .position(|r| r.purpose == purpose && r.state == CaKeyState::Prepared);
        match (active, prepared) {
            (None, Some(p)) => {
                self.set_state(&mut records[p], CaKeyState::Active).await?;
                changed = true;
            }
            (None, None) => {
                let r = self.generate(purpose, now, CaKeyState::Active).await?;
                records.push(r);
                changed = true;
            }
            (Some(a), p) => {
                let (nb, na) = (records[a].not_before, records[a].not_after);
                let life = na - nb;
                if p.is_none() && now >= nb + life / 2 {
                    let r = self.generate(purpose, now, CaKeyState::Prepared).await?;
                    tracing::info!(key_id = %r.key_id, ?purpose, "next authority prepared");
                    records.push(r);
                    changed = true;
                } else if let Some(p) = p.filter(|_| now >= nb + life * 5 / 6) {
                    // Retired first: a crash between the two writes leaves no active and one
                    // prepared authority, which the next start activates (above), never two
                    // active ones.
                    self.set_state(&mut records[a], CaKeyState::Retired).await?;
                    self.set_state(&mut records[p], CaKeyState::Active).await?;
                    // The retired private key never signs again.
                    self.keys.delete(&records[a].key_id).await?;
                    tracing::info!(key_id = %records[p].key_id, ?purpose, "authority activated");
                    changed = true;
                }
            }
        }
        Ok(changed)
    }

    async fn set_state(&self, r: &mut CaKeyRecord, state: CaKeyState) -> Result<(), CaError> {
        r.state = state;
        self.store.put_ca_key(r).await?;
        Ok(())
    }

    async fn generate(
        &self,
        purpose: KeyPurpose,
        now: i64,
        state: CaKeyState,
    ) -> Result<CaKeyRecord, CaError> {
        let ttl = self.cfg.ttl.as_secs() as i64;
        let (prefix, key_type) = match purpose {
            KeyPurpose::X509 => ("x509-ca", self.cfg.x509_key_type),
            KeyPurpose::Jwt => ("jwt", self.cfg.jwt_key_type),
        };
        let key_id = random_id(prefix, now)?;
        let key = self.keys.generate(&key_id, key_type).await?;
        let mut not_after = now + ttl;
        let (cert_der, kid) = match purpose {
            KeyPurpose::X509 => {
                let up = self.cfg.upstream.clone();
                not_after = upstream::ca_not_after(up.as_deref(), not_after);
                let params = profile::ca_params(self.cfg.trust_domain.name(), now, not_after)?;
                let signer = RcgenKey(key.clone());
                let cert = tokio::task::spawn_blocking(move || {
                    upstream::issue_ca_cert(up, params, &signer)
                })
                .await
                .map_err(|e| CaError::Sign(e.to_string()))??;
                (cert, String::new())
            }
            KeyPurpose::Jwt => {
                let b = continuity_common::rand::array::<16>()?;
                (
                    Vec::new(),
                    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b),
                )
            }
        };
        let record = CaKeyRecord {
            key_id,
            purpose,
            state,
            key_type: key_type.as_str().into(),
            cert_der,
            public_key: key.spki_der(),
            kid,
            not_before: now,
            not_after,
        };
        self.store.put_ca_key(&record).await?;
        Ok(record)
    }

    async fn build_snapshot(
        &self,
        records: &[CaKeyRecord],
        sequence: u64,
    ) -> Result<Snapshot, CaError> {
        let mut x509 = None;
        let mut jwt = None;
        for r in records.iter().filter(|r| r.state == CaKeyState::Active) {
            let key = self.keys.get(&r.key_id).await?.ok_or_else(|| {
                KeyError::Storage(format!(
                    "active key {} vanished from the key manager",
                    r.key_id
                ))
            })?;
            match r.purpose {
                KeyPurpose::X509 => {
                    let issuer =
                        Issuer::from_ca_cert_der(&r.cert_der.clone().into(), RcgenKey(key))
                            .map_err(|e| CaError::Profile(e.to_string()))?;
                    x509 = Some(Arc::new(X509Signer {
                        intermediates: upstream::intermediates(
                            self.cfg.upstream.as_deref(),
                            &r.cert_der,
                        ),
                        record: r.clone(),
                        issuer,
                    }));
                }
                KeyPurpose::Jwt => {
                    jwt = Some(Arc::new(JwtSigner {
                        record: r.clone(),
                        key,
                    }))
                }
            }
        }
        let (Some(x509), Some(jwt)) = (x509, jwt) else {
            return Err(CaError::Profile(
                "no active X.509 or JWT authority after rotation".into(),
            ));
        };
        Ok(Snapshot {
            x509,
            jwt,
            bundle: Arc::new(self.bundle_of(records, sequence)),
        })
    }

    /// The bundle of the journal `records` at `sequence`.
    fn bundle_of(&self, records: &[CaKeyRecord], sequence: u64) -> Bundle {
        let mut sorted: Vec<&CaKeyRecord> = records.iter().collect();
        sorted.sort_by_key(|r| r.not_before);
        Bundle {
            trust_domain: self.cfg.trust_domain.clone(),
            x509_authorities: upstream::bundle_x509(
                self.cfg.upstream.as_deref(),
                sorted
                    .iter()
                    .filter(|r| r.purpose == KeyPurpose::X509)
                    .map(|r| r.cert_der.clone())
                    .collect(),
            ),
            jwt_authorities: sorted
                .iter()
                .filter(|r| r.purpose == KeyPurpose::Jwt)
                .map(|r| JwtAuthority {
                    key_id: r.kid.clone(),
                    public_key: r.public_key.clone(),
                    expires_at: r.not_after,
                })
                .collect(),
            tainted_x509: authority::tainted(records, KeyPurpose::X509),
            tainted_jwt: authority::tainted(records, KeyPurpose::Jwt),
            sequence,
            refresh_hint: (self.cfg.ttl.as_secs() as i64 / 10).clamp(5, 300),
        }
    }

    fn snapshot_opt(&self) -> Option<Arc<Snapshot>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn snapshot(&self) -> Result<Arc<Snapshot>, CaError> {
        self.snapshot_opt()
            .ok_or_else(|| CaError::Profile("the CA has not started".into()))
    }

    /// The current bundle.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle_tx.borrow().clone()
    }

    /// Notified on every bundle change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Bundle>> {
        self.bundle_tx.subscribe()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.cfg.trust_domain
    }

    /// The key id of the active X.509 CA (changes on activation).
    pub fn active_x509_key_id(&self) -> Option<String> {
        self.snapshot_opt().map(|s| s.x509.record.key_id.clone())
    }

    /// How long until the next scheduled rotation step is due (for the rotator's sleep).
    pub fn next_check_in(&self) -> Duration {
        let secs = (self.cfg.ttl.as_secs() / 60).clamp(1, 30);
        Duration::from_secs(secs)
    }
}

#[cfg(test)]
mod tests;
