//! Key import inside the token (hsm custody import jobs): the job's RSA-3072 wrapping key is
//! generated in the token (unwrap only, never extractable), and a blob is unwrapped in two
//! steps that never leave the token: RSA-OAEP (CKM_RSA_PKCS_OAEP) unwraps the ephemeral
//! AES-256 key as a session object, then CKM_AES_KEY_WRAP_PAD unwraps the target material
//! under it into a token object (sensitive, never extractable), and the ephemeral key is
//! destroyed. SoftHSM2 2.6 has no CKM_RSA_AES_KEY_WRAP and does OAEP with SHA-1 only, so this
//! path takes the two steps and its jobs use method `RSA_OAEP_3072_SHA1_AES_256`.
//!
//! A token that does not expose an imported private key's public half (SoftHSM2 keeps no
//! CKA_EC_POINT on EC private keys) needs it from the caller; either way the pair is proven by
//! a signature made in the token and checked with the public key before anything is kept.

use std::sync::Arc;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::aes::Pkcs11Aes;
use super::key::Pkcs11Key;
use super::token::Token;
use super::{LABEL_PREFIX, P256_PARAMS, P384_PARAMS, Pkcs11KeyManager, ck, public_key_raw};
use crate::keys::import_wrap::{OaepHash, split_blob};
use crate::keys::{AesKey, ImportRequest, ImportTarget, Imported, KeyError, KeyHandle, KeyType};

/// What a refused C_UnwrapKey says about the caller's blob (not about the token). SoftHSM2
/// answers a KWP part that fails its integrity check with CKR_GENERAL_ERROR, so that counts
/// as the blob's fault too.
fn rejected(step: &'static str) -> impl Fn(CkError) -> KeyError {
    move |e| match e {
        CkError::Pkcs11(
            RvError::GeneralError
            | RvError::FunctionFailed
            | RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::DataInvalid
            | RvError::DataLenRange
            | RvError::TemplateInconsistent
            | RvError::AttributeValueInvalid
            | RvError::KeyTypeInconsistent,
            _,
        ) => KeyError::Rejected(format!("{step}: {e}")),
        e => KeyError::Pkcs11(format!("{step}: {e}")),
    }
}

impl Pkcs11KeyManager {
    /// Generates the RSA-3072 wrapping key `id` in the token and checks the token can unwrap
    /// with it under OAEP `hash` (a probe key wrapped here); returns its SPKI DER.
    pub(super) fn generate_wrapping_blocking(
        token: &Arc<Token>,
        id: &str,
        hash: OaepHash,
    ) -> Result<Vec<u8>, KeyError> {
        let label = format!("{LABEL_PREFIX}{id}").into_bytes();
        let public = [
            Attribute::Token(false),
            Attribute::Encrypt(true),
            Attribute::Wrap(true),
            Attribute::ModulusBits(3072.into()),
            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Unwrap(true),
            Attribute::Decrypt(false),
            Attribute::Sign(false),
            Attribute::Label(label),
            Attribute::Id(id.as_bytes().to_vec()),
        ];
        token.with_session(|s| {
            let (pubh, privh) = s
                .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
                .map_err(ck("generate the RSA-3072 wrapping key"))?;
            let raw = public_key_raw(s, pubh, KeyType::Rsa3072);
            let _ = s.destroy_object(pubh);
            let spki = raw.map(|raw| crate::keys::spki_of(KeyType::Rsa3072, &raw));
            let probed = spki.and_then(|spki| {
                let probe = crate::keys::import_wrap::oaep_encrypt(&spki, &[0x5a; 32], hash)?;
                let eph = unwrap_ephemeral(s, privh, hash, &probe).map_err(|e| {
                    KeyError::Unsupported(format!(
                        "this token cannot unwrap RSA-OAEP with {hash:?} ({e}); use method RSA_OAEP_3072_SHA1_AES_256"
                    ))
                })?;
                let _ = s.destroy_object(eph);
                Ok(spki)
            });
            if probed.is_err() {
                let _ = s.destroy_object(privh);
            }
            probed
        })
    }

