//! The key-import wrapping of Cloud KMS import jobs, method `RSA_OAEP_3072_SHA256_AES_256`
//! (PKCS#11's CKM_RSA_AES_KEY_WRAP): the client makes an ephemeral AES-256 key, wraps the
//! target key material with it (AES key wrap with padding, RFC 5649 / NIST SP 800-38F KWP),
//! and encrypts the ephemeral key to the job's RSA-3072 public key with OAEP (SHA-256, MGF1
//! SHA-256, no label). The blob is `RSA-OAEP(ephemeral) || KWP(ephemeral, material)`.
//!
//! Target material: PKCS#8 DER for EC and RSA keys, the raw 32 bytes for AES-256. Every
//! byte of a blob comes from a client and is checked here before anything is unwrapped.

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrapPadded};
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, PrivateDecryptingKey,
};
use continuity_common::secret::Zeroizing;

use super::KeyError;

/// The import method, spelled as Cloud KMS spells it.
pub const IMPORT_METHOD: &str = "RSA_OAEP_3072_SHA256_AES_256";

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

    /// Unwraps a blob made for this key: the target material (wiped on drop).
    pub fn unwrap(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let (rsa, kwp) = split_blob(blob)?;
        let oaep = OaepPrivateDecryptingKey::new(self.0.clone())
            .map_err(crypto("the wrapping key cannot do OAEP"))?;
        let mut eph = Zeroizing::new(vec![0u8; oaep.min_output_size()]);
        let eph_len = oaep
            .decrypt(&OAEP_SHA256_MGF1SHA256, rsa, &mut eph, None)
            .map_err(crypto(
                "the wrapped blob's RSA-OAEP part does not decrypt with this import job's key (wrong job, or not RSA-OAEP SHA-256)",
            ))?
            .len();
        if eph_len != 32 {
            return Err(KeyError::Crypto(format!(
                "the RSA-OAEP part holds {eph_len} bytes; the ephemeral key must be AES-256 (32 bytes)"
            )));
        }
        unwrap_padded(&eph[..32], kwp)
    }
}

/// Splits a blob into its RSA-OAEP part and its KWP part, checking their sizes.
fn split_blob(blob: &[u8]) -> Result<(&[u8], &[u8]), KeyError> {
    if blob.len() > MAX_BLOB {
        return Err(KeyError::Crypto(format!(
            "the wrapped blob is {} bytes; at most {MAX_BLOB}",
            blob.len()
        )));
    }
    let Some((rsa, kwp)) = blob.split_at_checked(RSA_PART) else {
        return Err(KeyError::Crypto(format!(
            "the wrapped blob is {} bytes: too short for {IMPORT_METHOD} ({RSA_PART} bytes of RSA-OAEP, then the AES-KWP part)",
            blob.len()
        )));
    };
    if kwp.len() < 16 || kwp.len() % 8 != 0 {
        return Err(KeyError::Crypto(format!(
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
        .map_err(crypto(
            "the AES-KWP part does not unwrap (corrupted, or not wrapped with the ephemeral key)",
        ))?
        .len();
    out.truncate(n);
    Ok(out)
}

#[cfg(test)]
#[path = "import_wrap_tests.rs"]
mod tests;
