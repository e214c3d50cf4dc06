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
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::{AesKey, Kek, KeyError, KeyHandle, KeyManager, KeyType};
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
    /// Open sessions, each logged in (the login is per token). Sessions are only closed on
    /// drop, so the session objects created through them live as long as the token.
    pool: Mutex<Vec<Session>>,
    /// Session-object copies of private keys, by key id.
    copies: Mutex<HashMap<String, ObjectHandle>>,
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
        // Sessions close first (taking the session objects with them); then the library is
        // finalized, as PKCS#11 asks of every application.
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

    /// The token object (not a session copy) of `class` labelled for `id`.
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
                Attribute::Token(true),
                Attribute::Label(label.into_bytes()),
            ])
            .map_err(ck("find object"))?;
        Ok(found.into_iter().next())
    }

    /// Any object (token object or session copy) of `class` labelled for `id`.
    fn find_any(
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

    /// The handle to sign with for the private key `id` (token object `private`): its
    /// session-object copy, made once; the token object itself if the token refuses a copy.
    fn signing_handle(&self, s: &Session, id: &str, private: ObjectHandle) -> ObjectHandle {
        let mut copies = self.copies.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = copies.get(id) {
            return *h;
        }
        match s.copy_object(private, &[Attribute::Token(false)]) {
            Ok(h) => {
                copies.insert(id.to_string(), h);
                h
            }
            Err(e) => {
                tracing::debug!(key = id, error = %e, "no session copy of the key; signing with the token object");
                private
            }
        }
    }

    /// Forgets the session copy of `id` (its object is destroyed by the caller).
    fn forget_copy(&self, id: &str) {
        self.copies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
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

/// Longest PIN file accepted (PKCS#11 PINs are short).
const MAX_PIN_FILE: usize = 4096;

/// The PIN, held so that it is wiped when dropped. A `pin_file` must be a regular file (not a
/// symlink) owned by the server's uid or root and closed to group and others.
fn read_pin(pin: &PinSource) -> Result<Zeroizing<String>, KeyError> {
    match pin {
        PinSource::Env(var) => std::env::var(var).map(Zeroizing::new).map_err(|_| {
            KeyError::Pkcs11(format!(
                "environment variable {var} (key_manager.pin_env) is not set"
            ))
        }),
        PinSource::File(path) => {
            let bytes = continuity_common::fsperm::read_private_file(
                path,
                "key_manager.pin_file",
                MAX_PIN_FILE,
            )
            .map_err(|e| KeyError::Pkcs11(e.to_string()))?;
            let text = std::str::from_utf8(&bytes).map_err(|_| {
                KeyError::Pkcs11(format!(
                    "key_manager.pin_file {} is not UTF-8 text",
                    path.display()
                ))
            })?;
            Ok(Zeroizing::new(
                text.trim_end_matches(['\n', '\r']).to_string(),
            ))
        }
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
}

/// A private key object inside the token.
pub struct Pkcs11Key {
    id: String,
    key_type: KeyType,
    public: Vec<u8>,
    /// The object C_Sign uses: the key's session copy, or its token object.
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
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => s
                .sign(&Mechanism::Sha256RsaPkcs, self.private, msg)
                .map_err(err),
        })
    }

    fn sign_digest(&self, digest: &[u8]) -> Result<Vec<u8>, KeyError> {
        let err = |reason: String| KeyError::Sign {
            id: self.id.clone(),
            reason,
        };
        if digest.len() != 32 {
            return Err(err("a SHA-256 digest is 32 bytes".into()));
        }
        self.token.with_session(|s| match self.key_type {
            KeyType::EcP256 => {
                let fixed = s
                    .sign(&Mechanism::Ecdsa, self.private, digest)
                    .map_err(|e| err(e.to_string()))?;
                continuity_common::der::ecdsa_fixed_to_der(&fixed).map_err(|e| err(e.to_string()))
            }
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
                // PKCS#1 v1.5 over a digest: DigestInfo(SHA-256) ‖ digest, signed with CKM_RSA_PKCS.
                let mut info = SHA256_DIGEST_INFO.to_vec();
                info.extend_from_slice(digest);
                s.sign(&Mechanism::RsaPkcs, self.private, &info)
                    .map_err(|e| err(e.to_string()))
            }
            KeyType::EcP384 => Err(err("digest signing is for P-256 and RSA keys".into())),
        })
    }
}

