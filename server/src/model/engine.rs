//! The Engine domain (DESIGN §4): Engines, custody levels, versioned keys, secrets,
//! incarnations.

use std::fmt;
use std::str::FromStr;

use continuity_attestors::Selector;

/// Where an Engine's key material lives, from least to most exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Custody {
    /// Generated and used inside the PKCS#11 token; never exportable.
    Hsm,
    /// Software key that never leaves the server; stored sealed under the KEK.
    Transit,
    /// Material delivered into the workload's RAM on request; stored sealed.
    Kv,
}

impl Custody {
    /// The custody a tier is aligned with: 0 → hsm, 1 → transit, 2 → kv.
    pub fn for_tier(tier: i32) -> Option<Self> {
        match tier {
            0 => Some(Self::Hsm),
            1 => Some(Self::Transit),
            2 => Some(Self::Kv),
            _ => None,
        }
    }

    /// The spelling used in config, CLI and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hsm => "hsm",
            Self::Transit => "transit",
            Self::Kv => "kv",
        }
    }
}

impl FromStr for Custody {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hsm" => Ok(Self::Hsm),
            "transit" => Ok(Self::Transit),
            "kv" => Ok(Self::Kv),
            o => Err(format!("custody {o:?} is not one of hsm, transit, kv")),
        }
    }
}

impl fmt::Display for Custody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// Signatures (P-256, RSA).
    Sign,
    /// AES-256-GCM encryption.
    Encrypt,
}

impl Purpose {
    /// Spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sign => "sign",
            Self::Encrypt => "encrypt",
        }
    }
}

impl FromStr for Purpose {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sign" => Ok(Self::Sign),
            "encrypt" => Ok(Self::Encrypt),
            o => Err(format!("purpose {o:?} is not one of sign, encrypt")),
        }
    }
}

/// A key algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// ECDSA P-256, SHA-256 (ES256).
    EcP256,
    /// RSA 2048, PKCS#1 v1.5 SHA-256 (RS256).
    Rsa2048,
    /// RSA 3072, PKCS#1 v1.5 SHA-256 (RS256).
    Rsa3072,
    /// AES-256-GCM.
    Aes256Gcm,
}

impl Algorithm {
    /// Spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcP256 => "ec-p256",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Aes256Gcm => "aes-256-gcm",
        }
    }

    /// The purpose this algorithm serves.
    pub fn purpose(self) -> Purpose {
        match self {
            Self::Aes256Gcm => Purpose::Encrypt,
            _ => Purpose::Sign,
        }
    }

    /// The key manager's key type (sign algorithms only).
    pub fn key_type(self) -> Option<crate::keys::KeyType> {
        use crate::keys::KeyType;
        match self {
            Self::EcP256 => Some(KeyType::EcP256),
            Self::Rsa2048 => Some(KeyType::Rsa2048),
            Self::Rsa3072 => Some(KeyType::Rsa3072),
            Self::Aes256Gcm => None,
        }
    }

    /// The JWS `alg`.
    pub fn jws_alg(self) -> &'static str {
        match self {
            Self::EcP256 => "ES256",
            Self::Rsa2048 | Self::Rsa3072 => "RS256",
            Self::Aes256Gcm => "A256GCM",
        }
    }
}

impl FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ec-p256" => Ok(Self::EcP256),
            "rsa-2048" => Ok(Self::Rsa2048),
            "rsa-3072" => Ok(Self::Rsa3072),
            "aes-256-gcm" => Ok(Self::Aes256Gcm),
            o => Err(format!(
                "algorithm {o:?} is not one of ec-p256, rsa-2048, rsa-3072, aes-256-gcm"
            )),
        }
    }
}

/// A key version's state (Cloud KMS model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VersionState {
    /// Usable.
    Enabled,
    /// Kept, not usable.
    Disabled,
    /// Material goes at `destroy_at` unless restored.
    DestroyScheduled,
    /// Material gone for good.
    Destroyed,
}

impl VersionState {
    /// Spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "ENABLED",
            Self::Disabled => "DISABLED",
            Self::DestroyScheduled => "DESTROY_SCHEDULED",
            Self::Destroyed => "DESTROYED",
        }
    }
}

impl FromStr for VersionState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ENABLED" => Ok(Self::Enabled),
            "DISABLED" => Ok(Self::Disabled),
            "DESTROY_SCHEDULED" => Ok(Self::DestroyScheduled),
            "DESTROYED" => Ok(Self::Destroyed),
            o => Err(format!("key version state {o:?}")),
        }
    }
}

/// A logical Engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    /// Name (`payments`).
    pub name: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Tier 0, 1 or 2.
    pub tier: i32,
    /// Custody of its keys.
    pub custody: Custody,
    /// Whether custody exposes more than the tier's alignment (allowed by override).
    pub exposure_override: bool,
    /// Creation time.
    pub created_at: i64,
}

/// A named key of an Engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineKey {
    /// Engine name.
    pub engine: String,
    /// Key name.
    pub name: String,
    /// Algorithm (implies purpose).
    pub algorithm: Algorithm,
    /// Custody (the Engine's at creation).
    pub custody: Custody,
    /// Version used for new signatures and encryptions.
    pub primary_version: u32,
    /// Seconds between automatic rotations (0 = manual only).
    pub rotation_period: i64,
    /// Seconds a scheduled destruction waits.
    pub destroy_grace: i64,
    /// When the next automatic rotation is due (0 = never).
    pub next_rotation_at: i64,
    /// Creation time.
    pub created_at: i64,
}