    /// Unwraps the request's blob with its wrapping key into the token object of its id.
    pub(super) fn unwrap_import_blocking(
        token: &Arc<Token>,
        req: &ImportRequest,
    ) -> Result<Imported, KeyError> {
        let (rsa, kwp) = split_blob(&req.blob)?;
        // KWP of exactly 32 bytes is 40 bytes long (25 to 32 bytes of material give 40).
        if req.target == ImportTarget::Aes && kwp.len() != 40 {
            return Err(KeyError::Rejected(format!(
                "the AES-KWP part is {} bytes; a wrapped AES-256 key is 40",
                kwp.len()
            )));
        }
        token.with_session(|s| {
            let wrapping = token
                .find(s, &req.wrapping_id, ObjectClass::PRIVATE_KEY)?
                .ok_or_else(|| {
                    KeyError::Pkcs11(format!(
                        "the import job's wrapping key {} is not in the token",
                        req.wrapping_id
                    ))
                })?;
            let eph = unwrap_ephemeral(s, wrapping, req.hash, rsa)?;
            let target = s.unwrap_key(
                &Mechanism::AesKeyWrapPad,
                eph,
                kwp,
                &target_template(&req.id, req.target),
            );
            let _ = s.destroy_object(eph);
            let handle = target.map_err(rejected(
                "the AES-KWP part does not unwrap into the key (corrupted, or not this material's type)",
            ))?;
            match finish(token, s, handle, req) {
                Ok(imported) => Ok(imported),
                Err(e) => {
                    // Nothing half-made stays in the token.
                    for class in [ObjectClass::PUBLIC_KEY, ObjectClass::PRIVATE_KEY, ObjectClass::SECRET_KEY] {
                        while let Ok(Some(h)) = token.find_any(s, &req.id, class) {
                            if s.destroy_object(h).is_err() {
                                break;
                            }
                        }
                    }
                    token.forget_copy(&req.id);
                    Err(e)
                }
            }
        })
    }
}

/// Step one: RSA-OAEP unwraps the ephemeral AES-256 key into a session object.
fn unwrap_ephemeral(
    s: &Session,
    wrapping: ObjectHandle,
    hash: OaepHash,
    rsa: &[u8],
) -> Result<ObjectHandle, KeyError> {
    let (alg, mgf) = match hash {
        OaepHash::Sha1 => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
        OaepHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
    };
    let params = PkcsOaepParams::new(alg, mgf, PkcsOaepSource::empty());
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(CkKeyType::AES),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Unwrap(true),
    ];
    let eph = s
        .unwrap_key(&Mechanism::RsaPkcsOaep(params), wrapping, rsa, &template)
        .map_err(rejected(
            "the wrapped blob's RSA-OAEP part does not decrypt with this import job's key (wrong job, or not its OAEP hash)",
        ))?;
    let len = s
        .get_attributes(eph, &[AttributeType::ValueLen])
        .map_err(ck("read the ephemeral key's length"));
    // A token that reports no length (SoftHSM2 keeps none on unwrapped keys, and refuses
    // CKA_VALUE_LEN in an unwrap template) is trusted with the KWP step's own checks.
    let len = match len.as_deref() {
        Ok([Attribute::ValueLen(n)]) => u64::from(*n),
        _ => 0,
    };
    if len != 0 && len != 32 {
        let _ = s.destroy_object(eph);
        return Err(KeyError::Rejected(format!(
            "the RSA-OAEP part holds a {len}-byte key; the ephemeral key must be AES-256 (32 bytes)"
        )));
    }
    Ok(eph)
}

/// The template of the imported token object.
fn target_template(id: &str, target: ImportTarget) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Label(format!("{LABEL_PREFIX}{id}").into_bytes()),
        Attribute::Id(id.as_bytes().to_vec()),
    ];
    match target {
        ImportTarget::Signer(kt) => {
            t.push(Attribute::Class(ObjectClass::PRIVATE_KEY));
            t.push(Attribute::KeyType(match kt {
                KeyType::EcP256 | KeyType::EcP384 => CkKeyType::EC,
                _ => CkKeyType::RSA,
            }));
            t.push(Attribute::Sign(true));
        }
        ImportTarget::Aes => {
            t.push(Attribute::Class(ObjectClass::SECRET_KEY));
            t.push(Attribute::KeyType(CkKeyType::AES));
            t.push(Attribute::Encrypt(true));
            t.push(Attribute::Decrypt(true));
        }
    }
    t
}