/// DER prefix of a PKCS#1 DigestInfo for SHA-256.
const SHA256_DIGEST_INFO: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// An AES-256 secret key object inside the token, used with CKM_AES_GCM.
pub struct Pkcs11Aes {
    id: String,
    handle: ObjectHandle,
    token: Arc<Token>,
}

impl std::fmt::Debug for Pkcs11Aes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Aes")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

const GCM_NONCE: usize = 12;

impl AesKey for Pkcs11Aes {
    fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; GCM_NONCE];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| KeyError::Crypto("no randomness".into()))?;
        let mut iv = nonce;
        let ct = self.token.with_session(|s| {
            let params = cryptoki::mechanism::aead::GcmParams::new(&mut iv, aad, 128.into())
                .map_err(ck("GCM parameters"))?;
            s.encrypt(&Mechanism::AesGcm(params), self.handle, plaintext)
                .map_err(ck("AES-GCM encrypt"))
        })?;
        let mut out = nonce.to_vec();
        out.extend(ct);
        Ok(out)
    }

    fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        if sealed.len() < GCM_NONCE + 16 {
            return Err(KeyError::Crypto("sealed data too short".into()));
        }
        let (nonce, ct) = sealed.split_at(GCM_NONCE);
        let mut iv = [0u8; GCM_NONCE];
        iv.copy_from_slice(nonce);
        self.token.with_session(|s| {
            let params = cryptoki::mechanism::aead::GcmParams::new(&mut iv, aad, 128.into())
                .map_err(ck("GCM parameters"))?;
            s.decrypt(&Mechanism::AesGcm(params), self.handle, ct)
                .map_err(|_| {
                    KeyError::Crypto(
                        "authentication failed: wrong key, data or associated data".into(),
                    )
                })
        })
    }
}

impl Kek for Pkcs11Aes {
    fn mechanism(&self) -> &'static str {
        "pkcs11:CKM_AES_GCM"
    }
    fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.encrypt(plaintext, aad)
    }
    fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.decrypt(sealed, aad)
    }
}

impl Pkcs11KeyManager {
    fn generate_aes_blocking(token: &Arc<Token>, id: &str) -> Result<Pkcs11Aes, KeyError> {
        let template = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::ValueLen(32.into()),
            Attribute::Label(format!("{LABEL_PREFIX}{id}").into_bytes()),
            Attribute::Id(id.as_bytes().to_vec()),
        ];
        let handle = token.with_session(|s| {
            s.generate_key(&Mechanism::AesKeyGen, &template)
                .map_err(ck("generate AES key"))
        })?;
        Ok(Pkcs11Aes {
            id: id.into(),
            handle,
            token: token.clone(),
        })
    }

    fn get_aes_blocking(token: &Arc<Token>, id: &str) -> Result<Option<Pkcs11Aes>, KeyError> {
        let found = token.with_session(|s| token.find(s, id, ObjectClass::SECRET_KEY))?;
        Ok(found.map(|handle| Pkcs11Aes {
            id: id.into(),
            handle,
            token: token.clone(),
        }))
    }

    async fn aes_blocking<T: Send + 'static>(
        &self,
        id: &str,
        f: fn(&Arc<Token>, &str) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let (token, id) = (self.token.clone(), id.to_string());
        tokio::task::spawn_blocking(move || f(&token, &id))
            .await
            .map_err(|e| KeyError::Pkcs11(e.to_string()))?
    }
}

#[cfg(test)]
mod tests;
