//! The trust bundle the CA publishes: its CA certificates and JWT keys, and their SPIFFE
//! bundle document.

use continuity_common::TrustDomain;

mod parse;
mod relationship;

pub use parse::{BundleFormat, BundleParseError, MAX_BUNDLE_BYTES, parse_bundle};
pub use relationship::{EndpointAuth, Relationship, RelationshipError};

/// A JWT signing key as published in the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    /// `kid`.
    pub key_id: String,
    /// SubjectPublicKeyInfo, DER.
    pub public_key: Vec<u8>,
    /// Unix seconds.
    pub expires_at: i64,
}

/// The trust bundle: every CA certificate and JWT key still needed to verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Root CA certificates, DER, oldest first.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT keys, oldest first.
    pub jwt_authorities: Vec<JwtAuthority>,
    /// Authority IDs (subject key identifiers, lowercase hex) of tainted X.509 authorities.
    pub tainted_x509: Vec<String>,
    /// `kid`s of tainted JWT authorities.
    pub tainted_jwt: Vec<String>,
    /// Bumped on every change.
    pub sequence: u64,
    /// How often relying parties should refresh, seconds.
    pub refresh_hint: i64,
}

impl Bundle {
    /// The SPIFFE bundle document (JWKS with x509-svid and jwt-svid keys).
    pub fn to_spiffe_json(&self) -> Result<serde_json::Value, continuity_common::jwk::JwkError> {
        let jwt: Vec<_> = self
            .jwt_authorities
            .iter()
            .map(|k| continuity_common::jwk::JwtAuthority {
                key_id: &k.key_id,
                public_key: &k.public_key,
            })
            .collect();
        continuity_common::jwk::spiffe_bundle(
            &self.x509_authorities,
            &jwt,
            self.sequence,
            self.refresh_hint,
        )
    }
}
