//! Key managers: where the trust domain's private keys live (SPIRE's KeyManager plugin type).
//!
//! One trait, three implementations chosen by `[key_manager] kind`: [`memory`] (lost at
//! restart), [`disk`] (PKCS#8 files, 0600) and [`pkcs11`] (generated and used inside a token,
//! never extractable). Signing is synchronous: callers run it off the async executor.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;

pub mod config;
mod disk;
pub mod import_wrap;
mod memory;
mod pkcs11;
pub(crate) mod software;

pub use disk::DiskKeyManager;
pub use memory::MemoryKeyManager;
pub use pkcs11::Pkcs11KeyManager;

pub use config::{FileKeyManager, KeyManagerConfig, PinSource};

/// A key type the CA and JWT signer can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// ECDSA P-256 with SHA-256.
    EcP256,
    /// ECDSA P-384 with SHA-384.
    EcP384,
    /// RSA 2048, PKCS#1 v1.5 with SHA-256.
    Rsa2048,
    /// RSA 3072, PKCS#1 v1.5 with SHA-256.
    Rsa3072,
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
            Self::Rsa3072 => "rsa-3072",
            Self::Rsa4096 => "rsa-4096",
        }
    }

    /// rcgen's signature algorithm for certificates signed by this key.
    pub fn rcgen_algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096 => &rcgen::PKCS_RSA_SHA256,
        }
    }

    /// The JWS `alg` for JWT-SVIDs signed by this key.
    pub fn jws_alg(self) -> &'static str {
        match self {
            Self::EcP256 => "ES256",
            Self::EcP384 => "ES384",
            Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096 => "RS256",
        }
    }

    /// Width in bytes of one ECDSA signature half (r or s); None for RSA.
    pub fn ecdsa_width(self) -> Option<usize> {
        match self {
            Self::EcP256 => Some(32),
            Self::EcP384 => Some(48),
            Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096 => None,
        }
    }

    /// Modulus bits of an RSA type; None for EC.
    pub fn rsa_bits(self) -> Option<usize> {
        match self {
            Self::Rsa2048 => Some(2048),
            Self::Rsa3072 => Some(3072),
            Self::Rsa4096 => Some(4096),
            Self::EcP256 | Self::EcP384 => None,
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
            "rsa-3072" => Ok(Self::Rsa3072),
            "rsa-4096" => Ok(Self::Rsa4096),
            other => Err(format!(
                "{other:?} is not one of ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096"
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
    /// The key manager cannot do this.
    #[error("{0}")]
    Unsupported(String),
    /// A cryptographic operation failed.
    #[error("{0}")]
    Crypto(String),
    /// Material a caller gave was refused (a wrapped import blob that does not unwrap, or
    /// unwraps to the wrong kind of key): the caller's error, not the key manager's.
    #[error("{0}")]
    Rejected(String),
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
    /// Signs a SHA-256 digest (P-256 and RSA keys). Blocking.
    fn sign_digest(&self, digest: &[u8]) -> Result<Vec<u8>, KeyError>;

    /// SubjectPublicKeyInfo, DER.
    fn spki_der(&self) -> Vec<u8> {
        spki_of(self.key_type(), self.public_key_raw())
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
    /// The key-encryption key `id`, created on first use. Software keys of Engines are stored
    /// only sealed under it.
    async fn kek(&self, id: &str) -> Result<Arc<dyn Kek>, KeyError>;
    /// Generates an AES-256 key that never leaves the key manager (HSM custody).
    async fn generate_aes(&self, id: &str) -> Result<Arc<dyn AesKey>, KeyError> {
        Err(KeyError::Unsupported(format!(
            "cannot keep AES key {id} in the {} key manager; HSM custody needs kind = \"pkcs11\"",
            self.kind()
        )))
    }
    /// Finds an AES key made by [`KeyManager::generate_aes`].
    async fn get_aes(&self, id: &str) -> Result<Option<Arc<dyn AesKey>>, KeyError> {
        let _ = id;
        Ok(None)
    }
    /// Whether keys generated here stay inside hardware (HSM custody).
    fn is_hsm(&self) -> bool {
        false
    }
    /// The HMAC-SHA256 key `id`, created on first use: record MACs and the audit chain are
    /// keyed with keys the datastore never holds (pkcs11: a non-extractable generic secret used
    /// inside the token; disk: a 0600 key file; memory: process memory).
    async fn mac_key(&self, id: &str) -> Result<Arc<dyn MacKey>, KeyError>;
    /// Generates an import job's RSA-3072 wrapping key `id` inside the key manager (unwrap
    /// only, never extractable) for RSA-OAEP with `hash`; returns its SubjectPublicKeyInfo DER.
    async fn generate_wrapping_key(
        &self,
        id: &str,
        hash: import_wrap::OaepHash,
    ) -> Result<Vec<u8>, KeyError> {
        let _ = hash;
        Err(KeyError::Unsupported(format!(
            "cannot keep wrapping key {id} in the {} key manager; hsm import jobs need kind = \"pkcs11\"",
            self.kind()
        )))
    }
    /// Unwraps an import blob with the wrapping key `wrapping_id` into a new key `id` that
    /// never leaves the key manager. `public` (SPKI DER) is the public half, for a key manager
    /// that cannot read it from the imported private key.
    async fn unwrap_import(&self, request: ImportRequest) -> Result<Imported, KeyError> {
        Err(KeyError::Unsupported(format!(
            "cannot import key {} into the {} key manager; hsm custody needs kind = \"pkcs11\"",
            request.id,
            self.kind()
        )))
    }
}

/// What imported material must become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportTarget {
    /// A private key of this type (PKCS#8 material).
    Signer(KeyType),
    /// An AES-256 key (32 raw bytes).
    Aes,
}

/// One import of wrapped material into the key manager.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    /// The import job's wrapping key id.
    pub wrapping_id: String,
    /// The id the imported key gets.
    pub id: String,
    /// What the material must be.
    pub target: ImportTarget,
    /// The import method's RSA-OAEP hash.
    pub hash: import_wrap::OaepHash,
    /// The wrapped blob (`RSA-OAEP(ephemeral) || KWP(ephemeral, material)`).
    pub blob: Vec<u8>,
    /// The public half (SPKI DER), if the caller gave it.
    pub public: Option<Vec<u8>>,
}

/// A key made from imported material.
#[derive(Debug, Clone)]
pub enum Imported {
    /// A private key.
    Signer(Arc<dyn KeyHandle>),
    /// An AES-256 key.
    Aes(Arc<dyn AesKey>),
}

/// The SubjectPublicKeyInfo DER of a raw public key (EC point or PKCS#1) of type `kt`.
pub fn spki_of(kt: KeyType, raw: &[u8]) -> Vec<u8> {
    use rcgen::PublicKeyData;
    RawPublic(kt, raw).subject_public_key_info()
}

/// An HMAC-SHA256 key held by the key manager.
pub trait MacKey: Send + Sync + fmt::Debug {
    /// The mechanism, recorded where a tag is kept.
    fn mechanism(&self) -> &'static str;
    /// The 32-byte HMAC-SHA256 tag of `data`. Blocking (pkcs11 computes it in the token).
    fn mac(&self, data: &[u8]) -> Result<[u8; MAC_LEN], KeyError>;
    /// Whether `tag` is the tag of `data`, compared in constant time. Blocking.
    fn verify(&self, data: &[u8], tag: &[u8]) -> Result<bool, KeyError> {
        let want = self.mac(data)?;
        Ok(aws_lc_rs::constant_time::verify_slices_are_equal(&want, tag).is_ok())
    }
}

/// Length of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;

/// HMAC-SHA256 in software (memory and disk key managers); aws-lc-rs wipes the key on drop.
pub struct SoftwareMac(aws_lc_rs::hmac::Key);

impl SoftwareMac {
    /// A MAC key from 32 raw bytes.
    pub fn new(raw: &[u8]) -> Self {
        Self(aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, raw))
    }
}

impl fmt::Debug for SoftwareMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SoftwareMac(..)")
    }
}

