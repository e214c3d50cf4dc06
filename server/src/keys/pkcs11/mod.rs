//! The `pkcs11` key manager: keys are generated inside the token (CKA_TOKEN, CKA_PRIVATE,
//! CKA_SENSITIVE true; CKA_EXTRACTABLE false), found again by label after a restart, and used
//! through a pool of sessions. One `Pkcs11` context per process; every call here is blocking,
//! so async callers go through `spawn_blocking`.
//!
//! Private keys sign through a session-object copy of the token object (`C_CopyObject` with
//! CKA_TOKEN false: the same key, still sensitive and non-extractable, inside the token and
//! gone when the process closes its sessions). SoftHSM2's file object store re-reads and
//! locks a token object's file on every attribute access, which C_Sign makes several of, so
//! signing with the token object ran at about half the token's raw rate with two threads. A
//! token that refuses the copy is used through the token object as before.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use continuity_common::secret::Zeroizing;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

use super::PinSource;
use super::{
    AesKey, ImportRequest, Imported, Kek, KeyError, KeyHandle, KeyManager, KeyType, MacKey,
};

mod aes;
mod import;
mod key;
mod mac;
mod token;

use key::Pkcs11Key;
use token::Token;

const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const LABEL_PREFIX: &str = "continuity/";

fn ck(context: &str) -> impl Fn(CkError) -> KeyError + '_ {
    move |e| KeyError::Pkcs11(format!("{context}: {e}"))
}

/// Keys inside a PKCS#11 token.
#[derive(Debug)]
pub struct Pkcs11KeyManager {
    token: Arc<Token>,
}

impl Pkcs11KeyManager {
    /// Loads the module, finds the token by label and logs in with the PIN.
    pub fn open(module: &Path, token_label: &str, pin: &PinSource) -> Result<Self, KeyError> {
        Self::open_for("key_manager", module, token_label, pin)
    }

