//! Key managers: where the trust domain's private keys live (SPIRE's KeyManager plugin type).
//!
//! One trait, three implementations chosen by `[key_manager] kind`: [`memory`] (lost at
//! restart), [`disk`] (PKCS#8 files, 0600) and [`pkcs11`] (generated and used inside a token,
//! never extractable). Signing is synchronous: callers run it off the async executor.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;

mod disk;
mod memory;
mod pkcs11;
mod software;

pub use disk::DiskKeyManager;
pub use memory::MemoryKeyManager;
pub use pkcs11::Pkcs11KeyManager;

use crate::config::KeyManagerConfig;

/// A key type the CA and JWT signer can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// ECDSA P-256 with SHA-256.
    EcP256,
    /// ECDSA P-384 with SHA-384.
    EcP384,
    /// RSA 2048, PKCS#1 v1.5 with SHA-256.
    Rsa2048,
    /// RSA 4096, PKCS#1 v1.5 with SHA-256.
    Rsa4096,
}

impl KeyType {
    /// The config/CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcP256 => "ec-p256",
            Self::EcP384 => "ec-p384",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa4096 => "rsa-4096",
        }
    }

    /// rcgen's signature algorithm for certificates signed by this key.
    pub fn rcgen_algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Rsa2048 | Self::Rsa4096 => &rcgen::PKCS_RSA_SHA256,
        }
    }

    /// The JWS `alg` for JWT-SVIDs signed by this key.
    pub fn jws_alg(self) -> &'static str {
        match self {
            Self::EcP256 => "ES256",
            Self::EcP384 => "ES384",
            Self::Rsa2048 | Self::Rsa4096 => "RS256",
        }
    }

    /// Width in bytes of one ECDSA signature half (r or s); None for RSA.
    pub fn ecdsa_width(self) -> Option<usize> {
        match self {
            Self::EcP256 => Some(32),
            Self::EcP384 => Some(48),
            Self::Rsa2048 | Self::Rsa4096 => None,
        }
    }
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ec-p256" => Ok(Self::EcP256),
            "ec-p384" => Ok(Self::EcP384),
            "rsa-2048" => Ok(Self::Rsa2048),
            "rsa-4096" => Ok(Self::Rsa4096),
            other => Err(format!(
                "{other:?} is not one of ec-p256, ec-p384, rsa-2048, rsa-4096"
            )),
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Key manager failures.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Key generation failed.
    #[error("cannot generate {key_type} key {id}: {reason}")]
    Generate {
        /// Key id.
        id: String,
        /// Requested type.
        key_type: KeyType,
        /// Backend reason.
        reason: String,
    },
    /// Signing failed.
    #[error("signing with key {id} failed: {reason}")]
    Sign {
        /// Key id.
        id: String,
        /// Backend reason.
        reason: String,
    },
    /// Reading or writing key storage failed.
    #[error("key storage: {0}")]
    Storage(String),
    /// The PKCS#11 module or token could not be used.
    #[error("PKCS#11: {0}")]
    Pkcs11(String),
}

/// A private key held by a key manager; signs in the encoding X.509 uses
/// (ECDSA: ASN.1 DER; RSA: PKCS#1 v1.5 over SHA-256).
pub trait KeyHandle: Send + Sync + fmt::Debug {
    /// The key manager's id for this key.
    fn id(&self) -> &str;
    /// The key's type.
    fn key_type(&self) -> KeyType;
    /// The raw public key (contents of the SPKI BIT STRING).
    fn public_key_raw(&self) -> &[u8];
    /// Signs `msg` (hashing it with the key type's hash). Blocking.
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError>;

    /// SubjectPublicKeyInfo, DER.
    fn spki_der(&self) -> Vec<u8> {
        use rcgen::PublicKeyData;
        RawPublic(self.key_type(), self.public_key_raw()).subject_public_key_info()
    }
}

/// A store of private keys (SPIRE's KeyManager): generate, find again by id, delete.
#[async_trait]
pub trait KeyManager: Send + Sync + fmt::Debug {
    /// The configured kind ("memory", "disk", "pkcs11").
    fn kind(&self) -> &'static str;
    /// Generates a new key under `id`.
    async fn generate(&self, id: &str, key_type: KeyType) -> Result<Arc<dyn KeyHandle>, KeyError>;
    /// Finds the key with this id, if it exists.
    async fn get(&self, id: &str) -> Result<Option<Arc<dyn KeyHandle>>, KeyError>;
    /// Destroys the key with this id (no error if absent).
    async fn delete(&self, id: &str) -> Result<(), KeyError>;
}

/// Builds the key manager named by the config (the static plugin catalog).
pub fn from_config(cfg: &KeyManagerConfig) -> Result<Arc<dyn KeyManager>, KeyError> {
    Ok(match cfg {
        KeyManagerConfig::Memory => Arc::new(MemoryKeyManager::default()),
        KeyManagerConfig::Disk { dir } => Arc::new(DiskKeyManager::open(dir)?),
        KeyManagerConfig::Pkcs11 {
            module,
            token_label,
            pin,
        } => Arc::new(Pkcs11KeyManager::open(module, token_label, pin)?),
    })
}

/// Adapts a [`KeyHandle`] to rcgen's signing traits.
#[derive(Debug, Clone)]
pub struct RcgenKey(pub Arc<dyn KeyHandle>);

impl rcgen::PublicKeyData for RcgenKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.public_key_raw()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.0.key_type().rcgen_algorithm()
    }
}

impl rcgen::SigningKey for RcgenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg).map_err(|e| {
            tracing::error!(error = %e, "CA signing failed");
            rcgen::Error::RemoteKeyError
        })
    }
}

/// A raw public key with its algorithm, for SPKI encoding.
struct RawPublic<'a>(KeyType, &'a [u8]);

impl rcgen::PublicKeyData for RawPublic<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.1
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.0.rcgen_algorithm()
    }
}