impl MacKey for SoftwareMac {
    fn mechanism(&self) -> &'static str {
        "hmac-sha256"
    }
    fn mac(&self, data: &[u8]) -> Result<[u8; MAC_LEN], KeyError> {
        let tag = aws_lc_rs::hmac::sign(&self.0, data);
        tag.as_ref()
            .try_into()
            .map_err(|_| KeyError::Crypto("HMAC-SHA256 tag is not 32 bytes".into()))
    }
    fn verify(&self, data: &[u8], tag: &[u8]) -> Result<bool, KeyError> {
        Ok(aws_lc_rs::hmac::verify(&self.0, data, tag).is_ok())
    }
}

/// A key-encryption key: authenticated encryption of key material at rest.
pub trait Kek: Send + Sync + fmt::Debug {
    /// The mechanism, recorded with every sealed blob.
    fn mechanism(&self) -> &'static str;
    /// Seals `plaintext` bound to `aad`; returns nonce ‖ ciphertext ‖ tag. Blocking.
    fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError>;
    /// Opens what [`Kek::seal`] produced. Blocking.
    fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError>;
}

/// An AES-256-GCM key inside the key manager (same output format as [`Kek`]).
pub trait AesKey: Send + Sync + fmt::Debug {
    /// Encrypts; returns nonce ‖ ciphertext ‖ tag. Blocking.
    fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError>;
    /// Decrypts. Blocking.
    fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError>;
}

