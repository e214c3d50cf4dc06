//! Software keys (aws-lc-rs) used by the memory and disk key managers.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};

use super::{KeyError, KeyHandle, KeyType};

enum Inner {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// A private key in process memory, with its PKCS#8 encoding for persistence.
pub struct SoftwareKey {
    id: String,
    key_type: KeyType,
    inner: Inner,
    public: Vec<u8>,
    pkcs8: Vec<u8>,
}

impl std::fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareKey")
            .field("id", &self.id)
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl Drop for SoftwareKey {
    fn drop(&mut self) {
        // aws-lc wipes its own copy when the key pair is freed; this is ours.
        continuity_common::secret::Zeroize::zeroize(&mut self.pkcs8);
    }
}

fn ec_alg(t: KeyType) -> &'static signature::EcdsaSigningAlgorithm {
    match t {
        KeyType::EcP384 => &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
        _ => &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
    }
}

impl SoftwareKey {
    /// Generates a fresh key.
    pub fn generate(id: &str, key_type: KeyType) -> Result<Self, KeyError> {
        let err = |reason: String| KeyError::Generate {
            id: id.into(),
            key_type,
            reason,
        };
        let pkcs8 = match key_type {
            KeyType::EcP256 | KeyType::EcP384 => {
                EcdsaKeyPair::generate_pkcs8(ec_alg(key_type), &SystemRandom::new())
                    .map_err(|e| err(e.to_string()))?
                    .as_ref()
                    .to_vec()
            }
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
                use aws_lc_rs::encoding::AsDer;
                let size = match key_type {
                    KeyType::Rsa2048 => KeySize::Rsa2048,
                    KeyType::Rsa3072 => KeySize::Rsa3072,
                    _ => KeySize::Rsa4096,
                };
                let kp = RsaKeyPair::generate(size).map_err(|e| err(e.to_string()))?;
                kp.as_der()
                    .map_err(|e| err(e.to_string()))?
                    .as_ref()
                    .to_vec()
            }
        };
        Self::from_pkcs8(id, key_type, pkcs8)
    }

    /// Loads a key from its PKCS#8 encoding.
    pub fn from_pkcs8(id: &str, key_type: KeyType, pkcs8: Vec<u8>) -> Result<Self, KeyError> {
        let bad = |e: String| {
            KeyError::Storage(format!(
                "key {id} is not a valid {key_type} PKCS#8 key: {e}"
            ))
        };
        let (inner, public) = match key_type {
            KeyType::EcP256 | KeyType::EcP384 => {
                let kp = EcdsaKeyPair::from_pkcs8(ec_alg(key_type), &pkcs8)
                    .map_err(|e| bad(e.to_string()))?;
                let public = kp.public_key().as_ref().to_vec();
                (Inner::Ec(kp), public)
            }
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
                let kp = RsaKeyPair::from_pkcs8(&pkcs8).map_err(|e| bad(e.to_string()))?;
                let public = kp.public_key().as_ref().to_vec();
                (Inner::Rsa(kp), public)
            }
        };
        Ok(Self {
            id: id.into(),
            key_type,
            inner,
            public,
            pkcs8,
        })
    }

    /// The PKCS#8 encoding (secret; for the disk key manager only).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }
}

impl KeyHandle for SoftwareKey {
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
        let rng = SystemRandom::new();
        let err = |e: aws_lc_rs::error::Unspecified| KeyError::Sign {
            id: self.id.clone(),
            reason: e.to_string(),
        };
        match &self.inner {
            Inner::Ec(kp) => Ok(kp.sign(&rng, msg).map_err(err)?.as_ref().to_vec()),
            Inner::Rsa(kp) => {
                let mut sig = vec![0u8; kp.public_modulus_len()];
                kp.sign(&signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .map_err(err)?;
                Ok(sig)
            }
        }
    }

    fn sign_digest(&self, digest: &[u8]) -> Result<Vec<u8>, KeyError> {
        let err = |e: String| KeyError::Sign {
            id: self.id.clone(),
            reason: e,
        };
        let d = aws_lc_rs::digest::Digest::import_less_safe(digest, &aws_lc_rs::digest::SHA256)
            .map_err(|_| err("a SHA-256 digest is 32 bytes".into()))?;
        match &self.inner {
            Inner::Ec(kp) if self.key_type == KeyType::EcP256 => Ok(kp
                .sign_digest(&d)
                .map_err(|e| err(e.to_string()))?
                .as_ref()
                .to_vec()),
            Inner::Ec(_) => Err(err("digest signing is for P-256 and RSA keys".into())),
            Inner::Rsa(kp) => {
                let mut sig = vec![0u8; kp.public_modulus_len()];
                kp.sign_digest(&signature::RSA_PKCS1_SHA256, &d, &mut sig)
                    .map_err(|e| err(e.to_string()))?;
                Ok(sig)
            }
        }
    }
}
