//! Engines: persistent identities of logical services, their versioned keys at a custody
//! level, named KV secrets, and the incarnations that were them.
//!
//! Everything is indexed in memory and written through to the datastore; key material is
//! cached unsealed only in memory (software custody) or stays in the token (HSM custody).
//! Every admin action and key use goes to the audit log.

/// The Engine domain types, which live in the leaf [`crate::model::engine`].
pub use crate::model::engine as model;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use continuity_common::secret::Zeroizing;
use continuity_common::{Clock, SpiffeId, TrustDomain};

use crate::model::engine::{
    Algorithm, Custody, Engine, EngineKey, Incarnation, KeyVersion, Purpose, Secret, VersionState,
};
use crate::audit::{Audit, AuditEvent};
use crate::datastore::{DataStore, StoreError, Write};
use crate::keys::software::SoftwareKey;
use crate::keys::{AesKey, KeyError, KeyHandle, KeyManager};

/// The key-encryption key sealing software Engine keys and KV secrets.
pub const KEK_ID: &str = "engine-kek";
/// Default grace before a scheduled destruction.
pub const DEFAULT_DESTROY_GRACE: i64 = 24 * 3600;
const CIPHERTEXT_MAGIC: &[u8; 4] = b"cty1";
/// Default AES-GCM nonce budget per key version: random 96-bit nonces stay safe for about
/// 2^32 encryptions under one key; rotation happens well before, at 2^31.
pub const DEFAULT_MAX_ENCRYPTIONS_PER_KEY_VERSION: u64 = 1 << 31;
/// Encryptions reserved (persisted) at a time, so counting costs no write per encryption.
const ENCRYPTION_BLOCK: u64 = 4096;
/// After an automatic rotation failed, callers are refused this long without trying again.
const ROTATION_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

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

/// Unsealed (or in-token) material of one key version.
#[derive(Clone)]
enum Material {
    Signer(Arc<dyn KeyHandle>, Option<Arc<Zeroizing<Vec<u8>>>>),
    Aes(Arc<dyn AesKey>, Option<Arc<Zeroizing<Vec<u8>>>>),
}

/// AES-256-GCM with the key in process memory (transit and kv custody); wiped on drop.
struct SoftAes(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for SoftAes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftAes(..)")
    }
}

impl AesKey for SoftAes {
    fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> std::result::Result<Vec<u8>, KeyError> {
        crate::keys::aes::seal(&self.0, plaintext, aad)
    }
    fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> std::result::Result<Vec<u8>, KeyError> {
        crate::keys::aes::open(&self.0, sealed, aad)
    }
}

#[derive(Default)]
struct Index {
    engines: BTreeMap<String, Engine>,
    keys: BTreeMap<(String, String), EngineKey>,
    versions: BTreeMap<(String, String, u32), KeyVersion>,
    /// Latest version of each secret.
    secrets: BTreeMap<(String, String), Secret>,
}

/// A signature and what made it.
#[derive(Debug, Clone)]
pub struct Signature {
    /// Key version used.
    pub version: u32,
    /// ECDSA DER or RSA PKCS#1 v1.5.
    pub signature: Vec<u8>,
    /// Algorithm spelling.
    pub algorithm: Algorithm,
    /// JWKS kid of the version.
    pub kid: String,
}

/// A public key of an enabled sign-key version.
#[derive(Debug, Clone)]
pub struct PublicKey {
    /// Key name.
    pub key: String,
    /// Version.
    pub version: u32,
    /// kid.
    pub kid: String,
    /// Algorithm.
    pub algorithm: Algorithm,
    /// SubjectPublicKeyInfo DER.
    pub spki: Vec<u8>,
}

/// Lifecycle actions on a key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionAction {
    /// DISABLED → ENABLED.
    Enable,
    /// ENABLED → DISABLED.
    Disable,
    /// ENABLED/DISABLED → DESTROY_SCHEDULED.
    Destroy,
    /// DESTROY_SCHEDULED → DISABLED.
    Restore,
}

impl std::str::FromStr for VersionAction {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "enable" => Ok(Self::Enable),
            "disable" => Ok(Self::Disable),
            "destroy" => Ok(Self::Destroy),
            "restore" => Ok(Self::Restore),
            o => Err(format!(
                "action {o:?} is not one of enable, disable, destroy, restore"
            )),
        }
    }
}

fn valid_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(EngineError::Invalid(format!(
            "{kind} name {name:?} must be 1-63 characters of a-z, 0-9, '-' and '_'"
        )))
    }
}

fn binding(engine: &str, key: &str, version: u32) -> String {
    format!("continuity/engine/{engine}/{key}/v{version}")
}