/// AES-256-GCM in software (aws-lc-rs): nonce ‖ ciphertext ‖ tag.
pub mod aes {
    use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
    use continuity_common::secret::{Zeroize, Zeroizing};

    use super::KeyError;

    const TAG_LEN: usize = 16;

    fn key(raw: &[u8]) -> Result<LessSafeKey, KeyError> {
        UnboundKey::new(&AES_256_GCM, raw)
            .map(LessSafeKey::new)
            .map_err(|_| KeyError::Crypto("AES-256 key must be 32 bytes".into()))
    }

    /// A fresh random 32-byte key (wiped on drop).
    pub fn generate() -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let mut k = Zeroizing::new(vec![0u8; 32]);
        continuity_common::rand::fill(&mut k)
            .map_err(|e| KeyError::Crypto(format!("cannot generate an AES key: {e}")))?;
        Ok(k)
    }

    /// Encrypts with a random nonce.
    pub fn seal(raw: &[u8], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        let nonce = continuity_common::rand::array::<NONCE_LEN>()
            .map_err(|e| KeyError::Crypto(format!("no nonce: {e}")))?;
        // One buffer, nonce ‖ plaintext encrypted in place ‖ tag, sized up front: the
        // plaintext (often key material) is never left behind in a reallocated copy.
        let mut sealed = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(plaintext);
        let tag = key(raw)?
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut sealed[NONCE_LEN..],
            )
            .map_err(|_| {
                sealed.zeroize();
                KeyError::Crypto("AES-GCM seal failed".into())
            })?;
        sealed.extend_from_slice(tag.as_ref());
        Ok(sealed)
    }

    /// Decrypts and authenticates.
    pub fn open(raw: &[u8], sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        if sealed.len() < NONCE_LEN + 16 {
            return Err(KeyError::Crypto("sealed data too short".into()));
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| KeyError::Crypto("bad nonce".into()))?;
        let mut buf = ct.to_vec();
        let len = key(raw)?
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| {
                KeyError::Crypto("authentication failed: wrong key, data or associated data".into())
            })?
            .len();
        // The plaintext stays in this one buffer (no copy left behind); the caller wipes it.
        buf.truncate(len);
        Ok(buf)
    }
}

/// A software KEK (memory and disk key managers); wiped on drop.
pub struct SoftwareKek(pub Vec<u8>);

impl Drop for SoftwareKek {
    fn drop(&mut self) {
        continuity_common::secret::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for SoftwareKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SoftwareKek(..)")
    }
}

impl Kek for SoftwareKek {
    fn mechanism(&self) -> &'static str {
        "aes-256-gcm"
    }
    fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        aes::seal(&self.0, plaintext, aad)
    }
    fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        aes::open(&self.0, sealed, aad)
    }
}

/// The same wrapper serves as a software AES-256-GCM key (transit and kv custody Engine
/// keys): one AES implementation, one at-rest format (nonce ‖ ciphertext ‖ tag).
impl AesKey for SoftwareKek {
    fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        aes::seal(&self.0, plaintext, aad)
    }
    fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        aes::open(&self.0, sealed, aad)
    }
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
