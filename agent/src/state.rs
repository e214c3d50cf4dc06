//! What the agent persists in `data_dir`: its entries, one SVID per entry, the bundle and the
//! Engine JWKS. A leaf: the client, the storage and the manager all use these types.

use std::collections::BTreeMap;

use bytes::Bytes;
use continuity_attestors::Selector;
use continuity_common::secret::SecretBytes;
use serde::{Deserialize, Serialize};

/// Base64 (standard) for byte fields in the state file.
mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }

    /// Key bytes: decoded straight into a [`SecretBytes`](continuity_common::secret::SecretBytes).
    pub mod secret {
        use super::*;
        use continuity_common::secret::{SecretBytes, Zeroizing};

        pub fn serialize<S: Serializer>(v: &SecretBytes, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&Zeroizing::new(STANDARD.encode(v.expose())))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SecretBytes, D::Error> {
            let s = Zeroizing::new(String::deserialize(d)?);
            STANDARD
                .decode(s.as_bytes())
                .map(SecretBytes::new)
                .map_err(serde::de::Error::custom)
        }
    }

    /// A list of shared byte strings.
    pub mod bytes_list {
        use super::*;

        pub fn serialize<S: Serializer>(v: &[::bytes::Bytes], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|b| STANDARD.encode(b)))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<::bytes::Bytes>, D::Error> {
            let v = Vec::<String>::deserialize(d)?;
            v.into_iter()
                .map(|s| {
                    STANDARD
                        .decode(s)
                        .map(::bytes::Bytes::from)
                        .map_err(serde::de::Error::custom)
                })
                .collect()
        }
    }

    pub mod list {
        use super::*;

        pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|b| STANDARD.encode(b)))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
            let v = Vec::<String>::deserialize(d)?;
            v.into_iter()
                .map(|s| STANDARD.decode(s).map_err(serde::de::Error::custom))
                .collect()
        }
    }
}

/// A registration entry as the agent keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Entry id.
    pub id: String,
    /// SPIFFE ID granted.
    pub spiffe_id: String,
    /// Selectors (sorted), all of which a workload must have.
    pub selectors: Vec<Selector>,
    /// X509-SVID TTL override (seconds, 0 = server default).
    pub x509_svid_ttl: i32,
    /// JWT-SVID TTL override.
    pub jwt_svid_ttl: i32,
    /// Hint for workloads.
    pub hint: String,
    /// Engine the entry is bound to (empty: none).
    #[serde(default)]
    pub engine: String,
    /// Revision.
    pub revision: i64,
    /// When the entry was created (Unix seconds; 0 in state written before it was kept).
    #[serde(default)]
    pub created_at: i64,
    /// Trust domains (`spiffe://td`) whose bundles workloads of this entry receive.
    #[serde(default)]
    pub federates_with: Vec<String>,
}

impl From<continuity_proto::types::Entry> for Entry {
    fn from(e: continuity_proto::types::Entry) -> Self {
        let mut selectors: Vec<Selector> = e
            .selectors
            .into_iter()
            .map(|s| Selector::raw(&s.r#type, s.value))
            .collect();
        selectors.sort();
        Self {
            id: e.id,
            spiffe_id: e.spiffe_id,
            selectors,
            x509_svid_ttl: e.x509_svid_ttl,
            jwt_svid_ttl: e.jwt_svid_ttl,
            hint: e.hint,
            engine: e.engine,
            revision: e.revision,
            created_at: e.created_at,
            federates_with: e
                .federates_with
                .iter()
                .map(|td| trust_domain_id(td))
                .collect(),
        }
    }
}

/// `spiffe://td` for a trust domain written either way (`td` or `spiffe://td`).
pub fn trust_domain_id(td: &str) -> String {
    format!("spiffe://{}", td.strip_prefix("spiffe://").unwrap_or(td))
}

/// An X509-SVID with its private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Svid {
    /// DER certificates, leaf first.
    #[serde(with = "b64::bytes_list")]
    pub chain: Vec<Bytes>,
    /// PKCS#8 private key (wiped on drop, redacted in `Debug`).
    #[serde(with = "b64::secret")]
    pub key: SecretBytes,
    /// NotAfter, Unix seconds.
    pub expires_at: i64,
    /// When the agent received it, Unix seconds.
    pub issued_at: i64,
    /// When to ask for the next one (half-life minus jitter).
    pub rotate_at: i64,
}

/// A JWT signing key of the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtKey {
    /// kid.
    pub kid: String,
    /// SubjectPublicKeyInfo.
    #[serde(with = "b64")]
    pub public_key: Vec<u8>,
    /// Unix seconds.
    pub expires_at: i64,
}

/// The trust bundle as the agent keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BundleState {
    /// Trust domain name.
    pub trust_domain: String,
    /// CA certificates, DER.
    #[serde(with = "b64::list")]
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT keys.
    pub jwt_authorities: Vec<JwtKey>,
    /// Sequence number.
    pub sequence: u64,
    /// Authority IDs (subject key identifiers, lowercase hex) of tainted X.509 authorities.
    #[serde(default)]
    pub tainted_x509: Vec<String>,
    /// kids of tainted JWT authorities.
    #[serde(default)]
    pub tainted_jwt: Vec<String>,
}

impl From<continuity_proto::types::Bundle> for BundleState {
    fn from(b: continuity_proto::types::Bundle) -> Self {
        Self {
            trust_domain: b.trust_domain,
            x509_authorities: b.x509_authorities,
            jwt_authorities: b
                .jwt_authorities
                .into_iter()
                .map(|k| JwtKey {
                    kid: k.key_id,
                    public_key: k.public_key,
                    expires_at: k.expires_at,
                })
                .collect(),
            sequence: b.sequence_number,
            tainted_x509: b.tainted_x509_authorities,
            tainted_jwt: b.tainted_jwt_authorities,
        }
    }
}

/// Everything the agent persists in `data_dir`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct PersistedState {
    /// The agent's SPIFFE ID.
    pub agent_id: String,
    /// The agent SVID and key.
    pub agent_svid: Option<Svid>,
    /// The bundle.
    pub bundle: BundleState,
    /// Entry revision held.
    pub revision: i64,
    /// Entries by id.
    pub entries: BTreeMap<String, Entry>,
    /// SVIDs by entry id.
    pub svids: BTreeMap<String, Svid>,
    /// Engine JWKS by Engine name, for the Engines this node's entries are bound to.
    #[serde(default)]
    pub engine_jwks: BTreeMap<String, EngineJwks>,
    /// Foreign bundles by trust domain ID (`spiffe://td`), for the entries that federate.
    #[serde(default)]
    pub federated_bundles: BTreeMap<String, BundleState>,
}

/// A public key of an Engine (one enabled sign-key version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnginePublicKey {
    /// Key name.
    pub key: String,
    /// Version.
    pub version: u32,
    /// kid.
    pub kid: String,
    /// Algorithm spelling (ec-p256, rsa-2048, rsa-3072).
    pub algorithm: String,
    /// SubjectPublicKeyInfo.
    #[serde(with = "b64")]
    pub spki: Vec<u8>,
}

/// An Engine's JWKS as cached by the agent (verification works while the server is down).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EngineJwks {
    /// The JWKS document.
    pub jwks: String,
    /// The same keys, ready for verification.
    pub keys: Vec<EnginePublicKey>,
}
