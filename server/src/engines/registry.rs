//! The registry: Engines, keys, key versions and secrets indexed in memory (each change is
//! written to the datastore, with its audit record, before it enters the index), lookups,
//! and resolving the key and the one version an operation needs under one read lock.

use std::collections::BTreeMap;
use std::sync::Arc;

use continuity_common::SpiffeId;

use super::{EngineError, Engines, Result, custody};
use crate::audit::AuditEvent;
use crate::datastore::{EngineStore, Write};
use crate::model::engine::{
    Custody, Endorsement, Engine, EngineKey, KeyVersion, Secret, VersionState,
};

/// Everything the service knows, in memory. Keys and versions are shared (`Arc`) so an
/// operation takes the one it needs without copying the others.
#[derive(Default)]
pub(super) struct Index {
    /// Engines by name.
    pub(super) engines: BTreeMap<String, Engine>,
    /// Keys by (engine, key).
    pub(super) keys: BTreeMap<(String, String), Arc<EngineKey>>,
    /// Key versions by (engine, key, version).
    pub(super) versions: BTreeMap<(String, String, u32), Arc<KeyVersion>>,
    /// Latest version of each secret.
    pub(super) secrets: BTreeMap<(String, String), Secret>,
    /// Endorsements by the (engine, key, version) they endorse.
    pub(super) endorsements: BTreeMap<(String, String, u32), Arc<Endorsement>>,
}

impl Index {
    /// Reads Engines, keys, versions and secrets from the datastore.
    pub(super) async fn load(store: &dyn EngineStore) -> Result<Self> {
        let mut index = Self::default();
        for e in store.list_engines().await? {
            index.engines.insert(e.name.clone(), e);
        }
        for k in store.list_engine_keys().await? {
            index
                .keys
                .insert((k.engine.clone(), k.name.clone()), Arc::new(k));
        }
        for v in store.list_key_versions().await? {
            index
                .versions
                .insert((v.engine.clone(), v.key.clone(), v.version), Arc::new(v));
        }
        for s in store.list_secrets().await? {
            index.secrets.insert((s.engine.clone(), s.name.clone()), s);
        }
        for e in store.list_endorsements().await? {
            let id = (e.engine.clone(), e.key.clone(), e.version);
            index.endorsements.insert(id, Arc::new(e));
        }
        Ok(index)
    }

    /// The versions of one key, oldest first.
    fn versions_of<'a>(
        &'a self,
        engine: &str,
        name: &str,
    ) -> impl DoubleEndedIterator<Item = &'a Arc<KeyVersion>> + 'a {
        let (e, n) = (engine.to_string(), name.to_string());
        self.versions
            .range((e.clone(), n.clone(), 0)..=(e, n, u32::MAX))
            .map(|(_, v)| v)
    }
}

/// Which version of a key an operation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pick {
    /// The key's primary version.
    Primary,
    /// Exactly this version.
    Exact(u32),
}

impl Pick {
    /// The wire convention: version 0 means the primary.
    pub(super) fn or_primary(version: u32) -> Self {
        if version == 0 {
            Self::Primary
        } else {
            Self::Exact(version)
        }
    }
}

