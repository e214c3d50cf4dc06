//! Key use: sign, encrypt, decrypt, and the public keys and JWKS of sign keys. Each use
//! resolves its key and version once, and is audited before it is answered.

use super::material::{Material, binding};
use super::registry::Pick;
use super::{EngineError, Engines, Result};
use crate::keys::KeyError;
use crate::model::engine::{Algorithm, Purpose, VersionState};

/// What every Continuity ciphertext starts with, before the big-endian version number.
const CIPHERTEXT_MAGIC: &[u8; 4] = b"cty1";

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

/// What [`Engines::sign`] signs: (message, digest), exactly one of them given.
pub type ToSign<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// A sign request names exactly one of a message and a digest (an empty field is absent):
/// the (message, digest) to pass to [`Engines::sign`].
pub fn message_or_digest<'a>(message: &'a [u8], digest: &'a [u8]) -> Result<ToSign<'a>> {
    match (message.is_empty(), digest.is_empty()) {
        (false, true) => Ok((Some(message), None)),
        (true, false) => Ok((None, Some(digest))),
        _ => Err(EngineError::Invalid(
            "give exactly one of message and digest".into(),
        )),
    }
}

/// The associated data a ciphertext of `engine/name` v`version` is sealed with: the
/// version's binding, a NUL, the caller's.
fn full_aad(engine: &str, name: &str, version: u32, aad: &[u8]) -> Vec<u8> {
    let mut full = binding(engine, name, version).into_bytes();
    full.push(0);
    full.extend_from_slice(aad);
    full
}

/// Maps a signing failure: a wrong request (no message or digest, a digest of the wrong
/// size) is the caller's; anything else is the key manager's.
fn sign_error(e: KeyError) -> EngineError {
    match e {
        KeyError::Crypto(m) => EngineError::Invalid(m),
        KeyError::Sign { reason, .. } if reason.contains("digest") => EngineError::Invalid(reason),
        other => EngineError::Key(other),
    }
}

impl Engines {
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
        let op = async {
            let pick = Pick::or_primary(version);
            let (key, v) = self.usable(engine, name, pick, Some(Purpose::Sign))?;
            let Material::Signer(signer, _) = self.material(&key, &v).await? else {
                return Err(EngineError::Precondition(format!(
                    "{target} is not a sign key"
                )));
            };
            let sign = move |signer: &dyn crate::keys::KeyHandle,
                             msg: Option<&[u8]>,
                             dig: Option<&[u8]>| match (msg, dig) {
                (Some(m), None) => signer.sign(m),
                (None, Some(d)) => signer.sign_digest(d),
                _ => Err(KeyError::Crypto("give either a message or a digest".into())),
            };
            // A software signature takes tens of microseconds: made in place, it saves two
            // thread hand-offs. A token call may block, so it goes to a blocking thread.
            let sig = if v.hsm_id.is_empty() {
                sign(signer.as_ref(), message, digest)
            } else {
                let (msg, dig) = (message.map(<[u8]>::to_vec), digest.map(<[u8]>::to_vec));
                tokio::task::spawn_blocking(move || {
                    sign(signer.as_ref(), msg.as_deref(), dig.as_deref())
                })
                .await
                .map_err(|e| KeyError::Crypto(e.to_string()))?
            }
            .map_err(sign_error)?;
            Ok(Signature {
                version: v.version,
                signature: sig,
                algorithm: key.algorithm,
                kid: v.kid.clone(),
            })
        };
        self.audited(actor, "key.sign", &target, |s| s.version, op)
            .await
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
        let op = self.seal_primary(engine, name, plaintext, aad);
        self.audited(actor, "key.encrypt", &target, |o| o.0, op)
            .await
    }

    /// Encrypts under the primary version (not audited: the caller records the use).
    pub(super) async fn seal_primary(
        &self,
        engine: &str,
        name: &str,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<(u32, Vec<u8>)> {
        let target = format!("{engine}/{name}");
        {
            let (key, v) = self.take_nonce(engine, name).await?;
            let Material::Aes(aes, _) = self.material(&key, &v).await? else {
                return Err(EngineError::Precondition(format!(
                    "{target} is not an encrypt key"
                )));
            };
            let full_aad = full_aad(engine, name, v.version, aad);
            // A data key or a rewrapped plaintext: the copy for the blocking call is wiped too.
            let pt = continuity_common::secret::Zeroizing::new(plaintext.to_vec());
            let sealed = tokio::task::spawn_blocking(move || aes.encrypt(&pt, &full_aad))
                .await
                .map_err(|e| KeyError::Crypto(e.to_string()))??;
            let mut out = Vec::with_capacity(CIPHERTEXT_MAGIC.len() + 4 + sealed.len());
            out.extend_from_slice(CIPHERTEXT_MAGIC);
            out.extend_from_slice(&v.version.to_be_bytes());
            out.extend(sealed);
            Ok((v.version, out))
        }
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
        let op = self.open_ciphertext(engine, name, ciphertext, aad);
        self.audited(actor, "key.decrypt", &target, |o| o.0, op)
            .await
    }

    /// Decrypts with the version the ciphertext names (not audited: the caller records it).
    pub(super) async fn open_ciphertext(
        &self,
        engine: &str,
        name: &str,
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<(u32, Vec<u8>)> {
        let target = format!("{engine}/{name}");
        {
            let Some((version, sealed)) = ciphertext
                .strip_prefix(CIPHERTEXT_MAGIC)
                .and_then(|rest| rest.split_first_chunk::<4>())
            else {
                return Err(EngineError::Invalid("not a Continuity ciphertext".into()));
            };
            let version = u32::from_be_bytes(*version);
            let pick = Pick::Exact(version);
            let (key, v) = self.usable(engine, name, pick, Some(Purpose::Encrypt))?;
            let Material::Aes(aes, _) = self.material(&key, &v).await? else {
                return Err(EngineError::Precondition(format!(
                    "{target} is not an encrypt key"
                )));
            };
            let full_aad = full_aad(engine, name, version, aad);
            let sealed = sealed.to_vec();
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
    }

    /// The public key of a sign-key version (0 = primary), unless destroyed.
    pub fn public_key(&self, engine: &str, name: &str, version: u32) -> Result<PublicKey> {
        let (key, v) = self.resolve(engine, name, Pick::or_primary(version), |key| {
            if key.algorithm.purpose() != Purpose::Sign {
                return Err(EngineError::Precondition(format!(
                    "{engine}/{name} is an encrypt key: it has no public key"
                )));
            }
            Ok(())
        })?;
        if v.state == VersionState::Destroyed {
            return Err(EngineError::Precondition(format!(
                "version {} of {engine}/{name} is DESTROYED",
                v.version
            )));
        }
        Ok(PublicKey {
            key: name.into(),
            version: v.version,
            kid: v.kid.clone(),
            algorithm: key.algorithm,
            spki: v.public_key.clone(),
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

    /// The Engine's JWKS (every ENABLED sign-key version, stable kids) and its continuity
    /// proofs (`endorsements`, every version's, destroyed ones included).
    pub fn jwks(&self, engine: &str) -> Result<serde_json::Value> {
        let mut keys = Vec::new();
        for pk in self.public_keys(engine)? {
            let jwk = super::endorse::public_jwk(&pk.spki, &pk.kid, pk.algorithm)?;
            keys.push(serde_json::Value::Object(jwk));
        }
        Ok(serde_json::json!({
            "keys": keys,
            "endorsements": self.published_endorsements(engine),
        }))
    }
}
