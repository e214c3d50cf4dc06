//! The `pkcs11` key manager: keys are generated inside the token (CKA_TOKEN, CKA_PRIVATE,
//! CKA_SENSITIVE true; CKA_EXTRACTABLE false), found again by label after a restart, and used
//! through a pool of sessions. One `Pkcs11` context per process; every call here is blocking,
//! so async callers go through `spawn_blocking`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::{KeyError, KeyHandle, KeyManager, KeyType};
use crate::config::PinSource;

const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const LABEL_PREFIX: &str = "continuity/";

fn ck(context: &str) -> impl Fn(CkError) -> KeyError + '_ {
    move |e| KeyError::Pkcs11(format!("{context}: {e}"))
}

/// The token, its login and a pool of sessions; shared by every key handle.
struct Token {
    /// Always Some until drop, which finalizes the module.
    ctx: Option<Pkcs11>,
    slot: Slot,
    pool: Mutex<Vec<Session>>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        // Sessions close first; then the library is finalized, as PKCS#11 asks of every application.
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).clear();
        if let Some(ctx) = self.ctx.take()
            && let Err(e) = ctx.finalize()
        {
            tracing::warn!(error = %e, "PKCS#11 finalize failed");
        }
    }
}

impl Token {
    fn ctx(&self) -> Result<&Pkcs11, KeyError> {
        self.ctx
            .as_ref()
            .ok_or_else(|| KeyError::Pkcs11("module already finalized".into()))
    }

    /// Runs `f` with a pooled (or newly opened) logged-in session.
    fn with_session<T>(
        &self,
        f: impl FnOnce(&Session) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let session = match pooled {
            Some(s) => s,
            None => self
                .ctx()?
                .open_rw_session(self.slot)
                .map_err(ck("open session"))?,
        };
        let out = f(&session);
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(session);
        out
    }

    fn find(
        &self,
        s: &Session,
        id: &str,
        class: ObjectClass,
    ) -> Result<Option<ObjectHandle>, KeyError> {
        let label = format!("{LABEL_PREFIX}{id}");
        let found = s
            .find_objects(&[
                Attribute::Class(class),
                Attribute::Label(label.into_bytes()),
            ])
            .map_err(ck("find object"))?;
        Ok(found.into_iter().next())
    }
}

/// Keys inside a PKCS#11 token.
#[derive(Debug)]
pub struct Pkcs11KeyManager {
    token: Arc<Token>,
}

impl Pkcs11KeyManager {
    /// Loads the module, finds the token by label and logs in with the PIN.
    pub fn open(module: &Path, token_label: &str, pin: &PinSource) -> Result<Self, KeyError> {
        let pin = read_pin(pin)?;
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
        match session.login(UserType::User, Some(&AuthPin::new(pin.into()))) {
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
            }),
        })
    }

    fn generate_blocking(
        token: &Arc<Token>,
        id: &str,
        key_type: KeyType,
    ) -> Result<Pkcs11Key, KeyError> {
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
            KeyType::Rsa2048 | KeyType::Rsa4096 => {
                let bits = if key_type == KeyType::Rsa2048 {
                    2048
                } else {
                    4096
                };
                public.push(Attribute::ModulusBits(bits.into()));
                public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
                Mechanism::RsaPkcsKeyPairGen
            }
        };
        let (pubh, privh) = token.with_session(|s| {
            s.generate_key_pair(&mechanism, &public, &common_private)
                .map_err(|e| KeyError::Generate {
                    id: id.into(),
                    key_type,
                    reason: e.to_string(),
                })
        })?;
        let raw = token.with_session(|s| public_key_raw(s, pubh, key_type))?;
        Ok(Pkcs11Key {
            id: id.into(),
            key_type,
            public: raw,
            private: privh,
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
                private: privh,
                token: token.clone(),
            }))
        })
    }
}

fn read_pin(pin: &PinSource) -> Result<String, KeyError> {
    match pin {
        PinSource::Env(var) => std::env::var(var).map_err(|_| {
            KeyError::Pkcs11(format!(
                "environment variable {var} (key_manager.pin_env) is not set"
            ))
        }),
        PinSource::File(path) => std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
            .map_err(|e| {
                KeyError::Pkcs11(format!(
                    "cannot read key_manager.pin_file {}: {e}",
                    path.display()
                ))
            }),
    }
}

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
        KeyType::Rsa2048 | KeyType::Rsa4096 => {
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
                for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
                    while let Some(h) = token.find(s, &id, class)? {
                        s.destroy_object(h).map_err(ck("destroy object"))?;
                    }
                }
                Ok(())
            })
        })
        .await
        .map_err(|e| KeyError::Pkcs11(e.to_string()))?
    }
}

/// A private key object inside the token.
pub struct Pkcs11Key {
    id: String,
    key_type: KeyType,
    public: Vec<u8>,
    private: ObjectHandle,
    token: Arc<Token>,
}

impl std::fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("id", &self.id)
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl KeyHandle for Pkcs11Key {
    fn id(&self) -> &str {
        &self.id
    }

    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn public_key_raw(&self) -> &[u8] {
        &self.public
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        let err = |e: CkError| KeyError::Sign {
            id: self.id.clone(),
            reason: e.to_string(),
        };
        self.token.with_session(|s| match self.key_type {
            // SoftHSM lacks CKM_ECDSA_SHA256: hash here, sign the digest with CKM_ECDSA.
            KeyType::EcP256 | KeyType::EcP384 => {
                let alg = if self.key_type == KeyType::EcP256 {
                    &aws_lc_rs::digest::SHA256
                } else {
                    &aws_lc_rs::digest::SHA384
                };
                let digest = aws_lc_rs::digest::digest(alg, msg);
                let fixed = s
                    .sign(&Mechanism::Ecdsa, self.private, digest.as_ref())
                    .map_err(err)?;
                continuity_common::der::ecdsa_fixed_to_der(&fixed).map_err(|e| KeyError::Sign {
                    id: self.id.clone(),
                    reason: e.to_string(),
                })
            }
            KeyType::Rsa2048 | KeyType::Rsa4096 => s
                .sign(&Mechanism::Sha256RsaPkcs, self.private, msg)
                .map_err(err),
        })
    }
}
