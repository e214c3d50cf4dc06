//! Software keys (aws-lc-rs) used by the memory and disk key managers.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};

use continuity_common::secret::Zeroizing;

use super::{KeyError, KeyHandle, KeyType};

enum Inner {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// A private key in process memory, with its PKCS#8 encoding for persistence. Our PKCS#8
/// copy is wiped on drop (aws-lc wipes its own when the key pair is freed); `Debug` shows
/// only the id and type.
pub struct SoftwareKey {
    id: String,
    key_type: KeyType,
    inner: Inner,
    public: Vec<u8>,
    pkcs8: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareKey")
            .field("id", &self.id)
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
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

    /// Loads a key from its PKCS#8 encoding (taken over and wiped on drop, also on error).
    pub fn from_pkcs8(id: &str, key_type: KeyType, pkcs8: Vec<u8>) -> Result<Self, KeyError> {
        let pkcs8 = Zeroizing::new(pkcs8);
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
                let bits = kp.public_modulus_len() * 8;
                if Some(bits) != key_type.rsa_bits() {
                    return Err(bad(format!("an RSA-{bits} key")));
                }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::keys::{KeyManager, MemoryKeyManager, SoftwareKek};

    /// True if `debug` shows `secret` as a byte list, or any long run of bytes, or its hex.
    pub(crate) fn shows_bytes(debug: &str, secret: &[u8]) -> bool {
        let list = format!("{:?}", &secret[..8.min(secret.len())]);
        let hex = hex::encode(&secret[..8.min(secret.len())]);
        let longest_run = debug
            .split(|c: char| !(c.is_ascii_digit() || c == ',' || c == ' '))
            .map(|run| run.split(',').filter(|n| !n.trim().is_empty()).count())
            .max()
            .unwrap_or(0);
        debug.contains(list.trim_end_matches(']')) || debug.contains(&hex) || longest_run >= 8
    }

    #[tokio::test]
    async fn debug_never_shows_key_material() {
        for kt in [KeyType::EcP256, KeyType::Rsa2048] {
            let k = SoftwareKey::generate("ca-1", kt).unwrap();
            let d = format!("{k:?} {k:#?}");
            assert!(!shows_bytes(&d, k.pkcs8()), "{d}");
            assert!(d.contains("ca-1"), "{d}");
        }
        let kek = SoftwareKek(vec![0xab; 32]);
        let d = format!("{kek:?}");
        assert!(!shows_bytes(&d, &kek.0) && !d.contains("171"), "{d}");

        let km = MemoryKeyManager::default();
        let k = km.generate("jwt-1", KeyType::EcP256).await.unwrap();
        let kek = km.kek("engine-kek").await.unwrap();
        let d = format!("{km:?} {k:?} {kek:?}");
        let sk = SoftwareKey::generate("x", KeyType::EcP256).unwrap();
        assert!(!shows_bytes(&d, sk.pkcs8()), "{d}");
        // The key manager's own key: its PKCS#8 is not reachable from outside, so check that
        // no byte list at all appears.
        assert!(!shows_bytes(&d, &[0; 8]), "{d}");

        let dir = std::env::temp_dir().join(format!("continuity-dbg-km-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let disk = crate::keys::DiskKeyManager::open(&dir).unwrap();
        let k = disk.generate("ca-2", KeyType::EcP256).await.unwrap();
        let _kek = disk.kek("engine-kek").await.unwrap();
        let disk_key = Arc::new(disk);
        let d = format!("{disk_key:?} {k:?}");
        assert!(!shows_bytes(&d, &[0; 8]), "{d}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
