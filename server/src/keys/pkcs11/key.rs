//! A private key inside the token, signing with C_Sign.

use std::sync::Arc;

use cryptoki::error::Error as CkError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;

use super::token::Token;
use crate::keys::{KeyError, KeyHandle, KeyType};

/// A private key object inside the token.
pub struct Pkcs11Key {
    pub(super) id: String,
    pub(super) key_type: KeyType,
    pub(super) public: Vec<u8>,
    /// The object C_Sign uses: the key's session copy, or its token object.
    pub(super) private: ObjectHandle,
    pub(super) token: Arc<Token>,
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
