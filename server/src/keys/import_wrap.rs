//! The key-import wrapping of Cloud KMS import jobs, methods `RSA_OAEP_3072_SHA256_AES_256`
//! and `RSA_OAEP_3072_SHA1_AES_256` (PKCS#11's CKM_RSA_AES_KEY_WRAP): the client makes an
//! ephemeral AES-256 key, wraps the target key material with it (AES key wrap with padding,
//! RFC 5649 / NIST SP 800-38F KWP), and encrypts the ephemeral key to the job's RSA-3072
//! public key with OAEP (SHA-256 or SHA-1, MGF1 of the same hash, no label). The blob is
//! `RSA-OAEP(ephemeral) || KWP(ephemeral, material)`.
//!
//! Target material: PKCS#8 DER for EC and RSA keys, the raw 32 bytes for AES-256. Every
//! byte of a blob comes from a client and is checked here before anything is unwrapped.

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrapPadded};
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey,
    PrivateDecryptingKey,
};
use continuity_common::secret::Zeroizing;

use super::{KeyError, KeyType};

/// The RSA-OAEP hash (and MGF1 hash) of an import method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OaepHash {
    /// SHA-1 (what SoftHSM2's CKM_RSA_PKCS_OAEP supports).
    Sha1,
    /// SHA-256.
    Sha256,
}

/// An import job's wrapping method, spelled as Cloud KMS spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportMethod {
    /// RSA-OAEP-3072 with SHA-1, then AES-256 key wrap with padding.
    RsaOaep3072Sha1Aes256,
    /// RSA-OAEP-3072 with SHA-256, then AES-256 key wrap with padding.
    RsaOaep3072Sha256Aes256,
}

impl ImportMethod {
    /// The name, as Cloud KMS spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RsaOaep3072Sha1Aes256 => "RSA_OAEP_3072_SHA1_AES_256",
            Self::RsaOaep3072Sha256Aes256 => "RSA_OAEP_3072_SHA256_AES_256",
        }
    }

    /// Its RSA-OAEP hash.
    pub fn hash(self) -> OaepHash {
        match self {
            Self::RsaOaep3072Sha1Aes256 => OaepHash::Sha1,
            Self::RsaOaep3072Sha256Aes256 => OaepHash::Sha256,
        }
    }
}

impl std::str::FromStr for ImportMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "RSA_OAEP_3072_SHA1_AES_256" => Ok(Self::RsaOaep3072Sha1Aes256),
            "RSA_OAEP_3072_SHA256_AES_256" => Ok(Self::RsaOaep3072Sha256Aes256),
            o => Err(format!(
                "import method {o:?} is not RSA_OAEP_3072_SHA256_AES_256 or RSA_OAEP_3072_SHA1_AES_256"
            )),
        }
    }
}

impl std::fmt::Display for ImportMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Bytes of the RSA-OAEP part (a 3072-bit modulus).
pub const RSA_PART: usize = 3072 / 8;

/// Largest wrapped material accepted: an RSA-4096 PKCS#8 (about 2.4 KiB) with room to spare.
pub const MAX_MATERIAL: usize = 8 * 1024;

/// Largest blob accepted: the RSA part and the KWP of [`MAX_MATERIAL`] bytes.
pub const MAX_BLOB: usize = RSA_PART + MAX_MATERIAL + 16;

/// An import job's RSA-3072 private key (software custody: kept sealed under the KEK).
pub struct WrappingKey(PrivateDecryptingKey);

impl std::fmt::Debug for WrappingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WrappingKey(RSA-3072)")
    }
}

fn crypto(what: &str) -> impl Fn(aws_lc_rs::error::Unspecified) -> KeyError + '_ {
    move |_| KeyError::Crypto(what.to_string())
}

/// The caller's blob is refused.
fn rejected(what: &str) -> impl Fn(aws_lc_rs::error::Unspecified) -> KeyError + '_ {
    move |_| KeyError::Rejected(what.to_string())
}

impl WrappingKey {
    /// A fresh RSA-3072 wrapping key.
    pub fn generate() -> Result<Self, KeyError> {
        PrivateDecryptingKey::generate(KeySize::Rsa3072)
            .map(Self)
            .map_err(crypto("cannot generate an RSA-3072 wrapping key"))
    }

    /// A wrapping key from its PKCS#8 (as [`WrappingKey::pkcs8`] wrote it).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, KeyError> {
        let k = PrivateDecryptingKey::from_pkcs8(der)
            .map_err(|e| KeyError::Crypto(format!("not an RSA wrapping key: {e}")))?;
        if k.key_size_bits() != 3072 {
            return Err(KeyError::Crypto(format!(
                "the wrapping key is RSA-{}, not RSA-3072",
                k.key_size_bits()
            )));
        }
        Ok(Self(k))
    }

    /// Its PKCS#8 DER (wiped on drop), to be sealed.
    pub fn pkcs8(&self) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let der: Pkcs8V1Der<'static> = self
            .0
            .as_der()
            .map_err(crypto("cannot encode the wrapping key"))?;
        Ok(Zeroizing::new(der.as_ref().to_vec()))
    }

    /// The public half, SubjectPublicKeyInfo DER (what clients encrypt to).
    pub fn spki_der(&self) -> Result<Vec<u8>, KeyError> {
        let der = self
            .0
            .public_key()
            .as_der()
            .map_err(crypto("cannot encode the wrapping public key"))?;
        Ok(der.as_ref().to_vec())
    }

    /// Unwraps a blob made for this key with OAEP `hash`: the target material (wiped on drop).
    pub fn unwrap(&self, blob: &[u8], hash: OaepHash) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let (rsa, kwp) = split_blob(blob)?;
        let oaep = OaepPrivateDecryptingKey::new(self.0.clone())
            .map_err(crypto("the wrapping key cannot do OAEP"))?;
        let oaep_alg = oaep_algorithm(hash);
        let mut eph = Zeroizing::new(vec![0u8; oaep.min_output_size()]);
        let eph_len = oaep
            .decrypt(oaep_alg, rsa, &mut eph, None)
            .map_err(rejected(
                "the wrapped blob's RSA-OAEP part does not decrypt with this import job's key (wrong job, or not its OAEP hash)",
            ))?
            .len();
        if eph_len != 32 {
            return Err(KeyError::Rejected(format!(
                "the RSA-OAEP part holds {eph_len} bytes; the ephemeral key must be AES-256 (32 bytes)"
            )));
        }
        unwrap_padded(&eph[..32], kwp)
    }
}