/// Checks the unwrapped object is what the key needs, and makes it usable.
fn finish(
    token: &Arc<Token>,
    s: &Session,
    handle: ObjectHandle,
    req: &ImportRequest,
) -> Result<Imported, KeyError> {
    let kt = match req.target {
        ImportTarget::Aes => {
            let attrs = s
                .get_attributes(handle, &[AttributeType::ValueLen])
                .map_err(ck("read the imported key's length"))?;
            let reported = match attrs.as_slice() {
                [Attribute::ValueLen(n)] => u64::from(*n),
                _ => 0,
            };
            let key = Pkcs11Aes {
                id: req.id.clone(),
                handle,
                token: token.clone(),
            };
            // The KWP part's length already bounds the material to 25..=32 bytes; a token that
            // reports no length proves it is a working AES key by a round trip.
            let works = key
                .encrypt(b"import check", b"")
                .and_then(|c| key.decrypt(&c, b""))
                .is_ok_and(|p| p == b"import check");
            if (reported != 0 && reported != 32) || !works {
                return Err(KeyError::Rejected(
                    "the imported material is not an AES-256 key (32 bytes)".into(),
                ));
            }
            return Ok(Imported::Aes(Arc::new(key)));
        }
        ImportTarget::Signer(kt) => kt,
    };
    let public = public_half(s, handle, kt, req.public.as_deref())?;
    let key = Pkcs11Key {
        id: req.id.clone(),
        key_type: kt,
        public,
        private: token.signing_handle(s, &req.id, handle),
        token: token.clone(),
    };
    prove_pair(&key)?;
    s.create_object(&public_template(&req.id, kt, &key.public))
        .map_err(ck("store the imported key's public half"))?;
    Ok(Imported::Signer(Arc::new(key)))
}

/// The public half of the imported private key: from the token if it exposes it (and then
/// equal to the caller's, if given), else the caller's; either checked against the key's type.
fn public_half(
    s: &Session,
    handle: ObjectHandle,
    kt: KeyType,
    given: Option<&[u8]>,
) -> Result<Vec<u8>, KeyError> {
    let (want_params, read) = match kt {
        KeyType::EcP256 => (P256_PARAMS, AttributeType::EcParams),
        KeyType::EcP384 => (P384_PARAMS, AttributeType::EcParams),
        _ => (&[][..], AttributeType::Modulus),
    };
    let attrs = s
        .get_attributes(handle, &[read])
        .map_err(ck("read the imported key's type"))?;
    let fits = match attrs.as_slice() {
        [Attribute::EcParams(p)] => p == want_params,
        [Attribute::Modulus(m)] => m.len() * 8 == kt.rsa_bits().unwrap_or(0),
        _ => false,
    };
    if !fits {
        return Err(KeyError::Rejected(format!(
            "the imported material is not a {kt} private key"
        )));
    }
    let given = given
        .map(|spki| crate::keys::import_wrap::spki_raw(spki, kt))
        .transpose()?;
    let ec = matches!(kt, KeyType::EcP256 | KeyType::EcP384);
    match (public_key_raw(s, handle, kt), given) {
        // A public key given is checked either way: the token's half must be it.
        (Ok(held), Some(given)) if held != given => Err(KeyError::Rejected(
            "the public key given is not the imported private key's".into(),
        )),
        (Ok(held), _) => Ok(held),
        // Proven to be the private key's by prove_pair before anything is kept.
        (Err(_), Some(given)) if ec => Ok(given),
        (Err(_), None) if ec => Err(KeyError::Rejected(
            "this token does not expose the public half of an imported EC private key: give its public key (engine key import --public-key FILE)".into(),
        )),
        (Err(e), _) => Err(e),
    }
}

/// Signs a random challenge in the token and checks it with the public half.
fn prove_pair(key: &Pkcs11Key) -> Result<(), KeyError> {
    let mut challenge = [0u8; 32];
    aws_lc_rs::rand::fill(&mut challenge).map_err(|_| KeyError::Crypto("no randomness".into()))?;
    let sig = key.sign(&challenge)?;
    if crate::keys::import_wrap::verifies(key.key_type, &key.public, &challenge, &sig) {
        Ok(())
    } else {
        Err(KeyError::Rejected(
            "the public key given is not the imported private key's".into(),
        ))
    }
}

/// The token object of the imported key's public half (found by label as generated ones are).
fn public_template(id: &str, kt: KeyType, raw: &[u8]) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Label(format!("{LABEL_PREFIX}{id}").into_bytes()),
        Attribute::Id(id.as_bytes().to_vec()),
    ];
    match kt {
        KeyType::EcP256 | KeyType::EcP384 => {
            let params = if kt == KeyType::EcP256 {
                P256_PARAMS
            } else {
                P384_PARAMS
            };
            t.push(Attribute::KeyType(CkKeyType::EC));
            t.push(Attribute::EcParams(params.to_vec()));
            t.push(Attribute::EcPoint(continuity_common::der::tlv(0x04, raw)));
        }
        _ => {
            let (n, e) = continuity_common::der::rsa_parts(raw).unwrap_or_default();
            t.push(Attribute::KeyType(CkKeyType::RSA));
            t.push(Attribute::Modulus(n));
            t.push(Attribute::PublicExponent(e));
        }
    }
    t
}
