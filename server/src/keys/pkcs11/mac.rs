//! HMAC-SHA256 keys inside the token: a non-extractable generic secret used with
//! CKM_SHA256_HMAC, so record MACs and the audit chain are computed where no datastore writer
//! (and no one reading the server's memory) can take the key.

use std::sync::Arc;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType as CkKeyType, ObjectClass, ObjectHandle};

use super::token::Token;
use super::{LABEL_PREFIX, ck};
use crate::keys::{KeyError, MAC_LEN, MacKey};

/// Where a MAC key's label differs from an AES key or key pair of the same id.
fn label_id(id: &str) -> String {
    format!("hmac/{id}")
}

/// A generic secret object inside the token, used with CKM_SHA256_HMAC.
pub struct Pkcs11Mac {
    handle: ObjectHandle,
    token: Arc<Token>,
}

impl std::fmt::Debug for Pkcs11Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pkcs11Mac(..)")
    }
}

impl MacKey for Pkcs11Mac {
    fn mechanism(&self) -> &'static str {
        "pkcs11:CKM_SHA256_HMAC"
    }

    fn mac(&self, data: &[u8]) -> Result<[u8; MAC_LEN], KeyError> {
        let tag = self.token.with_session(|s| {
            s.sign(&Mechanism::Sha256Hmac, self.handle, data)
                .map_err(ck("HMAC-SHA256"))
        })?;
        tag.as_slice()
            .try_into()
            .map_err(|_| KeyError::Pkcs11(format!("HMAC-SHA256 tag of {} bytes", tag.len())))
    }

    fn verify(&self, data: &[u8], tag: &[u8]) -> Result<bool, KeyError> {
        if tag.len() != MAC_LEN {
            return Ok(false);
        }
        // C_Verify compares inside the token.
        self.token.with_session(|s| {
            match s.verify(&Mechanism::Sha256Hmac, self.handle, data, tag) {
                Ok(()) => Ok(true),
                Err(CkError::Pkcs11(RvError::SignatureInvalid | RvError::SignatureLenRange, _)) => {
                    Ok(false)
                }
                Err(e) => Err(ck("HMAC-SHA256 verify")(e)),
            }
        })
    }
}

/// The MAC key `id`: found by label, or generated (32 bytes, sensitive, never extractable).
pub(super) fn get_or_generate(token: &Arc<Token>, id: &str) -> Result<Pkcs11Mac, KeyError> {
    let label = label_id(id);
    let handle =
        token.with_session(|s| match token.find(s, &label, ObjectClass::SECRET_KEY)? {
            Some(h) => Ok(h),
            None => {
                let template = [
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(CkKeyType::GENERIC_SECRET),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Sign(true),
                    Attribute::Verify(true),
                    Attribute::ValueLen(32.into()),
                    Attribute::Label(format!("{LABEL_PREFIX}{label}").into_bytes()),
                    Attribute::Id(label.as_bytes().to_vec()),
                ];
                s.generate_key(&Mechanism::GenericSecretKeyGen, &template)
                    .map_err(ck("generate HMAC key"))
            }
        })?;
    Ok(Pkcs11Mac {
        handle,
        token: token.clone(),
    })
}