/// RSA-OAEP encryption of `plaintext` to the RSA public key `spki` (SubjectPublicKeyInfo DER)
/// with `hash`, as a client wrapping for a job does.
pub fn oaep_encrypt(spki: &[u8], plaintext: &[u8], hash: OaepHash) -> Result<Vec<u8>, KeyError> {
    use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey};
    let public = PublicEncryptingKey::from_der(spki)
        .map_err(|_| KeyError::Crypto("not an RSA public key".into()))
        .and_then(|k| {
            OaepPublicEncryptingKey::new(k).map_err(crypto("not an RSA-OAEP public key"))
        })?;
    let mut out = vec![0u8; public.ciphertext_size()];
    let n = public
        .encrypt(oaep_algorithm(hash), plaintext, &mut out, None)
        .map_err(crypto("RSA-OAEP encryption failed"))?
        .len();
    out.truncate(n);
    Ok(out)
}

fn oaep_algorithm(hash: OaepHash) -> &'static aws_lc_rs::rsa::OaepAlgorithm {
    match hash {
        OaepHash::Sha1 => &OAEP_SHA1_MGF1SHA1,
        OaepHash::Sha256 => &OAEP_SHA256_MGF1SHA256,
    }
}

/// Splits a blob into its RSA-OAEP part and its KWP part, checking their sizes.
pub(crate) fn split_blob(blob: &[u8]) -> Result<(&[u8], &[u8]), KeyError> {
    if blob.len() > MAX_BLOB {
        return Err(KeyError::Rejected(format!(
            "the wrapped blob is {} bytes; at most {MAX_BLOB}",
            blob.len()
        )));
    }
    let Some((rsa, kwp)) = blob.split_at_checked(RSA_PART) else {
        return Err(KeyError::Rejected(format!(
            "the wrapped blob is {} bytes: too short for an RSA-OAEP-3072 import ({RSA_PART} bytes of RSA-OAEP, then the AES-KWP part)",
            blob.len()
        )));
    };
    if kwp.len() < 16 || kwp.len() % 8 != 0 {
        return Err(KeyError::Rejected(format!(
            "the AES-KWP part is {} bytes; it must be a multiple of 8, at least 16",
            kwp.len()
        )));
    }
    Ok((rsa, kwp))
}

/// AES-256 key unwrap with padding (RFC 5649) of `kwp` under `kek`.
pub fn unwrap_padded(kek: &[u8], kwp: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let kek = AesKek::new(&AES_256, kek).map_err(crypto("the ephemeral key is not AES-256"))?;
    let mut out = Zeroizing::new(vec![0u8; kwp.len()]);
    let n = kek
        .unwrap_with_padding(kwp, &mut out)
        .map_err(rejected(
            "the AES-KWP part does not unwrap (corrupted, or not wrapped with the ephemeral key)",
        ))?
        .len();
    out.truncate(n);
    Ok(out)
}

/// The raw public key (EC point, or PKCS#1 for RSA) of a SubjectPublicKeyInfo, which must be
/// of type `kt`.
pub fn spki_raw(spki: &[u8], kt: KeyType) -> Result<Vec<u8>, KeyError> {
    use x509_parser::prelude::FromDer;
    let bad = |why: &str| KeyError::Rejected(format!("the public key is not a {kt} key: {why}"));
    let (rest, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki)
        .map_err(|_| bad("not a SubjectPublicKeyInfo"))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes"));
    }
    let alg = info.algorithm.algorithm.to_id_string();
    let params = info
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    let fits = match kt {
        KeyType::EcP256 => {
            alg == "1.2.840.10045.2.1" && params.as_deref() == Some("1.2.840.10045.3.1.7")
        }
        KeyType::EcP384 => alg == "1.2.840.10045.2.1" && params.as_deref() == Some("1.3.132.0.34"),
        _ => alg == "1.2.840.113549.1.1.1",
    };
    if !fits {
        return Err(bad(&format!("algorithm {alg}")));
    }
    Ok(info.subject_public_key.data.to_vec())
}

/// Whether `sig` (as [`super::KeyHandle::sign`] makes it) verifies over `msg` with the raw
/// public key `raw` of type `kt`.
pub fn verifies(kt: KeyType, raw: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    use aws_lc_rs::signature as s;
    let alg: &dyn s::VerificationAlgorithm = match kt {
        KeyType::EcP256 => &s::ECDSA_P256_SHA256_ASN1,
        KeyType::EcP384 => &s::ECDSA_P384_SHA384_ASN1,
        _ => &s::RSA_PKCS1_2048_8192_SHA256,
    };
    s::UnparsedPublicKey::new(alg, raw).verify(msg, sig).is_ok()
}

#[cfg(test)]
#[path = "import_wrap_tests.rs"]
pub(crate) mod tests;
