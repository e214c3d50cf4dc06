//! An SVID from the server: a fresh key and CSR for it, the answer checked and turned into
//! an [`Svid`], and when to rotate it. A leaf: the client (attestation) and the manager
//! (renewal) both build SVIDs here.

use continuity_common::secret::SecretBytes;

use crate::state::Svid;

/// A fresh P-256 key (PKCS#8, held as a secret from the start) and a CSR for it.
pub fn new_key_and_csr() -> Result<(SecretBytes, Vec<u8>), String> {
    let kp = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&kp).map_err(|e| e.to_string())?;
    Ok((SecretBytes::new(kp.serialize_der()), csr.der().to_vec()))
}

fn now_unix() -> i64 {
    continuity_common::clock::unix_seconds(std::time::SystemTime::now())
}

/// A random fraction in [0, 1) (spreads rotations; not a secret).
fn jitter() -> f64 {
    continuity_common::rand::jitter_fraction()
}

/// When to rotate an SVID valid from `issued` to `expires`: at half-life, minus up to 10% of
/// the lifetime of jitter so a node's SVIDs do not all renew in the same instant.
/// `expires` comes from the server: the arithmetic saturates instead of overflowing.
pub fn rotate_at(issued: i64, expires: i64) -> i64 {
    let life = expires.saturating_sub(issued).max(1) as f64;
    issued.saturating_add((life * (0.5 - 0.1 * jitter())) as i64)
}

/// Why an X509-SVID from the server is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// The certificate chain is empty.
    #[error("the server sent an X509-SVID with no certificate")]
    EmptyChain,
    /// The leaf certificate does not parse as X.509.
    #[error("the server sent an X509-SVID whose leaf is not a certificate: {0}")]
    BadLeaf(String),
}

/// Builds an [`Svid`] from the server's answer and the key we generated; refuses an answer
/// without a parsable leaf certificate (everything downstream takes the leaf as given).
pub fn svid_from_proto(
    s: continuity_proto::types::X509svid,
    key: SecretBytes,
) -> Result<Svid, SvidError> {
    let leaf = s.cert_chain.first().ok_or(SvidError::EmptyChain)?;
    x509_parser::parse_x509_certificate(leaf).map_err(|e| SvidError::BadLeaf(e.to_string()))?;
    let issued = now_unix();
    Ok(Svid {
        rotate_at: rotate_at(issued, s.expires_at),
        chain: s.cert_chain.into_iter().map(bytes::Bytes::from).collect(),
        key,
        expires_at: s.expires_at,
        issued_at: issued,
    })
}

/// Whether the last certificate of `chain` (the leaf itself when the CA is a root; the top
/// intermediate under an upstream authority) names (by issuer) one of the bundle's CAs (false
/// for an empty chain or unparsable certificates: both come from the server or the state file).
pub fn issued_by_bundle(chain: &[bytes::Bytes], roots: &[Vec<u8>]) -> bool {
    let Some(leaf) = chain.last() else {
        return false;
    };
    let Ok((_, leaf)) = x509_parser::parse_x509_certificate(leaf) else {
        return false;
    };
    roots.iter().any(|r| {
        x509_parser::parse_x509_certificate(r)
            .map(|(_, ca)| ca.subject().as_raw() == leaf.issuer().as_raw())
            .unwrap_or(false)
    })
}

/// The authority ID (its subject key identifier, lowercase hex) of the CA that signed the
/// leaf of `chain`, read from the leaf's authority key identifier.
pub fn authority_key_id(chain: &[bytes::Bytes]) -> Option<String> {
    let (_, leaf) = x509_parser::parse_x509_certificate(chain.first()?).ok()?;
    leaf.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| hex::encode(k.0))
            }
            _ => None,
        })
}

/// True when the leaf of `chain` was signed by one of the `tainted` authorities.
pub fn signed_by_tainted(chain: &[bytes::Bytes], tainted: &[String]) -> bool {
    !tainted.is_empty() && authority_key_id(chain).is_some_and(|id| tainted.contains(&id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_svid_answer_without_a_certificate_is_refused() {
        let empty = continuity_proto::types::X509svid {
            spiffe_id: "spiffe://example.org/w".into(),
            cert_chain: vec![],
            expires_at: 100,
        };
        assert_eq!(
            svid_from_proto(empty, SecretBytes::new(vec![1])).unwrap_err(),
            SvidError::EmptyChain
        );
        let garbage = continuity_proto::types::X509svid {
            spiffe_id: "spiffe://example.org/w".into(),
            cert_chain: vec![vec![0x30, 0x03, 0x02, 0x01]],
            expires_at: 100,
        };
        assert!(matches!(
            svid_from_proto(garbage, SecretBytes::new(vec![1])),
            Err(SvidError::BadLeaf(_))
        ));
        assert!(!issued_by_bundle(&[], &[vec![0x30]]));
    }

    #[test]
    fn rotation_time_saturates_on_extreme_expiry() {
        for (issued, expires) in [
            (0, i64::MAX),
            (0, i64::MIN),
            (i64::MAX, i64::MIN),
            (i64::MIN, i64::MAX),
            (i64::MAX, i64::MAX),
        ] {
            let at = rotate_at(issued, expires);
            assert!(
                at >= issued.min(expires) || at == issued,
                "{issued} {expires} -> {at}"
            );
        }
        assert_eq!(rotate_at(100, 50), 100);
    }
}
