//! AES-256 secret keys inside the token (CKM_AES_GCM), used as KEKs and Engine keys.

use std::sync::Arc;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};

use super::token::Token;
use super::{LABEL_PREFIX, Pkcs11KeyManager, ck};
use crate::keys::{AesKey, Kek, KeyError};

/// An AES-256 secret key object inside the token, used with CKM_AES_GCM.
pub struct Pkcs11Aes {
    pub(super) id: String,
    pub(super) handle: ObjectHandle,
    pub(super) token: Arc<Token>,
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
    pub(super) fn generate_aes_blocking(
        token: &Arc<Token>,
        id: &str,
    ) -> Result<Pkcs11Aes, KeyError> {
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

    pub(super) fn get_aes_blocking(
        token: &Arc<Token>,
        id: &str,
    ) -> Result<Option<Pkcs11Aes>, KeyError> {
        let found = token.with_session(|s| token.find(s, id, ObjectClass::SECRET_KEY))?;
        Ok(found.map(|handle| Pkcs11Aes {
            id: id.into(),
            handle,
            token: token.clone(),
        }))
    }

    pub(super) async fn aes_blocking<T: Send + 'static>(
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
