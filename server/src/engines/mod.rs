//! Engines: persistent identities of logical services, their versioned keys at a custody
//! level, named KV secrets, and the incarnations that were them.
//!
//! Everything is indexed in memory and written through to the datastore; key material is
//! cached unsealed only in memory (software custody) or stays in the token (HSM custody).
//! Every admin action and key use goes to the audit log.
//!
//! The service is one [`Engines`] value; its behaviour is split by concept, each module an
//! `impl Engines` block over the state declared here:
//! - [`registry`]: Engines, keys, versions and secrets in memory; resolving a key and the one
//!   version an operation needs.
//! - [`lifecycle`]: key creation, rotation and the version state machine (one transition
//!   table), the periodic tick.
//! - [`custody`]: the one policy of what each custody level allows.
//! - [`endorse`]: continuity proofs (each new sign-key version endorsed by the previous
//!   primary), published with the JWKS.
//! - [`material`]: generating, sealing and unsealing version material under the KEK.
//! - [`operations`]: sign, encrypt, decrypt, public keys and the JWKS.
//! - [`datakeys`]: data keys (envelope encryption) and Rewrap.
//! - [`import`]: import jobs and importing wrapped key material as a new version.
//! - [`budget`] and [`nonce`]: the AES-GCM nonce budget per version and the rotations it forces.
//! - [`secrets`]: KV custody (named secrets, delivery into workloads).
//! - [`incarnations`]: the workloads that were an Engine.
//! - [`usage`]: audit glue for key uses.

mod budget;
mod custody;
mod datakeys;
mod endorse;
mod import;
mod incarnations;
mod lifecycle;
mod material;
mod nonce;
mod operations;
mod registry;
mod secrets;
mod usage;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use continuity_common::{Clock, TrustDomain};

use crate::audit::Audit;
use crate::datastore::{EngineStore, StoreError};
use crate::keys::{KeyError, KeyManager};

pub use self::datakeys::{AES_256, DataKey, Rewrapped, check_key_spec};
pub use self::import::{IMPORT_JOB_LIFETIME, ImportVersion};
pub use self::incarnations::{SIGHTING_COALESCE_SECS, Sightings};
pub use self::lifecycle::VersionAction;
pub use self::operations::{PublicKey, Signature, ToSign, message_or_digest};
/// The Engine domain types, which live in the leaf [`crate::model::engine`].
pub use crate::model::engine as model;

/// The key-encryption key sealing software Engine keys and KV secrets.
pub const KEK_ID: &str = "engine-kek";
/// Default grace before a scheduled destruction.
pub const DEFAULT_DESTROY_GRACE: i64 = 24 * 3600;
/// Default AES-GCM nonce budget per key version: random 96-bit nonces stay safe for about
/// 2^32 encryptions under one key; rotation happens well before, at 2^31.
pub const DEFAULT_MAX_ENCRYPTIONS_PER_KEY_VERSION: u64 = 1 << 31;

/// Engine failures, mapped to gRPC statuses at the API edge.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No such Engine, key, version or secret.
    #[error("{0}")]
    NotFound(String),
    /// Already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// A request argument is wrong.
    #[error("{0}")]
    Invalid(String),
    /// Refused by custody or binding rules.
    #[error("{0}")]
    Denied(String),
    /// The key's state does not allow it.
    #[error("{0}")]
    Precondition(String),
    /// The key manager failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Result<T> = std::result::Result<T, EngineError>;

/// (engine, key, version): one key version.
type VersionId = (String, String, u32);

/// The Engine registry and key service.
pub struct Engines {
    trust_domain: TrustDomain,
    store: Arc<dyn EngineStore>,
    keys: Arc<dyn KeyManager>,
    clock: Arc<dyn Clock>,
    audit: Arc<Audit>,
    index: RwLock<registry::Index>,
    /// Serializes admin changes (and rotations) so each is checked and written as one.
    writes: tokio::sync::Mutex<()>,
    /// Unsealed (or in-token) material of the versions used so far.
    material: Mutex<HashMap<VersionId, material::Material>>,
    /// Nonce budget per key version: encryptions used and reserved in the datastore.
    budgets: budget::NonceBudgets,
    /// Serializes block reservations (the hot path never waits on it).
    reserve_lock: tokio::sync::Mutex<()>,
    /// Key versions whose automatic rotation failed: when, and the refusal (one entry per
    /// exhausted primary version, so bounded by the keys the admin created).
    rotation_failures: Mutex<HashMap<VersionId, nonce::RotationFailure>>,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines").finish_non_exhaustive()
    }
}

impl Engines {
    /// Loads Engines, keys, versions and secrets.
    pub async fn load(
        trust_domain: TrustDomain,
        store: Arc<dyn EngineStore>,
        keys: Arc<dyn KeyManager>,
        clock: Arc<dyn Clock>,
        audit: Arc<Audit>,
    ) -> Result<Arc<Self>> {
        let index = registry::Index::load(store.as_ref()).await?;
        Ok(Arc::new(Self {
            trust_domain,
            store,
            keys,
            clock,
            audit,
            index: RwLock::new(index),
            writes: tokio::sync::Mutex::new(()),
            material: Mutex::default(),
            budgets: budget::NonceBudgets::new(DEFAULT_MAX_ENCRYPTIONS_PER_KEY_VERSION),
            reserve_lock: tokio::sync::Mutex::new(()),
            rotation_failures: Mutex::default(),
        }))
    }

    /// Sets how many encryptions one key version may do before it is rotated automatically
    /// (`[engines] max_encryptions_per_key_version`; at least 1).
    pub fn set_max_encryptions_per_key_version(&self, max: u64) {
        self.budgets.set_max(max);
    }

    /// The audit log these operations write to.
    pub fn audit(&self) -> &Arc<Audit> {
        &self.audit
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
#[path = "feed_tests.rs"]
mod feed_tests;

#[cfg(test)]
#[path = "endorse_tests.rs"]
mod endorse_tests;

#[cfg(test)]
#[path = "import_tests.rs"]
mod import_tests;