    /// [`Pkcs11KeyManager::open`] for the config table `section` (named in PIN errors).
    pub fn open_for(
        section: &str,
        module: &Path,
        token_label: &str,
        pin: &PinSource,
    ) -> Result<Self, KeyError> {
        let pin = read_pin(section, pin)?;
        let ctx = Pkcs11::new(module).map_err(|e| {
            KeyError::Pkcs11(format!("cannot load module {}: {e}", module.display()))
        })?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(ck("initialize"))?;
        let mut slot = None;
        for s in ctx.get_slots_with_token().map_err(ck("list slots"))? {
            let info = ctx.get_token_info(s).map_err(ck("token info"))?;
            if info.label().trim_end() == token_label {
                slot = Some(s);
                break;
            }
        }
        let slot = slot.ok_or_else(|| {
            KeyError::Pkcs11(format!(
                "no token labelled {token_label:?} in module {}",
                module.display()
            ))
        })?;
        let session = ctx.open_rw_session(slot).map_err(ck("open session"))?;
        match session.login(UserType::User, Some(&AuthPin::new(pin.as_str().into()))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => {
                return Err(KeyError::Pkcs11(format!(
                    "login to token {token_label:?} failed: {e}"
                )));
            }
        }
        tracing::info!(token = token_label, module = %module.display(), "PKCS#11 token opened");
        Ok(Self {
            token: Arc::new(Token {
                ctx: Some(ctx),
                slot,
                pool: Mutex::new(vec![session]),
                copies: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn generate_blocking(
        token: &Arc<Token>,
        id: &str,
        key_type: KeyType,
    ) -> Result<Pkcs11Key, KeyError> {
        let (mechanism, public, common_private) = key_templates(id, key_type);
        let (pubh, privh) = token.with_session(|s| {
            s.generate_key_pair(&mechanism, &public, &common_private)
                .map_err(|e| KeyError::Generate {
                    id: id.into(),
                    key_type,
                    reason: e.to_string(),
                })
        })?;
        let (raw, sign_with) = token.with_session(|s| {
            let raw = public_key_raw(s, pubh, key_type)?;
            Ok((raw, token.signing_handle(s, id, privh)))
        })?;
        Ok(Pkcs11Key {
            id: id.into(),
            key_type,
            public: raw,
            private: sign_with,
            token: token.clone(),
        })
    }

    fn get_blocking(token: &Arc<Token>, id: &str) -> Result<Option<Pkcs11Key>, KeyError> {
        token.with_session(|s| {
            let Some(privh) = token.find(s, id, ObjectClass::PRIVATE_KEY)? else {
                return Ok(None);
            };
            let Some(pubh) = token.find(s, id, ObjectClass::PUBLIC_KEY)? else {
                return Err(KeyError::Pkcs11(format!(
                    "key {id} has no public key object in the token"
                )));
            };
            let attrs = s
                .get_attributes(
                    privh,
                    &[
                        AttributeType::KeyType,
                        AttributeType::Modulus,
                        AttributeType::EcParams,
                    ],
                )
                .map_err(ck("read key attributes"))?;
            let mut key_type = None;
            for a in &attrs {
                match a {
                    Attribute::EcParams(p) if p == P256_PARAMS => key_type = Some(KeyType::EcP256),
                    Attribute::EcParams(p) if p == P384_PARAMS => key_type = Some(KeyType::EcP384),
                    Attribute::Modulus(m) if m.len() <= 256 => key_type = Some(KeyType::Rsa2048),
                    Attribute::Modulus(m) if m.len() <= 384 => key_type = Some(KeyType::Rsa3072),
                    Attribute::Modulus(_) => key_type = Some(KeyType::Rsa4096),
                    _ => {}
                }
            }
            let key_type = key_type
                .ok_or_else(|| KeyError::Pkcs11(format!("key {id} has an unsupported type")))?;
            let public = public_key_raw(s, pubh, key_type)?;
            Ok(Some(Pkcs11Key {
                id: id.into(),
                key_type,
                public,
                private: token.signing_handle(s, id, privh),
                token: token.clone(),
            }))
        })
    }
}

impl Pkcs11KeyManager {
    /// A private key this key manager did not make, found by its exact CKA_LABEL (e.g. an
    /// upstream CA key imported with `softhsm2-util --import`); `public` is its public key as
    /// the certificate holds it (the caller proves the pair matches by signing). Blocking.
    pub fn external_key(
        &self,
        label: &str,
        key_type: KeyType,
        public: Vec<u8>,
    ) -> Result<Option<Arc<dyn KeyHandle>>, KeyError> {
        let token = &self.token;
        token.with_session(|s| {
            let template = [
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Token(true),
            ];
            let found = s.find_objects(&template).map_err(ck("find object"))?;
            let Some(privh) = found.into_iter().next() else {
                return Ok(None);
            };
            let id = format!("external:{label}");
            Ok(Some(Arc::new(Pkcs11Key {
                private: token.signing_handle(s, &id, privh),
                id,
                key_type,
                public,
                token: token.clone(),
            }) as Arc<dyn KeyHandle>))
        })
    }
}

/// The mechanism and the public and private templates of a new token key pair.
fn key_templates(
    id: &str,
    key_type: KeyType,
) -> (Mechanism<'static>, Vec<Attribute>, Vec<Attribute>) {
    let label = format!("{LABEL_PREFIX}{id}").into_bytes();
    let common_private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Label(label.clone()),
        Attribute::Id(id.as_bytes().to_vec()),
    ];
    let mut public = vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Label(label),
        Attribute::Id(id.as_bytes().to_vec()),
    ];
    let mechanism = match key_type {
        KeyType::EcP256 | KeyType::EcP384 => {
            let params = if key_type == KeyType::EcP256 {
                P256_PARAMS
            } else {
                P384_PARAMS
            };
            public.push(Attribute::EcParams(params.to_vec()));
            Mechanism::EccKeyPairGen
        }
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
            let bits: u64 = match key_type {
                KeyType::Rsa2048 => 2048,
                KeyType::Rsa3072 => 3072,
                _ => 4096,
            };
            public.push(Attribute::ModulusBits(bits.into()));
            public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
            Mechanism::RsaPkcsKeyPairGen
        }
    };
    (mechanism, public, common_private)
}

/// Longest PIN file accepted (PKCS#11 PINs are short).
const MAX_PIN_FILE: usize = 4096;

/// The PIN, held so that it is wiped when dropped. A `pin_file` must be a regular file (not a
/// symlink) owned by the server's uid or root and closed to group and others.
fn read_pin(section: &str, pin: &PinSource) -> Result<Zeroizing<String>, KeyError> {
    match pin {
        PinSource::Env(var) => std::env::var(var).map(Zeroizing::new).map_err(|_| {
            KeyError::Pkcs11(format!(
                "environment variable {var} ({section}.pin_env) is not set"
            ))
        }),
        PinSource::File(path) => {
            let key = format!("{section}.pin_file");
            let bytes = continuity_common::fsperm::read_private_file(path, &key, MAX_PIN_FILE)
                .map_err(|e| KeyError::Pkcs11(e.to_string()))?;
            let text = std::str::from_utf8(&bytes).map_err(|_| {
                KeyError::Pkcs11(format!(
                    "{section}.pin_file {} is not UTF-8 text",
                    path.display()
                ))
            })?;
            Ok(Zeroizing::new(
                text.trim_end_matches(['\n', '\r']).to_string(),
            ))
        }
    }
}

/// The raw public key (EC point or PKCS#1) read from a key object.
fn public_key_raw(s: &Session, pubh: ObjectHandle, key_type: KeyType) -> Result<Vec<u8>, KeyError> {
    match key_type {
        KeyType::EcP256 | KeyType::EcP384 => {
            let attrs = s
                .get_attributes(pubh, &[AttributeType::EcPoint])
                .map_err(ck("read EC point"))?;
            match attrs.first() {
                Some(Attribute::EcPoint(p)) => continuity_common::der::unwrap_ec_point(p)
                    .map_err(|e| KeyError::Pkcs11(e.to_string())),
                _ => Err(KeyError::Pkcs11("token returned no EC point".into())),
            }
        }
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
            let attrs = s
                .get_attributes(
                    pubh,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .map_err(ck("read RSA public key"))?;
            let (mut n, mut e) = (None, None);
            for a in attrs {
                match a {
                    Attribute::Modulus(m) => n = Some(m),
                    Attribute::PublicExponent(x) => e = Some(x),
                    _ => {}
                }
            }
            match (n, e) {
                (Some(n), Some(e)) => Ok(continuity_common::der::rsa_public_key(&n, &e)),
                _ => Err(KeyError::Pkcs11(
                    "token returned an incomplete RSA public key".into(),
                )),
            }
        }
    }
}

#[async_trait]
impl KeyManager for Pkcs11KeyManager {
    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    async fn generate(&self, id: &str, key_type: KeyType) -> Result<Arc<dyn KeyHandle>, KeyError> {
        let (token, id) = (self.token.clone(), id.to_string());
        let key =
            tokio::task::spawn_blocking(move || Self::generate_blocking(&token, &id, key_type))
                .await
                .map_err(|e| KeyError::Pkcs11(e.to_string()))??;
        Ok(Arc::new(key))
    }

    async fn get(&self, id: &str) -> Result<Option<Arc<dyn KeyHandle>>, KeyError> {
        let (token, id) = (self.token.clone(), id.to_string());
        let key = tokio::task::spawn_blocking(move || Self::get_blocking(&token, &id))
            .await
            .map_err(|e| KeyError::Pkcs11(e.to_string()))??;
        Ok(key.map(|k| Arc::new(k) as Arc<dyn KeyHandle>))
    }

    async fn delete(&self, id: &str) -> Result<(), KeyError> {
        let (token, id) = (self.token.clone(), id.to_string());
        tokio::task::spawn_blocking(move || {
            token.with_session(|s| {
                for class in [
                    ObjectClass::PRIVATE_KEY,
                    ObjectClass::PUBLIC_KEY,
                    ObjectClass::SECRET_KEY,
                ] {
                    // The token objects and the session copy alike.
                    while let Some(h) = token.find_any(s, &id, class)? {
                        s.destroy_object(h).map_err(ck("destroy object"))?;
                    }
                }
                token.forget_copy(&id);
                Ok(())
            })
        })
        .await
        .map_err(|e| KeyError::Pkcs11(e.to_string()))?
    }

    async fn kek(&self, id: &str) -> Result<Arc<dyn Kek>, KeyError> {
        if let Some(k) = self.aes_blocking(id, Self::get_aes_blocking).await? {
            return Ok(Arc::new(k));
        }
        Ok(Arc::new(
            self.aes_blocking(id, Self::generate_aes_blocking).await?,
        ))
    }

    async fn generate_aes(&self, id: &str) -> Result<Arc<dyn AesKey>, KeyError> {
        Ok(Arc::new(
            self.aes_blocking(id, Self::generate_aes_blocking).await?,
        ))
    }

    async fn get_aes(&self, id: &str) -> Result<Option<Arc<dyn AesKey>>, KeyError> {
        Ok(self
            .aes_blocking(id, Self::get_aes_blocking)
            .await?
            .map(|k| Arc::new(k) as Arc<dyn AesKey>))
    }

    fn is_hsm(&self) -> bool {
        true
    }

    async fn mac_key(&self, id: &str) -> Result<Arc<dyn MacKey>, KeyError> {
        // One key per id even when two first uses race: generation runs under one lock.
        static CREATE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one = CREATE.lock().await;
        Ok(Arc::new(self.aes_blocking(id, mac::get_or_generate).await?))
    }

    async fn generate_wrapping_key(
        &self,
        id: &str,
        hash: super::import_wrap::OaepHash,
    ) -> Result<Vec<u8>, KeyError> {
        let (token, id) = (self.token.clone(), id.to_string());
        tokio::task::spawn_blocking(move || Self::generate_wrapping_blocking(&token, &id, hash))
            .await
            .map_err(|e| KeyError::Pkcs11(e.to_string()))?
    }

    async fn unwrap_import(&self, request: ImportRequest) -> Result<Imported, KeyError> {
        let token = self.token.clone();
        tokio::task::spawn_blocking(move || Self::unwrap_import_blocking(&token, &request))
            .await
            .map_err(|e| KeyError::Pkcs11(e.to_string()))?
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
#[path = "import_tests.rs"]
mod import_tests;