/// The Engine registry and key service.
pub struct Engines {
    trust_domain: TrustDomain,
    store: Arc<dyn DataStore>,
    keys: Arc<dyn KeyManager>,
    clock: Arc<dyn Clock>,
    audit: Arc<Audit>,
    index: RwLock<Index>,
    writes: tokio::sync::Mutex<()>,
    material: Mutex<HashMap<(String, String, u32), Material>>,
    /// Nonce budget per key version: encryptions used and reserved in the datastore.
    budgets: Mutex<HashMap<(String, String, u32), NonceBudget>>,
    /// Serializes block reservations (the hot path never waits on it).
    reserve_lock: tokio::sync::Mutex<()>,
    max_encryptions: AtomicU64,
    /// Key versions whose automatic rotation failed: when, and the refusal (one entry per
    /// exhausted primary version, so bounded by the keys the admin created).
    rotation_failures: Mutex<HashMap<(String, String, u32), RotationFailure>>,
}

/// When an automatic rotation failed, and the refusal given meanwhile.
type RotationFailure = (std::time::Instant, String);

/// Encryptions of one key version: `used` never passes `reserved`, which is persisted first.
#[derive(Debug, Clone, Copy)]
struct NonceBudget {
    used: u64,
    reserved: u64,
}

/// What taking one nonce from a version's budget found.
enum Nonce {
    /// Taken; encrypt.
    Taken,
    /// The reserved block is used up: reserve another.
    Reserve,
    /// The version has had its maximum: rotate.
    Exhausted,
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
        store: Arc<dyn DataStore>,
        keys: Arc<dyn KeyManager>,
        clock: Arc<dyn Clock>,
        audit: Arc<Audit>,
    ) -> Result<Arc<Self>> {
        let mut index = Index::default();
        for e in store.list_engines().await? {
            index.engines.insert(e.name.clone(), e);
        }
        for k in store.list_engine_keys().await? {
            index.keys.insert((k.engine.clone(), k.name.clone()), k);
        }
        for v in store.list_key_versions().await? {
            index
                .versions
                .insert((v.engine.clone(), v.key.clone(), v.version), v);
        }
        for s in store.list_secrets().await? {
            index.secrets.insert((s.engine.clone(), s.name.clone()), s);
        }
        Ok(Arc::new(Self {
            trust_domain,
            store,
            keys,
            clock,
            audit,
            index: RwLock::new(index),
            writes: tokio::sync::Mutex::new(()),
            material: Mutex::default(),
            budgets: Mutex::default(),
            reserve_lock: tokio::sync::Mutex::new(()),
            max_encryptions: AtomicU64::new(DEFAULT_MAX_ENCRYPTIONS_PER_KEY_VERSION),
            rotation_failures: Mutex::default(),
        }))
    }

    /// Sets how many encryptions one key version may do before it is rotated automatically
    /// (`[engines] max_encryptions_per_key_version`; at least 1).
    pub fn set_max_encryptions_per_key_version(&self, max: u64) {
        self.max_encryptions.store(max.max(1), Ordering::Relaxed);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The audit log these operations write to.
    pub fn audit(&self) -> &Arc<Audit> {
        &self.audit
    }

    // ----- Engines -------------------------------------------------------------------------

    /// Creates an Engine. Custody defaults from the tier; more exposure than the tier's
    /// alignment needs `allow_exposure`, and is audited as an override.
    pub async fn create_engine(
        &self,
        name: &str,
        tier: i32,
        custody: Option<Custody>,
        spiffe_id: Option<&str>,
        allow_exposure: bool,
        actor: &str,
    ) -> Result<Engine> {
        valid_name("engine", name)?;
        let aligned = Custody::for_tier(tier)
            .ok_or_else(|| EngineError::Invalid(format!("tier {tier} is not 0, 1 or 2")))?;
        let custody = custody.unwrap_or(aligned);
        let exposure_override = custody > aligned;
        if exposure_override && !allow_exposure {
            return Err(EngineError::Invalid(format!(
                "custody {custody} exposes key material more than tier {tier}'s alignment ({aligned}); pass --allow-exposure to override (the override is audited)"
            )));
        }
        if custody == Custody::Hsm && !self.keys.is_hsm() {
            return Err(EngineError::Precondition(format!(
                "hsm custody needs an HSM: this server's key manager is {:?} (set [key_manager] kind = \"pkcs11\")",
                self.keys.kind()
            )));
        }
        let spiffe_id = match spiffe_id {
            Some(s) => {
                SpiffeId::new(s).map_err(|e| EngineError::Invalid(format!("spiffe_id: {e}")))?
            }
            None => self
                .trust_domain
                .id(&format!("/engine/{name}"))
                .map_err(|e| EngineError::Invalid(e.to_string()))?,
        };
        if spiffe_id.trust_domain() != self.trust_domain {
            return Err(EngineError::Invalid(format!(
                "spiffe_id {spiffe_id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        let _w = self.writes.lock().await;
        if self.read().engines.contains_key(name) {
            return Err(EngineError::AlreadyExists(format!(
                "engine {name} already exists"
            )));
        }
        let engine = Engine {
            name: name.into(),
            spiffe_id: spiffe_id.to_string(),
            tier,
            custody,
            exposure_override,
            created_at: self.clock.unix(),
        };
        let result = if exposure_override {
            format!("ok; exposure override: {custody} for tier {tier}")
        } else {
            "ok".into()
        };
        self.audit
            .commit(
                &[Write::PutEngine(engine.clone())],
                &[AuditEvent::ok(actor, "engine.create", name).result(result)],
            )
            .await?;
        self.write().engines.insert(name.into(), engine.clone());
        Ok(engine)
    }

    /// One Engine.
    pub fn engine(&self, name: &str) -> Result<Engine> {
        self.read()
            .engines
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("engine {name} not found")))
    }

    /// Every Engine.
    pub fn engines(&self) -> Vec<Engine> {
        self.read().engines.values().cloned().collect()
    }

    // ----- Keys ----------------------------------------------------------------------------

    /// A key and its versions.
    pub fn key(&self, engine: &str, name: &str) -> Result<(EngineKey, Vec<KeyVersion>)> {
        let idx = self.read();
        let k = idx
            .keys
            .get(&(engine.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| {
                EngineError::NotFound(format!("key {name} of engine {engine} not found"))
            })?;
        let versions = idx
            .versions
            .range(
                (engine.to_string(), name.to_string(), 0)
                    ..=(engine.to_string(), name.to_string(), u32::MAX),
            )
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>();
        drop(idx);
        let budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let versions = versions
            .into_iter()
            .map(|mut v| {
                if let Some(b) = budgets.get(&(v.engine.clone(), v.key.clone(), v.version)) {
                    v.encryptions = b.used;
                }
                v
            })
            .collect();
        Ok((k, versions))
    }

    /// Every key of an Engine with its versions.
    pub fn keys(&self, engine: &str) -> Result<Vec<(EngineKey, Vec<KeyVersion>)>> {
        self.engine(engine)?;
        let names: Vec<String> = self
            .read()
            .keys
            .keys()
            .filter(|(e, _)| e == engine)
            .map(|(_, n)| n.clone())
            .collect();
        names.iter().map(|n| self.key(engine, n)).collect()
    }

    /// Creates a key with its first version.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_key(
        &self,
        engine: &str,
        name: &str,
        purpose: Purpose,
        algorithm: Option<Algorithm>,
        rotation_period: i64,
        destroy_grace: i64,
        actor: &str,
    ) -> Result<EngineKey> {
        valid_name("key", name)?;
        let e = self.engine(engine)?;
        let algorithm = algorithm.unwrap_or(match purpose {
            Purpose::Sign => Algorithm::EcP256,
            Purpose::Encrypt => Algorithm::Aes256Gcm,
        });
        if algorithm.purpose() != purpose {
            return Err(EngineError::Invalid(format!(
                "algorithm {} is for {}, not {}",
                algorithm.as_str(),
                algorithm.purpose().as_str(),
                purpose.as_str()
            )));
        }
        if rotation_period < 0 || destroy_grace < 0 {
            return Err(EngineError::Invalid("periods must not be negative".into()));
        }
        let _w = self.writes.lock().await;
        if self
            .read()
            .keys
            .contains_key(&(engine.to_string(), name.to_string()))
        {
            return Err(EngineError::AlreadyExists(format!(
                "key {name} of engine {engine} already exists"
            )));
        }
        let now = self.clock.unix();
        let key = EngineKey {
            engine: engine.into(),
            name: name.into(),
            algorithm,
            custody: e.custody,
            primary_version: 1,
            rotation_period,
            destroy_grace: if destroy_grace == 0 {
                DEFAULT_DESTROY_GRACE
            } else {
                destroy_grace
            },
            next_rotation_at: if rotation_period > 0 {
                now + rotation_period
            } else {
                0
            },
            created_at: now,
        };
        let (version, material) = self.new_version(&key, 1, now).await?;
        self.audit
            .commit(
                &[
                    Write::PutKeyVersion(version.clone()),
                    Write::PutEngineKey(key.clone()),
                ],
                &[
                    AuditEvent::ok(actor, "key.create", &format!("{engine}/{name}"))
                        .version(1)
                        .result(format!("ok; {} {}", algorithm.as_str(), key.custody)),
                ],
            )
            .await?;
        {
            let mut idx = self.write();
            idx.keys.insert((engine.into(), name.into()), key.clone());
            idx.versions
                .insert((engine.into(), name.into(), 1), version);
        }
        self.cache(engine, name, 1, material);
        Ok(key)
    }

    /// Adds a version and makes it primary.
    pub async fn rotate(&self, engine: &str, name: &str, actor: &str) -> Result<EngineKey> {
        let _w = self.writes.lock().await;
        self.rotate_locked(engine, name, actor, "ok").await
    }

    /// [`Engines::rotate`] with the write lock held; `result` goes to the audit record.
    async fn rotate_locked(
        &self,
        engine: &str,
        name: &str,
        actor: &str,
        result: &str,
    ) -> Result<EngineKey> {
        let (mut key, versions) = self.key(engine, name)?;
        let next = versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        let now = self.clock.unix();
        let (version, material) = self.new_version(&key, next, now).await?;
        key.primary_version = next;
        if key.rotation_period > 0 {
            key.next_rotation_at = now + key.rotation_period;
        }
        self.audit
            .commit(
                &[
                    Write::PutKeyVersion(version.clone()),
                    Write::PutEngineKey(key.clone()),
                ],
                &[
                    AuditEvent::ok(actor, "key.rotate", &format!("{engine}/{name}"))
                        .version(next)
                        .result(result),
                ],
            )
            .await?;
        {
            let mut idx = self.write();
            idx.keys.insert((engine.into(), name.into()), key.clone());
            idx.versions
                .insert((engine.into(), name.into(), next), version);
        }
        self.cache(engine, name, next, material);
        Ok(key)
    }

    /// Changes a version's state.
    pub async fn set_state(
        &self,
        engine: &str,
        name: &str,
        version: u32,
        action: VersionAction,
        actor: &str,
    ) -> Result<EngineKey> {
        let _w = self.writes.lock().await;
        let (key, _) = self.key(engine, name)?;
        let mut v = self.version(engine, name, version)?;
        use VersionState::*;
        let (from_ok, to) = match action {
            VersionAction::Enable => (v.state == Disabled, Enabled),
            VersionAction::Disable => (v.state == Enabled, Disabled),
            VersionAction::Destroy => (matches!(v.state, Enabled | Disabled), DestroyScheduled),
            VersionAction::Restore => (v.state == DestroyScheduled, Disabled),
        };
        if !from_ok {
            return Err(EngineError::Precondition(format!(
                "version {version} of {engine}/{name} is {}; cannot {action:?}",
                v.state.as_str()
            )));
        }
        v.state = to;
        v.destroy_at = if to == DestroyScheduled {
            self.clock.unix() + key.destroy_grace
        } else {
            0
        };
        let result = if to == DestroyScheduled {
            format!("ok; destroyed at {}", v.destroy_at)
        } else {
            "ok".into()
        };
        self.audit
            .commit(
                &[Write::PutKeyVersion(v.clone())],
                &[AuditEvent::ok(
                    actor,
                    &format!("key.{}", format!("{action:?}").to_lowercase()),
                    &format!("{engine}/{name}"),
                )
                .version(version)
                .result(result)],
            )
            .await?;
        self.write()
            .versions
            .insert((engine.into(), name.into(), version), v.clone());
        Ok(key)
    }

    /// Destroys the material of versions whose grace has passed, and rotates keys whose
    /// rotation period has elapsed. Returns how many versions were destroyed.
    pub async fn tick(&self) -> Result<usize> {
        let now = self.clock.unix();
        let due: Vec<KeyVersion> = self
            .read()
            .versions
            .values()
            .filter(|v| v.state == VersionState::DestroyScheduled && v.destroy_at <= now)
            .cloned()
            .collect();
        for mut v in due.iter().cloned() {
            let _w = self.writes.lock().await;
            if !v.hsm_id.is_empty() {
                self.keys.delete(&v.hsm_id).await?;
            }
            v.sealed = None;
            v.state = VersionState::Destroyed;
            self.audit
                .commit(
                    &[Write::PutKeyVersion(v.clone())],
                    &[AuditEvent::ok(
                        "scheduler",
                        "key.destroyed",
                        &format!("{}/{}", v.engine, v.key),
                    )
                    .version(v.version)
                    .result("ok; material erased")],
                )
                .await?;
            self.material
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(v.engine.clone(), v.key.clone(), v.version));
            self.write()
                .versions
                .insert((v.engine.clone(), v.key.clone(), v.version), v.clone());
        }
        let rotate: Vec<(String, String)> = self
            .read()
            .keys
            .values()
            .filter(|k| {
                k.rotation_period > 0 && k.next_rotation_at > 0 && k.next_rotation_at <= now
            })
            .map(|k| (k.engine.clone(), k.name.clone()))
            .collect();
        for (e, k) in rotate {
            self.rotate(&e, &k, "scheduler").await?;
        }
        Ok(due.len())
    }

    fn version(&self, engine: &str, name: &str, version: u32) -> Result<KeyVersion> {
        self.read()
            .versions
            .get(&(engine.to_string(), name.to_string(), version))
            .cloned()
            .ok_or_else(|| {
                EngineError::NotFound(format!("version {version} of {engine}/{name} not found"))
            })
    }

    fn usable(
        &self,
        engine: &str,
        name: &str,
        version: u32,
        purpose: Purpose,
    ) -> Result<(EngineKey, KeyVersion)> {
        let (key, _) = self.key(engine, name)?;
        if key.algorithm.purpose() != purpose {
            return Err(EngineError::Precondition(format!(
                "key {engine}/{name} is a {} key, not {}",
                key.algorithm.purpose().as_str(),
                purpose.as_str()
            )));
        }
        let version = if version == 0 {
            key.primary_version
        } else {
            version
        };
        let v = self.version(engine, name, version)?;
        if v.state != VersionState::Enabled {
            return Err(EngineError::Precondition(format!(
                "version {version} of {engine}/{name} is {}; only ENABLED versions can be used",
                v.state.as_str()
            )));
        }
        Ok((key, v))
    }

    async fn new_version(
        &self,
        key: &EngineKey,
        version: u32,
        now: i64,
    ) -> Result<(KeyVersion, Material)> {
        let aad = binding(&key.engine, &key.name, version);
        let mut v = KeyVersion {
            engine: key.engine.clone(),
            key: key.name.clone(),
            version,
            state: VersionState::Enabled,
            kid: format!("{}-v{version}", key.name),
            public_key: vec![],
            sealed: None,
            mechanism: String::new(),
            hsm_id: String::new(),
            created_at: now,
            destroy_at: 0,
            encryptions: 0,
        };
        let material = match (key.custody, key.algorithm.key_type()) {
            (Custody::Hsm, Some(kt)) => {
                v.hsm_id = format!("engine/{}/{}/v{version}", key.engine, key.name);
                let h = self.keys.generate(&v.hsm_id, kt).await?;
                v.public_key = h.spki_der();
                v.mechanism = "pkcs11".into();
                Material::Signer(h, None)
            }
            (Custody::Hsm, None) => {
                v.hsm_id = format!("engine/{}/{}/v{version}", key.engine, key.name);
                v.mechanism = "pkcs11".into();
                Material::Aes(self.keys.generate_aes(&v.hsm_id).await?, None)
            }
            (_, Some(kt)) => {
                let id = aad.clone();
                let sk = tokio::task::spawn_blocking(move || SoftwareKey::generate(&id, kt))
                    .await
                    .map_err(|e| EngineError::Key(KeyError::Crypto(e.to_string())))??;
                let kek = self.keys.kek(KEK_ID).await?;
                v.sealed = Some(kek.seal(sk.pkcs8(), aad.as_bytes())?);
                v.mechanism = kek.mechanism().into();
                v.public_key = sk.spki_der();
                let export = Arc::new(Zeroizing::new(sk.pkcs8().to_vec()));
                Material::Signer(Arc::new(sk), Some(export))
            }
            (_, None) => {
                let raw = crate::keys::aes::generate()?;
                let kek = self.keys.kek(KEK_ID).await?;
                v.sealed = Some(kek.seal(&raw, aad.as_bytes())?);
                v.mechanism = kek.mechanism().into();
                Material::Aes(Arc::new(SoftAes(raw.clone())), Some(Arc::new(raw)))
            }
        };
        Ok((v, material))
    }

    fn cache(&self, engine: &str, key: &str, version: u32, m: Material) {
        self.material
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((engine.into(), key.into(), version), m);
    }

    async fn material(&self, key: &EngineKey, v: &KeyVersion) -> Result<Material> {
        let id = (v.engine.clone(), v.key.clone(), v.version);
        if let Some(m) = self
            .material
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            return Ok(m.clone());
        }
        let gone = || {
            EngineError::Precondition(format!(
                "the material of {}/{} v{} is gone",
                v.engine, v.key, v.version
            ))
        };
        let m = if !v.hsm_id.is_empty() {
            match key.algorithm.key_type() {
                Some(_) => {
                    Material::Signer(self.keys.get(&v.hsm_id).await?.ok_or_else(gone)?, None)
                }
                None => Material::Aes(self.keys.get_aes(&v.hsm_id).await?.ok_or_else(gone)?, None),
            }
        } else {
            let sealed = v.sealed.as_ref().ok_or_else(gone)?;
            let kek = self.keys.kek(KEK_ID).await?;
            let raw =
                Zeroizing::new(kek.open(sealed, binding(&v.engine, &v.key, v.version).as_bytes())?);
            match key.algorithm.key_type() {
                Some(kt) => {
                    let sk = SoftwareKey::from_pkcs8(
                        &binding(&v.engine, &v.key, v.version),
                        kt,
                        raw.to_vec(),
                    )?;
                    Material::Signer(Arc::new(sk), Some(Arc::new(raw)))
                }
                None => Material::Aes(Arc::new(SoftAes(raw.clone())), Some(Arc::new(raw))),
            }
        };
        self.cache(&v.engine, &v.key, v.version, m.clone());
        Ok(m)
    }

    // ----- Key use ---------------------------------------------------------------------------

    /// Signs a message (hashed with SHA-256) or a SHA-256 digest with an ENABLED version.
    pub async fn sign(
        &self,
        engine: &str,
        name: &str,
        version: u32,
        message: Option<&[u8]>,
        digest: Option<&[u8]>,
        actor: &str,
    ) -> Result<Signature> {
        let target = format!("{engine}/{name}");
        let outcome = async {
            let (key, v) = self.usable(engine, name, version, Purpose::Sign)?;
            let Material::Signer(signer, _) = self.material(&key, &v).await? else {
                return Err(EngineError::Precondition(format!(
                    "{target} is not a sign key"
                )));
            };
            let (msg, dig) = (message.map(<[u8]>::to_vec), digest.map(<[u8]>::to_vec));
            let sig = tokio::task::spawn_blocking(move || match (msg, dig) {
                (Some(m), None) => signer.sign(&m),
                (None, Some(d)) => signer.sign_digest(&d),
                _ => Err(KeyError::Crypto("give either a message or a digest".into())),
            })
            .await
            .map_err(|e| KeyError::Crypto(e.to_string()))?
            .map_err(|e| match e {
                KeyError::Crypto(m) => EngineError::Invalid(m),
                KeyError::Sign { reason, .. } if reason.contains("digest") => {
                    EngineError::Invalid(reason)
                }
                other => EngineError::Key(other),
            })?;
            Ok(Signature {
                version: v.version,
                signature: sig,
                algorithm: key.algorithm,
                kid: v.kid,
            })
        }
        .await;
        self.audit_use(
            actor,
            "key.sign",
            &target,
            outcome.as_ref().map(|s| s.version),
        )
        .await?;
        outcome
    }

    /// Encrypts with the primary version; the ciphertext names the version.
    pub async fn encrypt(
        &self,
        engine: &str,
        name: &str,
        plaintext: &[u8],
        aad: &[u8],
        actor: &str,
    ) -> Result<(u32, Vec<u8>)> {
        let target = format!("{engine}/{name}");
        let outcome = async {
            let (key, v) = self.take_nonce(engine, name).await?;
            let Material::Aes(aes, _) = self.material(&key, &v).await? else {
                return Err(EngineError::Precondition(format!(
                    "{target} is not an encrypt key"
                )));
            };
            let mut full_aad = binding(engine, name, v.version).into_bytes();
            full_aad.push(0);
            full_aad.extend_from_slice(aad);
            let pt = plaintext.to_vec();
            let sealed = tokio::task::spawn_blocking(move || aes.encrypt(&pt, &full_aad))
                .await
                .map_err(|e| KeyError::Crypto(e.to_string()))??;
            let mut out = CIPHERTEXT_MAGIC.to_vec();
            out.extend_from_slice(&v.version.to_be_bytes());
            out.extend(sealed);
            Ok((v.version, out))
        }
        .await;
        self.audit_use(actor, "key.encrypt", &target, outcome.as_ref().map(|o| o.0))
            .await?;
        outcome
    }

    /// Decrypts with the version the ciphertext names (which must be ENABLED).
    pub async fn decrypt(
        &self,
        engine: &str,
        name: &str,
        ciphertext: &[u8],
        aad: &[u8],
        actor: &str,
    ) -> Result<(u32, Vec<u8>)> {
        let target = format!("{engine}/{name}");
        let outcome = async {
            if ciphertext.len() < 8 || &ciphertext[..4] != CIPHERTEXT_MAGIC {
                return Err(EngineError::Invalid("not a Continuity ciphertext".into()));
            }
            let version =
                u32::from_be_bytes([ciphertext[4], ciphertext[5], ciphertext[6], ciphertext[7]]);
            let (key, v) = self.usable(engine, name, version, Purpose::Encrypt)?;
            let Material::Aes(aes, _) = self.material(&key, &v).await? else {
                return Err(EngineError::Precondition(format!(
                    "{target} is not an encrypt key"
                )));
            };
            let mut full_aad = binding(engine, name, version).into_bytes();
            full_aad.push(0);
            full_aad.extend_from_slice(aad);
            let sealed = ciphertext[8..].to_vec();
            let pt = tokio::task::spawn_blocking(move || aes.decrypt(&sealed, &full_aad))
                .await
                .map_err(|e| KeyError::Crypto(e.to_string()))?
                .map_err(|e| {
                    EngineError::Invalid(format!(
                        "ciphertext does not decrypt under {target} v{version}: {e}"
                    ))
                })?;
            Ok((version, pt))
        }
        .await;
        self.audit_use(actor, "key.decrypt", &target, outcome.as_ref().map(|o| o.0))
            .await?;
        outcome
    }

    /// Counts one encryption against the primary version's nonce budget and returns that
    /// version: reserves another block first when the reserved one is used up, and rotates
    /// the key when the version has had its maximum (refusing if rotation fails).
    async fn take_nonce(&self, engine: &str, name: &str) -> Result<(EngineKey, KeyVersion)> {
        // Each round either takes a nonce or makes progress (a block reserved, a rotation);
        // a few rounds cover concurrent callers doing the same.
        for _ in 0..4 {
            let (key, v) = self.usable(engine, name, 0, Purpose::Encrypt)?;
            match self.try_take_nonce(&v) {
                Nonce::Taken => return Ok((key, v)),
                Nonce::Reserve => self.reserve_nonces(&v).await?,
                Nonce::Exhausted => self.rotate_for_nonce_budget(&v).await?,
            }
        }
        Err(EngineError::Precondition(format!(
            "{engine}/{name}: no encryption budget after rotating; retry"
        )))
    }

    fn try_take_nonce(&self, v: &KeyVersion) -> Nonce {
        let max = self.max_encryptions.load(Ordering::Relaxed);
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let b = budgets
            .entry((v.engine.clone(), v.key.clone(), v.version))
            .or_insert(NonceBudget {
                used: v.encryptions,
                reserved: v.encryptions,
            });
        if b.used >= max {
            Nonce::Exhausted
        } else if b.used < b.reserved {
            b.used += 1;
            Nonce::Taken
        } else {
            Nonce::Reserve
        }
    }

    /// Persists the next block of a version's budget (never past the maximum).
    async fn reserve_nonces(&self, v: &KeyVersion) -> Result<()> {
        let _r = self.reserve_lock.lock().await;
        let id = (v.engine.clone(), v.key.clone(), v.version);
        let max = self.max_encryptions.load(Ordering::Relaxed);
        let block = {
            let budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
            match budgets.get(&id) {
                Some(b) if b.used < b.reserved || b.reserved >= max => return Ok(()),
                Some(b) => ENCRYPTION_BLOCK.min(max - b.reserved),
                None => return Ok(()),
            }
        };
        let total = self
            .store
            .reserve_encryptions(&v.engine, &v.key, v.version, block)
            .await?;
        if let Some(b) = self
            .budgets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&id)
        {
            // Ours is the block just below `total`; anything between what we had and it was
            // reserved by another server on the same datastore and counts as used.
            b.used = b.used.max(total.saturating_sub(block));
            b.reserved = b.reserved.max(total);
        }
        if let Some(iv) = self.write().versions.get_mut(&id) {
            iv.encryptions = iv.encryptions.max(total);
        }
        Ok(())
    }

    /// Rotates a key whose primary version `v` has used its nonce budget (once, however many
    /// callers find it exhausted); audited as key.rotate with the reason.
    async fn rotate_for_nonce_budget(&self, v: &KeyVersion) -> Result<()> {
        let max = self.max_encryptions.load(Ordering::Relaxed);
        let id = (v.engine.clone(), v.key.clone(), v.version);
        // A rotation that just failed is not retried by every caller (each would queue on the
        // write lock, call the KEK or HSM and log): they are refused with its reason.
        let recent_failure = || {
            let failures = self
                .rotation_failures
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            failures
                .get(&id)
                .filter(|(at, _)| at.elapsed() < ROTATION_RETRY)
                .map(|(_, msg)| EngineError::Precondition(msg.clone()))
        };
        if let Some(e) = recent_failure() {
            return Err(e);
        }
        let _w = self.writes.lock().await;
        if let Some(e) = recent_failure() {
            return Err(e);
        }
        let (key, _) = self.key(&v.engine, &v.key)?;
        if key.primary_version != v.version {
            return Ok(());
        }
        let reason = format!(
            "ok; reason: nonce budget ({max} encryptions of v{})",
            v.version
        );
        match self
            .rotate_locked(&v.engine, &v.key, "server", &reason)
            .await
        {
            Ok(k) => {
                tracing::info!(engine = %v.engine, key = %v.key, version = k.primary_version, "key rotated: the previous version used its AES-GCM nonce budget");
                Ok(())
            }
            Err(e) => {
                tracing::error!(engine = %v.engine, key = %v.key, error = %e, "nonce budget used up and automatic rotation failed; encryption refused");
                let msg = format!(
                    "version {} of {}/{} has used its nonce budget of {max} encryptions and automatic rotation failed ({e}); encryption is refused until the key is rotated",
                    v.version, v.engine, v.key
                );
                self.rotation_failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, (std::time::Instant::now(), msg.clone()));
                Err(EngineError::Precondition(msg))
            }
        }
    }

    async fn audit_use(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        outcome: std::result::Result<u32, &EngineError>,
    ) -> Result<()> {
        let (version, result) = match outcome {
            Ok(v) => (v, "ok".to_string()),
            Err(e) => (0, format!("refused: {e}")),
        };
        self.audit
            .record(actor, action, target, version, &result)
            .await?;
        Ok(())
    }

    /// The public key of a sign-key version (0 = primary), unless destroyed.
    pub fn public_key(&self, engine: &str, name: &str, version: u32) -> Result<PublicKey> {
        let (key, _) = self.key(engine, name)?;
        if key.algorithm.purpose() != Purpose::Sign {
            return Err(EngineError::Precondition(format!(
                "{engine}/{name} is an encrypt key: it has no public key"
            )));
        }
        let version = if version == 0 {
            key.primary_version
        } else {
            version
        };
        let v = self.version(engine, name, version)?;
        if v.state == VersionState::Destroyed {
            return Err(EngineError::Precondition(format!(
                "version {version} of {engine}/{name} is DESTROYED"
            )));
        }
        Ok(PublicKey {
            key: name.into(),
            version,
            kid: v.kid,
            algorithm: key.algorithm,
            spki: v.public_key,
        })
    }

    /// Public keys of every ENABLED sign-key version of an Engine.
    pub fn public_keys(&self, engine: &str) -> Result<Vec<PublicKey>> {
        self.engine(engine)?;
        let idx = self.read();
        Ok(idx
            .versions
            .values()
            .filter(|v| {
                v.engine == engine && v.state == VersionState::Enabled && !v.public_key.is_empty()
            })
            .filter_map(|v| {
                let k = idx.keys.get(&(v.engine.clone(), v.key.clone()))?;
                Some(PublicKey {
                    key: v.key.clone(),
                    version: v.version,
                    kid: v.kid.clone(),
                    algorithm: k.algorithm,
                    spki: v.public_key.clone(),
                })
            })
            .collect())
    }

    /// The Engine's JWKS (every ENABLED sign-key version, stable kids).
    pub fn jwks(&self, engine: &str) -> Result<serde_json::Value> {
        let mut keys = Vec::new();
        for pk in self.public_keys(engine)? {
            let mut jwk = continuity_common::jwk::from_spki(&pk.spki)
                .map_err(|e| EngineError::Invalid(e.to_string()))?;
            jwk.insert("kid".into(), pk.kid.into());
            jwk.insert("alg".into(), pk.algorithm.jws_alg().into());
            jwk.insert("use".into(), "sig".into());
            keys.push(serde_json::Value::Object(jwk));
        }
        Ok(serde_json::json!({ "keys": keys }))
    }

    // ----- KV custody -------------------------------------------------------------------------

    /// Stores a new version of a named secret (KV custody Engines only).
    pub async fn put_secret(
        &self,
        engine: &str,
        name: &str,
        value: &[u8],
        actor: &str,
    ) -> Result<u32> {
        valid_name("secret", name)?;
        let e = self.engine(engine)?;
        if e.custody != Custody::Kv {
            return Err(EngineError::Precondition(format!(
                "named secrets are delivered into workloads (KV custody); engine {engine} has {} custody",
                e.custody
            )));
        }
        let _w = self.writes.lock().await;
        let version = self
            .read()
            .secrets
            .get(&(engine.into(), name.into()))
            .map_or(1, |s| s.version + 1);
        let kek = self.keys.kek(KEK_ID).await?;
        let aad = format!("continuity/engine/{engine}/secret/{name}/v{version}");
        let secret = Secret {
            engine: engine.into(),
            name: name.into(),
            version,
            sealed: kek.seal(value, aad.as_bytes())?,
            mechanism: kek.mechanism().into(),
            created_at: self.clock.unix(),
        };
        self.audit
            .commit(
                &[Write::PutSecret(secret.clone())],
                &[
                    AuditEvent::ok(actor, "secret.put", &format!("{engine}/{name}"))
                        .version(version),
                ],
            )
            .await?;
        self.write()
            .secrets
            .insert((engine.into(), name.into()), secret);
        Ok(version)
    }

    /// A named secret, or the primary material of a KV-custody key, for delivery into a
    /// workload. Refused for transit and hsm custody.
    pub async fn fetch_secret(
        &self,
        engine: &str,
        name: &str,
        actor: &str,
    ) -> Result<(u32, Vec<u8>)> {
        let target = format!("{engine}/{name}");
        let outcome = async {
            let e = self.engine(engine)?;
            match e.custody {
                Custody::Hsm => {
                    return Err(EngineError::Denied(format!(
                        "engine {engine} has hsm custody: its keys are generated and used inside the HSM and can never be exported"
                    )));
                }
                Custody::Transit => {
                    return Err(EngineError::Denied(format!(
                        "engine {engine} has transit custody: its key material never leaves the server; ask the server to sign or encrypt instead"
                    )));
                }
                Custody::Kv => {}
            }
            let secret = self.read().secrets.get(&(engine.to_string(), name.to_string())).cloned();
            if let Some(s) = secret {
                let kek = self.keys.kek(KEK_ID).await?;
                let aad = format!("continuity/engine/{engine}/secret/{name}/v{}", s.version);
                return Ok((s.version, kek.open(&s.sealed, aad.as_bytes())?));
            }
            let (key, v) = self
                .usable(engine, name, 0, Purpose::Sign)
                .or_else(|_| self.usable(engine, name, 0, Purpose::Encrypt))
                .map_err(|_| EngineError::NotFound(format!("engine {engine} has no secret or usable key named {name}")))?;
            if key.custody != Custody::Kv {
                return Err(EngineError::Denied(format!("key {target} has {} custody and cannot be exported", key.custody)));
            }
            match self.material(&key, &v).await? {
                Material::Signer(_, Some(raw)) | Material::Aes(_, Some(raw)) => Ok((v.version, raw.to_vec())),
                _ => Err(EngineError::Denied(format!("key {target} cannot be exported"))),
            }
        }
        .await;
        self.audit_use(
            actor,
            "secret.fetch",
            &target,
            outcome.as_ref().map(|o| o.0),
        )
        .await?;
        outcome
    }

    // ----- Incarnations ------------------------------------------------------------------------

    /// Records that a workload was (again) this Engine.
    pub async fn record_incarnation(&self, mut inc: Incarnation) -> Result<()> {
        self.engine(&inc.engine)?;
        inc.first_seen = inc.first_seen.min(inc.last_seen);
        self.store.upsert_incarnation(&inc).await?;
        Ok(())
    }

    /// The workloads that were this Engine.
    pub async fn incarnations(&self, engine: &str) -> Result<Vec<Incarnation>> {
        self.engine(engine)?;
        Ok(self.store.list_incarnations(engine).await?)
    }
}

#[cfg(test)]
mod tests;
