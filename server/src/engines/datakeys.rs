//! Envelope encryption: data keys wrapped under an encrypt key's primary version (Vault
//! transit's `datakey`, Cloud KMS's client-side pattern), and Rewrap, which moves a
//! ciphertext to the primary version without its plaintext leaving the server.

use continuity_common::secret::Zeroizing;

use super::{EngineError, Engines, Result};

/// The one data-key spec: 32 random bytes for AES-256.
pub const AES_256: &str = "AES_256";

/// A new data key: the version wrapping it, the wrapped key (a Continuity ciphertext, as
/// Encrypt makes) and, unless only the wrapped one was asked for, the key itself.
pub struct DataKey {
    /// The key version that wrapped it (the primary one).
    pub version: u32,
    /// The data key sealed exactly as Encrypt seals.
    pub ciphertext: Vec<u8>,
    /// The data key, unless wrapped-only (wiped on drop).
    pub plaintext: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Zeroizing prints what it holds: the data key never reaches a log or a panic message.
        f.debug_struct("DataKey")
            .field("version", &self.version)
            .field("ciphertext_len", &self.ciphertext.len())
            .field("plaintext", &self.plaintext.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A ciphertext moved to the primary version.
#[derive(Debug)]
pub struct Rewrapped {
    /// The version the given ciphertext named.
    pub source_version: u32,
    /// The primary version now sealing it.
    pub version: u32,
    /// The new ciphertext.
    pub ciphertext: Vec<u8>,
}

/// Checks a requested data-key spec (empty means AES_256).
pub fn check_key_spec(spec: &str) -> Result<&'static str> {
    match spec {
        "" | AES_256 => Ok(AES_256),
        other => Err(EngineError::Invalid(format!(
            "key_spec {other:?} is not supported; the only data-key spec is {AES_256}"
        ))),
    }
}

impl Engines {
    /// A fresh AES-256 data key wrapped under the primary version of encrypt key
    /// `engine/name` with `aad`; its plaintext is returned unless `wrapped_only`.
    pub async fn generate_data_key(
        &self,
        engine: &str,
        name: &str,
        wrapped_only: bool,
        aad: &[u8],
        actor: &str,
    ) -> Result<DataKey> {
        let target = format!("{engine}/{name}");
        let op = async {
            let dk = crate::keys::aes::generate()?;
            let (version, ciphertext) = self.seal_primary(engine, name, &dk, aad).await?;
            Ok(DataKey {
                version,
                ciphertext,
                plaintext: (!wrapped_only).then_some(dk),
            })
        };
        self.audited(actor, "key.generate_data_key", &target, |d| d.version, op)
            .await
    }

    /// Decrypts `ciphertext` (sealed with `aad`) and seals its plaintext again, with the
    /// same `aad`, under the primary version; the plaintext is wiped before returning.
    pub async fn rewrap(
        &self,
        engine: &str,
        name: &str,
        ciphertext: &[u8],
        aad: &[u8],
        actor: &str,
    ) -> Result<Rewrapped> {
        let target = format!("{engine}/{name}");
        let op = async {
            let (source_version, pt) = self.open_ciphertext(engine, name, ciphertext, aad).await?;
            let pt = Zeroizing::new(pt);
            let (version, ciphertext) = self.seal_primary(engine, name, &pt, aad).await?;
            Ok(Rewrapped {
                source_version,
                version,
                ciphertext,
            })
        };
        self.audited(actor, "key.rewrap", &target, |r| r.version, op)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_key_never_prints_its_plaintext() {
        let key = DataKey {
            version: 3,
            ciphertext: vec![9; 60],
            plaintext: Some(Zeroizing::new(vec![0xAB; 32])),
        };
        let shown = format!("{key:?}");
        assert!(
            shown.contains("version: 3") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(
            !shown.contains("171"),
            "the data key's bytes in Debug: {shown}"
        );
    }
}
