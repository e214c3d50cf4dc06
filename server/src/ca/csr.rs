//! CSR policy: which PKCS#10 requests the CA signs at all.
//!
//! Every CSR the server accepts (agent attestation, RenewAgent, BatchNewX509SVID) goes through
//! [`check`]. Only the CSR's public key is ever used: the subject, SANs, basic constraints and
//! key usages it asks for are ignored, because the server builds the SVID from the entry.
//!
//! The policy is an allow-list, checked before the (comparatively costly) signature
//! verification so a hostile peer cannot make the server verify with a huge or weak key:
//! - signatures: RSA PKCS#1 v1.5 or PSS with SHA-256/384/512, ECDSA with SHA-256/384, Ed25519
//!   (SHA-1, MD5, MD4 and MD2 are refused by name);
//! - keys: RSA with a 2048–8192-bit modulus and public exponent 65537, EC on P-256 or P-384,
//!   Ed25519 (it verifies and signs like the others; no other curve is accepted).

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};

/// Smallest RSA modulus accepted, bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted, bits (a bigger one only costs the server CPU).
pub const MAX_RSA_BITS: usize = 8192;
/// The only RSA public exponent accepted.
pub const RSA_EXPONENT: u64 = 65537;

const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_RSA_PSS: &str = "1.2.840.113549.1.1.10";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_ED25519: &str = "1.3.101.112";

/// Why a CSR was refused. Each message names the reason, for the agent's operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not a DER PKCS#10 request, or its public key does not parse.
    #[error("malformed CSR: {0}")]
    Malformed(String),
    /// Signed with a broken hash (SHA-1, MD5, ...).
    #[error(
        "CSR signature algorithm {name} ({oid}) uses {hash}, which is refused; sign with SHA-256 or stronger"
    )]
    WeakHash {
        /// Algorithm name.
        name: &'static str,
        /// Its OID.
        oid: String,
        /// The broken hash.
        hash: &'static str,
    },
    /// A signature algorithm outside the allow-list.
    #[error(
        "CSR signature algorithm {0} is not supported (RSA PKCS#1/PSS with SHA-256/384/512, ECDSA with SHA-256/384, Ed25519)"
    )]
    UnsupportedSignature(String),
    /// An RSA modulus outside 2048–8192 bits.
    #[error(
        "CSR RSA key of {bits} bits is refused: the modulus must be {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"
    )]
    RsaModulus {
        /// Modulus size.
        bits: usize,
    },
    /// An RSA public exponent other than 65537.
    #[error("CSR RSA public exponent {0} is refused: only {RSA_EXPONENT} is accepted")]
    RsaExponent(String),
    /// An elliptic curve other than P-256 and P-384.
    #[error("CSR elliptic curve {0} is not supported (P-256 or P-384)")]
    UnsupportedCurve(String),
    /// A public key algorithm outside the allow-list.
    #[error("CSR public key algorithm {0} is not supported (RSA, EC P-256/P-384, Ed25519)")]
    UnsupportedKey(String),
    /// The self-signature does not verify under the CSR's own key.
    #[error("CSR signature does not verify")]
    BadSignature,
}