/// Checks that a name is 1-63 characters of a-z, 0-9, '-' and '_', not starting with '-'.
pub(super) fn valid_name(kind: &str, name: &str) -> Result<()> {
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

fn key_not_found(engine: &str, name: &str) -> EngineError {
    EngineError::NotFound(format!("key {name} of engine {engine} not found"))
}

impl Engines {
    /// The index, for reading (a poisoned lock is recovered: every write leaves it whole).
    pub(super) fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The index, for changing (only after the change was committed to the datastore).
    pub(super) fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

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
        let (custody, exposure_override) =
            custody::for_new_engine(tier, custody, allow_exposure, self.keys.as_ref())?;
        let spiffe_id = self.engine_spiffe_id(name, spiffe_id)?;
        let _w = self.writes.lock().await;
        self.follow().await?;
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

    /// The SPIFFE ID a new Engine gets: the one asked for (in this trust domain), or
    /// `spiffe://<td>/engine/<name>`.
    fn engine_spiffe_id(&self, name: &str, requested: Option<&str>) -> Result<SpiffeId> {
        let spiffe_id = match requested {
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
        Ok(spiffe_id)
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

    /// A key and its versions (with the encryptions used so far).
    pub fn key(&self, engine: &str, name: &str) -> Result<(EngineKey, Vec<KeyVersion>)> {
        let (key, mut versions) = {
            let idx = self.read();
            let key = idx
                .keys
                .get(&(engine.to_string(), name.to_string()))
                .ok_or_else(|| key_not_found(engine, name))?;
            let versions: Vec<KeyVersion> = idx
                .versions_of(engine, name)
                .map(|v| KeyVersion::clone(v))
                .collect();
            (EngineKey::clone(key), versions)
        };
        self.budgets.show_used(&mut versions);
        Ok((key, versions))
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

    /// The key `engine/name`, shared.
    pub(super) fn key_entry(&self, engine: &str, name: &str) -> Result<Arc<EngineKey>> {
        self.read()
            .keys
            .get(&(engine.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| key_not_found(engine, name))
    }

    /// The key and the number its next version gets.
    pub(super) fn next_version(&self, engine: &str, name: &str) -> Result<(Arc<EngineKey>, u32)> {
        let idx = self.read();
        let key = idx
            .keys
            .get(&(engine.to_string(), name.to_string()))
            .ok_or_else(|| key_not_found(engine, name))?;
        let last = idx
            .versions_of(engine, name)
            .next_back()
            .map_or(0, |v| v.version);
        Ok((key.clone(), last + 1))
    }

    /// Resolves a key and one version of it under one read lock, after `check` accepted the
    /// key: the key must exist (NotFound), then pass `check`, then the version must exist.
    pub(super) fn resolve(
        &self,
        engine: &str,
        name: &str,
        pick: Pick,
        check: impl FnOnce(&EngineKey) -> Result<()>,
    ) -> Result<(Arc<EngineKey>, Arc<KeyVersion>)> {
        let idx = self.read();
        let key = idx
            .keys
            .get(&(engine.to_string(), name.to_string()))
            .ok_or_else(|| key_not_found(engine, name))?;
        check(key)?;
        let version = match pick {
            Pick::Primary => key.primary_version,
            Pick::Exact(v) => v,
        };
        let v = idx
            .versions
            .get(&(engine.to_string(), name.to_string(), version))
            .ok_or_else(|| {
                EngineError::NotFound(format!("version {version} of {engine}/{name} not found"))
            })?;
        Ok((key.clone(), v.clone()))
    }

    /// Reads Engines, keys, versions and secrets again (another server changed them): what a
    /// disabled or destroyed version was stops working here too. Rows whose record MAC fails
    /// are reported by the datastore and left out.
    pub async fn reload(&self) -> Result<()> {
        let _w = self.writes.lock().await;
        self.follow().await
    }

    /// Before a change is decided (with the write lock held): the index is read again from the
    /// datastore, so a change made through another server is never undone by writing back a
    /// stale copy of a key or version.
    pub(super) async fn follow(&self) -> Result<()> {
        let index = Index::load(self.store.as_ref()).await?;
        // Material of a version destroyed elsewhere is erased here too.
        for v in index
            .versions
            .values()
            .filter(|v| v.state == VersionState::Destroyed)
        {
            self.forget(v);
        }
        *self.write() = index;
        Ok(())
    }

    /// Puts a key and one of its versions into the index (after they were committed).
    pub(super) fn index_key_version(&self, key: EngineKey, version: KeyVersion) {
        let mut idx = self.write();
        let v = version.version;
        idx.keys
            .insert((key.engine.clone(), key.name.clone()), Arc::new(key));
        idx.versions.insert(
            (version.engine.clone(), version.key.clone(), v),
            Arc::new(version),
        );
    }

    /// Puts a version into the index (after it was committed).
    pub(super) fn index_version(&self, version: KeyVersion) {
        self.write().versions.insert(
            (version.engine.clone(), version.key.clone(), version.version),
            Arc::new(version),
        );
    }
}