/// One version of a key. `Debug` leaves out the sealed material.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyVersion {
    /// Engine name.
    pub engine: String,
    /// Key name.
    pub key: String,
    /// 1..n.
    pub version: u32,
    /// State.
    pub state: VersionState,
    /// JWKS `kid` (sign keys).
    pub kid: String,
    /// SubjectPublicKeyInfo (sign keys).
    pub public_key: Vec<u8>,
    /// Sealed material (transit/kv); None for HSM custody and once destroyed.
    pub sealed: Option<Vec<u8>>,
    /// Sealing mechanism, or `pkcs11` for material inside the token.
    pub mechanism: String,
    /// Key manager id of an HSM key (empty otherwise).
    pub hsm_id: String,
    /// Creation time.
    pub created_at: i64,
    /// When a scheduled destruction happens (0 = not scheduled).
    pub destroy_at: i64,
    /// Encryptions counted against this version's AES-GCM nonce budget. Reserved in blocks
    /// before use, so after a restart it may exceed the encryptions done, never fall short.
    pub encryptions: u64,
    /// The material came from outside through an import job (not generated here).
    pub imported: bool,
}

/// A continuity proof: version `version` of a sign key endorsed by `previous_version` (the
/// primary when it was made), as the compact JWS of `continuity_common::endorsement`. Kept
/// after either version is destroyed, so chains stay verifiable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endorsement {
    /// Engine name.
    pub engine: String,
    /// Key name.
    pub key: String,
    /// The endorsed version.
    pub version: u32,
    /// The endorsing version.
    pub previous_version: u32,
    /// The compact JWS (`typ: continuity-endorsement+jwt`).
    pub jws: String,
    /// When it was made.
    pub created_at: i64,
}

/// A named KV secret of an Engine. `Debug` leaves out the sealed value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    /// Engine.
    pub engine: String,
    /// Name.
    pub name: String,
    /// 1..n, latest wins.
    pub version: u32,
    /// Sealed value.
    pub sealed: Vec<u8>,
    /// Sealing mechanism.
    pub mechanism: String,
    /// Creation time.
    pub created_at: i64,
}

impl fmt::Debug for KeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyVersion")
            .field("engine", &self.engine)
            .field("key", &self.key)
            .field("version", &self.version)
            .field("state", &self.state)
            .field("kid", &self.kid)
            .field("sealed", &self.sealed.as_ref().map(|s| Redacted(s.len())))
            .field("mechanism", &self.mechanism)
            .field("hsm_id", &self.hsm_id)
            .field("created_at", &self.created_at)
            .field("destroy_at", &self.destroy_at)
            .field("encryptions", &self.encryptions)
            .field("imported", &self.imported)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("engine", &self.engine)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("sealed", &Redacted(self.sealed.len()))
            .field("mechanism", &self.mechanism)
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// Shows only the length of secret (or sealed) bytes.
struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted, {} bytes>", self.0)
    }
}

/// A workload that was an Engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incarnation {
    /// Engine.
    pub engine: String,
    /// Entry it matched.
    pub entry_id: String,
    /// Agent that hosted it.
    pub agent_id: String,
    /// Stable id of the workload (pod uid, or pid + start time).
    pub workload_id: String,
    /// Process id.
    pub pid: u32,
    /// Unix uid.
    pub uid: u32,
    /// Its selectors.
    pub selectors: Vec<Selector>,
    /// First seen.
    pub first_seen: i64,
    /// Last seen.
    pub last_seen: i64,
}

/// An import job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImportJobState {
    /// Imports are accepted until `expires_at`.
    Active,
    /// Past `expires_at`: its wrapping key is destroyed and imports are refused.
    Expired,
}

impl ImportJobState {
    /// Spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::Expired => "EXPIRED",
        }
    }
}

impl FromStr for ImportJobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ACTIVE" => Ok(Self::Active),
            "EXPIRED" => Ok(Self::Expired),
            o => Err(format!("import job state {o:?}")),
        }
    }
}

/// An import job (Cloud KMS's): a wrapping key of one Engine that key material is imported
/// under, kept where the imported keys will live (the token for hsm custody, sealed under the
/// KEK otherwise).
#[derive(Clone, PartialEq, Eq)]
pub struct ImportJob {
    /// Id (`ij-` and 16 hex digits).
    pub id: String,
    /// The Engine whose keys it imports into.
    pub engine: String,
    /// The wrapping method.
    pub method: crate::keys::import_wrap::ImportMethod,
    /// The custody of its Engine when it was made (where its wrapping key lives).
    pub custody: Custody,
    /// The wrapping public key (SPKI DER).
    pub public_key: Vec<u8>,
    /// The private half: PKCS#8 sealed under the KEK, or the token object's id (hsm); empty
    /// once expired.
    pub private_ref: Vec<u8>,
    /// State.
    pub state: ImportJobState,
    /// Creation time.
    pub created_at: i64,
    /// When imports stop being accepted (creation + 3 days).
    pub expires_at: i64,
}

impl fmt::Debug for ImportJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImportJob")
            .field("id", &self.id)
            .field("engine", &self.engine)
            .field("method", &self.method)
            .field("custody", &self.custody)
            .field("private_ref", &Redacted(self.private_ref.len()))
            .field("state", &self.state)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}