/// Applies the policy and verifies the CSR's self-signature; returns its
/// SubjectPublicKeyInfo (DER), the only part of the CSR the CA uses.
pub fn check(csr_der: &[u8]) -> Result<Vec<u8>, CsrError> {
    let (_, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    check_signature_algorithm(&csr.signature_algorithm)?;
    let spki = &csr.certification_request_info.subject_pki;
    check_public_key(spki)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    Ok(spki.raw.to_vec())
}

fn check_signature_algorithm(alg: &AlgorithmIdentifier<'_>) -> Result<(), CsrError> {
    let oid = alg.algorithm.to_id_string();
    let weak = |name, hash| {
        Err(CsrError::WeakHash {
            name,
            oid: oid.clone(),
            hash,
        })
    };
    match oid.as_str() {
        // sha256/384/512WithRSAEncryption, ecdsa-with-SHA256/384, Ed25519.
        "1.2.840.113549.1.1.11"
        | "1.2.840.113549.1.1.12"
        | "1.2.840.113549.1.1.13"
        | "1.2.840.10045.4.3.2"
        | "1.2.840.10045.4.3.3"
        | OID_ED25519 => Ok(()),
        OID_RSA_PSS => check_pss_hash(alg),
        "1.2.840.113549.1.1.5" | "1.3.14.3.2.29" => weak("sha1WithRSAEncryption", "SHA-1"),
        "1.2.840.10045.4.1" => weak("ecdsa-with-SHA1", "SHA-1"),
        "1.2.840.10040.4.3" => weak("dsa-with-sha1", "SHA-1"),
        "1.2.840.113549.1.1.4" => weak("md5WithRSAEncryption", "MD5"),
        "1.2.840.113549.1.1.3" => weak("md4WithRSAEncryption", "MD4"),
        "1.2.840.113549.1.1.2" => weak("md2WithRSAEncryption", "MD2"),
        _ => Err(CsrError::UnsupportedSignature(oid)),
    }
}

fn check_pss_hash(alg: &AlgorithmIdentifier<'_>) -> Result<(), CsrError> {
    let params = alg
        .parameters
        .as_ref()
        .and_then(|p| x509_parser::signature_algorithm::RsaSsaPssParams::try_from(p).ok())
        .ok_or_else(|| CsrError::UnsupportedSignature("RSASSA-PSS without parameters".into()))?;
    match params.hash_algorithm_oid().to_id_string().as_str() {
        // SHA-256, SHA-384, SHA-512.
        "2.16.840.1.101.3.4.2.1" | "2.16.840.1.101.3.4.2.2" | "2.16.840.1.101.3.4.2.3" => Ok(()),
        // The PSS default hash is SHA-1.
        "1.3.14.3.2.26" => Err(CsrError::WeakHash {
            name: "RSASSA-PSS",
            oid: OID_RSA_PSS.into(),
            hash: "SHA-1",
        }),
        other => Err(CsrError::UnsupportedSignature(format!(
            "RSASSA-PSS with hash {other}"
        ))),
    }
}

fn check_public_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<(), CsrError> {
    let oid = spki.algorithm.algorithm.to_id_string();
    match oid.as_str() {
        OID_RSA => {
            let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
                return Err(CsrError::Malformed("RSA public key does not parse".into()));
            };
            let bits = unsigned_bits(rsa.modulus);
            if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
                return Err(CsrError::RsaModulus { bits });
            }
            match rsa.try_exponent() {
                Ok(RSA_EXPONENT) => Ok(()),
                Ok(e) => Err(CsrError::RsaExponent(e.to_string())),
                Err(_) => Err(CsrError::RsaExponent(format!(
                    "of {} bits",
                    unsigned_bits(rsa.exponent)
                ))),
            }
        }
        OID_EC => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .ok_or_else(|| CsrError::UnsupportedCurve("(not a named curve)".into()))?;
            match curve.as_str() {
                "1.2.840.10045.3.1.7" | "1.3.132.0.34" => Ok(()),
                other => Err(CsrError::UnsupportedCurve(curve_name(other))),
            }
        }
        OID_ED25519 => Ok(()),
        other => Err(CsrError::UnsupportedKey(key_name(other))),
    }
}

/// Bits of a big-endian unsigned integer (leading zero bytes and bits not counted).
fn unsigned_bits(be: &[u8]) -> usize {
    let Some(first) = be.iter().position(|b| *b != 0) else {
        return 0;
    };
    (be.len() - first) * 8 - be[first].leading_zeros() as usize
}

fn curve_name(oid: &str) -> String {
    let name = match oid {
        "1.2.840.10045.3.1.1" => "P-192 (prime192v1)",
        "1.3.132.0.33" => "P-224 (secp224r1)",
        "1.3.132.0.35" => "P-521 (secp521r1)",
        "1.3.132.0.10" => "secp256k1",
        "1.3.36.3.3.2.8.1.1.7" => "brainpoolP256r1",
        _ => return oid.to_string(),
    };
    format!("{name} ({oid})")
}

fn key_name(oid: &str) -> String {
    let name = match oid {
        "1.2.840.10040.4.1" => "DSA",
        OID_RSA_PSS => "RSASSA-PSS (use rsaEncryption keys)",
        "1.3.101.113" => "Ed448",
        "1.3.101.110" | "1.3.101.111" => "X25519/X448 (key agreement only)",
        _ => return oid.to_string(),
    };
    format!("{name} ({oid})")
}

#[cfg(test)]
mod tests;
