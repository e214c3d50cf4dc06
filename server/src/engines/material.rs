//! Key material: generating a version's material where its custody says, sealing software
//! material under the key manager's KEK (the same wrapper, [`crate::keys::SoftwareKek`],
//! also serves as the software AES key), unsealing it again on first use, and the in-memory
//! cache of unsealed material.

use std::sync::Arc;

use continuity_common::secret::Zeroizing;

use super::custody::Rules;
use super::{EngineError, Engines, KEK_ID, Result, VersionId};
use crate::keys::software::SoftwareKey;
use crate::keys::{AesKey, KeyError, KeyHandle, KeyType, SoftwareKek};
use crate::model::engine::{EngineKey, KeyVersion, VersionState};

/// An exportable copy of software material (KV custody only), wiped on drop.
pub(super) type Export = Option<Arc<Zeroizing<Vec<u8>>>>;

/// Unsealed (or in-token) material of one key version.
#[derive(Clone)]
pub(super) enum Material {
    /// A signing key, and its PKCS#8 when custody allows export.
    Signer(Arc<dyn KeyHandle>, Export),
    /// An AES-256-GCM key, and its raw bytes when custody allows export.
    Aes(Arc<dyn AesKey>, Export),
}

impl Material {
    /// The exportable copy, if custody kept one.
    pub(super) fn export(&self) -> Option<&Zeroizing<Vec<u8>>> {
        match self {
            Self::Signer(_, e) | Self::Aes(_, e) => e.as_deref(),
        }
    }
}

/// What binds a version's material and ciphertexts to it (associated data and software id).
pub(super) fn binding(engine: &str, key: &str, version: u32) -> String {
    format!("continuity/engine/{engine}/{key}/v{version}")
}

fn id(v: &KeyVersion) -> VersionId {
    (v.engine.clone(), v.key.clone(), v.version)
}

/// A new ENABLED version record, without material yet.
pub(super) fn blank_version(key: &EngineKey, version: u32, now: i64) -> KeyVersion {
    KeyVersion {
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
        imported: false,
    }
}

/// Software material in memory: the signer or AES key, keeping an exportable copy only if
/// `export`. Takes `raw` over (wiped on drop).
pub(super) fn software(
    v: &KeyVersion,
    key_type: Option<KeyType>,
    mut raw: Zeroizing<Vec<u8>>,
    export: bool,
) -> Result<Material> {
    let copy = export.then(|| Arc::new(Zeroizing::new(raw.to_vec())));
    let raw = std::mem::take(&mut *raw);
    Ok(match key_type {
        Some(kt) => {
            let id = binding(&v.engine, &v.key, v.version);
            Material::Signer(Arc::new(SoftwareKey::from_pkcs8(&id, kt, raw)?), copy)
        }
        None => Material::Aes(Arc::new(SoftwareKek(raw)), copy),
    })
}

impl Engines {
    /// A new version of `key` with fresh material: generated inside the HSM for HSM custody,
    /// else in software and stored sealed under the KEK.
    pub(super) async fn new_version(
        &self,
        key: &EngineKey,
        version: u32,
        now: i64,
    ) -> Result<(KeyVersion, Material)> {
        let mut v = blank_version(key, version, now);
        let key_type = key.algorithm.key_type();
        let rules = Rules::of(key.custody);
        if rules.inside_hsm {
            let material = self.generate_in_hsm(&mut v, key_type).await?;
            return Ok((v, material));
        }
        let (raw, signer) = match key_type {
            Some(kt) => {
                let id = binding(&key.engine, &key.name, version);
                let sk = tokio::task::spawn_blocking(move || SoftwareKey::generate(&id, kt))
                    .await
                    .map_err(|e| EngineError::Key(KeyError::Crypto(e.to_string())))??;
                v.public_key = sk.spki_der();
                (Zeroizing::new(sk.pkcs8().to_vec()), Some(sk))
            }
            None => (crate::keys::aes::generate()?, None),
        };
        let (sealed, mechanism) = self
            .seal(&raw, binding(&key.engine, &key.name, version))
            .await?;
        v.sealed = Some(sealed);
        v.mechanism = mechanism;
        let material = match signer {
            Some(sk) => Material::Signer(Arc::new(sk), rules.export.then(|| Arc::new(raw))),
            None => software(&v, None, raw, rules.export)?,
        };
        Ok((v, material))
    }

    async fn generate_in_hsm(
        &self,
        v: &mut KeyVersion,
        key_type: Option<KeyType>,
    ) -> Result<Material> {
        v.hsm_id = format!("engine/{}/{}/v{}", v.engine, v.key, v.version);
        v.mechanism = "pkcs11".into();
        Ok(match key_type {
            Some(kt) => {
                let h = self.keys.generate(&v.hsm_id, kt).await?;
                v.public_key = h.spki_der();
                Material::Signer(h, None)
            }
            None => Material::Aes(self.keys.generate_aes(&v.hsm_id).await?, None),
        })
    }

    /// Seals `plaintext` under the KEK bound to `aad`: (sealed, mechanism).
    pub(super) async fn seal(
        &self,
        plaintext: &[u8],
        aad: impl AsRef<[u8]>,
    ) -> Result<(Vec<u8>, String)> {
        let kek = self.keys.kek(KEK_ID).await?;
        Ok((kek.seal(plaintext, aad.as_ref())?, kek.mechanism().into()))
    }

    /// Opens what [`Engines::seal`] sealed with the same `aad`.
    pub(super) async fn open(
        &self,
        sealed: &[u8],
        aad: impl AsRef<[u8]>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let kek = self.keys.kek(KEK_ID).await?;
        Ok(Zeroizing::new(kek.open(sealed, aad.as_ref())?))
    }

    /// Keeps a version's material for its next uses.
    pub(super) fn cache(&self, v: &KeyVersion, m: Material) {
        self.material
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id(v), m);
    }

    /// Drops a version's cached material (it was destroyed).
    pub(super) fn forget(&self, v: &KeyVersion) {
        self.material
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id(v));
    }

    /// The material of version `v` of `key`: cached, else found in the token or unsealed.
    pub(super) async fn material(&self, key: &EngineKey, v: &KeyVersion) -> Result<Material> {
        if let Some(m) = self
            .material
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id(v))
        {
            return Ok(m.clone());
        }
        let gone = || {
            EngineError::Precondition(format!(
                "the material of {}/{} v{} is gone",
                v.engine, v.key, v.version
            ))
        };
        let key_type = key.algorithm.key_type();
        let m = if !v.hsm_id.is_empty() {
            match key_type {
                Some(_) => {
                    Material::Signer(self.keys.get(&v.hsm_id).await?.ok_or_else(gone)?, None)
                }
                None => Material::Aes(self.keys.get_aes(&v.hsm_id).await?.ok_or_else(gone)?, None),
            }
        } else {
            let sealed = v.sealed.as_ref().ok_or_else(gone)?;
            let raw = self
                .open(sealed, binding(&v.engine, &v.key, v.version))
                .await?;
            software(v, key_type, raw, Rules::of(key.custody).export)?
        };
        self.cache(v, m.clone());
        Ok(m)
    }
}
