//! The upstream authority (SPIRE's UpstreamAuthority "disk", and the same with the key in a
//! PKCS#11 token): an existing CA certificate and key that sign each new X.509 CA of the
//! trust domain, which so becomes an intermediate.
//!
//! As in SPIRE: without `bundle_file` the upstream certificate must be a self-signed root and is
//! the bundle's X.509 authority; with it, `cert_file` holds the upstream CA followed by any
//! intermediates above it, `bundle_file` the roots, and the chain must verify to one of them.
//! Every X509-SVID then carries leaf + the server CA + those intermediates; the bundle holds
//! the upstream roots only (plus any self-signed CA from before the upstream was configured,
//! until it expires). A CA certificate never outlives the upstream certificate: `ca_ttl` is
//! clamped to its remaining lifetime, with a warning. JWT keys are not affected.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::signature::{self, UnparsedPublicKey};
use rcgen::{CertificateParams, Issuer};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

mod config;

pub use config::{FileUpstream, UpstreamConfig, UpstreamKey};

use super::CaError;
use crate::keys::software::SoftwareKey;
use crate::keys::{KeyHandle, KeyType, Pkcs11KeyManager, RcgenKey};

/// Largest certificate, bundle or key file read (PEM).
const MAX_FILE: usize = 1 << 20;

/// An unusable upstream authority; `key` is the config key to fix.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct UpstreamError {
    /// The config key, e.g. `upstream_authority.cert_file`.
    pub key: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn err(key: &'static str, message: impl Into<String>) -> UpstreamError {
    UpstreamError {
        key,
        message: message.into(),
    }
}

const CERT_FILE: &str = "upstream_authority.cert_file";
const BUNDLE_FILE: &str = "upstream_authority.bundle_file";

/// The loaded upstream CA: signs the trust domain's CA certificates.
pub struct UpstreamAuthority {
    issuer: Issuer<'static, RcgenKey>,
    /// Certificates after the server CA in every chain (the upstream CA and intermediates
    /// above it); empty when the upstream certificate is itself the root.
    chain: Vec<Vec<u8>>,
    roots: Vec<Vec<u8>>,
    not_after: i64,
    kind: &'static str,
}

impl std::fmt::Debug for UpstreamAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamAuthority")
            .field("kind", &self.kind)
            .field("not_after", &self.not_after)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl UpstreamAuthority {
    /// Reads and checks the upstream certificate, bundle and key at `now` (Unix seconds);
    /// warns if `ca_ttl` will be clamped. Blocking (files, PKCS#11).
    pub fn load(cfg: &UpstreamConfig, now: i64, ca_ttl: Duration) -> Result<Self, UpstreamError> {
        let certs = read_certs(&cfg.cert_file, CERT_FILE)?;
        let (roots, chain) = match &cfg.bundle_file {
            None => (certs, Vec::new()),
            Some(b) => (read_certs(b, BUNDLE_FILE)?, certs),
        };
        let top = chain.first().unwrap_or(&roots[0]).clone();
        let not_after = check_upstream(&top, &chain, &roots, cfg.bundle_file.is_some(), now)?;
        let (key, kind) = load_key(&cfg.key, &top)?;
        let issuer = Issuer::from_ca_cert_der(&top.clone().into(), RcgenKey(key))
            .map_err(|e| err(CERT_FILE, format!("cannot use the certificate: {e}")))?;
        if now.saturating_add(ca_ttl.as_secs() as i64) > not_after {
            tracing::warn!(
                upstream_not_after = not_after,
                "ca_ttl is longer than the upstream certificate's remaining lifetime; CA certificates are clamped to expire with it"
            );
        }
        tracing::info!(kind, roots = roots.len(), "upstream authority loaded");
        Ok(Self {
            issuer,
            chain,
            roots,
            not_after,
            kind,
        })
    }

    /// The upstream roots: the bundle's X.509 authorities.
    pub fn roots(&self) -> &[Vec<u8>] {
        &self.roots
    }

    /// NotAfter of the upstream certificate, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }
}

/// NotAfter for a new CA certificate asked to last until `requested` (clamped to the upstream's).
pub(super) fn ca_not_after(upstream: Option<&UpstreamAuthority>, requested: i64) -> i64 {
    match upstream {
        Some(u) if requested > u.not_after => {
            tracing::warn!(
                upstream_not_after = u.not_after,
                "the new CA certificate is clamped to the upstream certificate's lifetime"
            );
            u.not_after
        }
        _ => requested,
    }
}

/// The CA certificate for `key`: signed by the upstream when there is one, else self-signed.
/// Blocking (the upstream key may be in an HSM).
pub(super) fn issue_ca_cert(
    upstream: Option<Arc<UpstreamAuthority>>,
    mut params: CertificateParams,
    key: &RcgenKey,
) -> Result<Vec<u8>, CaError> {
    let cert = match upstream {
        Some(u) => {
            params.use_authority_key_identifier_extension = true;
            params.signed_by(key, &u.issuer)
        }
        None => params.self_signed(key),
    };
    Ok(cert
        .map_err(|e| CaError::Sign(e.to_string()))?
        .der()
        .to_vec())
}

/// The bundle's X.509 authorities given the CA certificates of the journal: all of them
/// without an upstream; with one, its roots plus the self-signed CAs (from before it).
pub(super) fn bundle_x509(
    upstream: Option<&UpstreamAuthority>,
    ca_certs: Vec<Vec<u8>>,
) -> Vec<Vec<u8>> {
    let Some(u) = upstream else { return ca_certs };
    let mut out = u.roots.clone();
    out.extend(ca_certs.into_iter().filter(|c| self_signed(c)));
    out
}

/// The certificates after the leaf in an SVID signed by the CA `ca_cert`: none for a
/// self-signed CA, else the CA and the upstream intermediates.
pub(super) fn intermediates(upstream: Option<&UpstreamAuthority>, ca_cert: &[u8]) -> Vec<Vec<u8>> {
    if self_signed(ca_cert) {
        return Vec::new();
    }
    let mut out = vec![ca_cert.to_vec()];
    out.extend(upstream.iter().flat_map(|u| u.chain.iter().cloned()));
    out
}

/// Whether `der` is a certificate signed by its own key.
pub(super) fn self_signed(der: &[u8]) -> bool {
    X509Certificate::from_der(der).is_ok_and(|(_, c)| {
        c.subject().as_raw() == c.issuer().as_raw() && c.verify_signature(None).is_ok()
    })
}

fn read_certs(path: &Path, key: &'static str) -> Result<Vec<Vec<u8>>, UpstreamError> {
    let text = read_text(path, key)?;
    let certs = continuity_common::x509::pem_decode_all("CERTIFICATE", &text)
        .map_err(|e| err(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(err(
            key,
            format!("{} holds no PEM CERTIFICATE", path.display()),
        ));
    }
    Ok(certs)
}

fn read_text(path: &Path, key: &'static str) -> Result<String, UpstreamError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| err(key, format!("cannot read {}: {e}", path.display())))?;
    if meta.len() > MAX_FILE as u64 {
        return Err(err(
            key,
            format!("{} is over {MAX_FILE} bytes", path.display()),
        ));
    }
    std::fs::read_to_string(path)
        .map_err(|e| err(key, format!("cannot read {}: {e}", path.display())))
}

fn parse<'a>(der: &'a [u8], key: &'static str) -> Result<X509Certificate<'a>, UpstreamError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| err(key, format!("not an X.509 certificate: {e}")))
}

/// Checks the upstream CA `top`, its `chain` and the `roots` at `now`; returns top's NotAfter.
fn check_upstream(
    top: &[u8],
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    has_bundle: bool,
    now: i64,
) -> Result<i64, UpstreamError> {
    let cert = parse(top, CERT_FILE)?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|b| b.value.ca);
    if !is_ca {
        return Err(err(
            CERT_FILE,
            "the certificate is not a CA (basicConstraints cA is not true)",
        ));
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(err(
            CERT_FILE,
            "the certificate's key usage lacks keyCertSign",
        ));
    }
    let (nb, na) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    if na <= now {
        return Err(err(
            CERT_FILE,
            format!(
                "the certificate expired at {} (Unix {na})",
                cert.validity().not_after
            ),
        ));
    }
    if nb > now {
        return Err(err(
            CERT_FILE,
            format!("the certificate is not valid before Unix {nb}"),
        ));
    }
    if !has_bundle {
        if roots.len() != 1 || !self_signed(top) {
            return Err(err(
                CERT_FILE,
                "without bundle_file the upstream certificate must be one self-signed root",
            ));
        }
        return Ok(na);
    }
    verify_chain(chain, roots)?;
    Ok(na)
}

/// Each certificate of `chain` is signed by the next; the last by one of `roots`.
fn verify_chain(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> Result<(), UpstreamError> {
    let parsed_roots = roots
        .iter()
        .map(|r| parse(r, BUNDLE_FILE))
        .collect::<Result<Vec<_>, _>>()?;
    let parsed = chain
        .iter()
        .map(|c| parse(c, CERT_FILE))
        .collect::<Result<Vec<_>, _>>()?;
    for pair in parsed.windows(2) {
        if pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .is_err()
        {
            return Err(err(
                CERT_FILE,
                "a certificate in the file is not signed by the one after it",
            ));
        }
    }
    let last = parsed
        .last()
        .ok_or_else(|| err(CERT_FILE, "no certificate"))?;
    let anchored = parsed_roots.iter().any(|r| {
        r.subject().as_raw() == last.issuer().as_raw()
            && last.verify_signature(Some(r.public_key())).is_ok()
    });
    if !anchored {
        return Err(err(
            BUNDLE_FILE,
            "the certificate chain in cert_file does not verify to any root in bundle_file",
        ));
    }
    Ok(())
}

/// The key type of a certificate's public key, and its raw form (EC point or PKCS#1 RSA).
fn public_key_of(cert: &X509Certificate<'_>) -> Result<(KeyType, Vec<u8>), UpstreamError> {
    let spki = cert.public_key();
    let raw = spki.subject_public_key.data.to_vec();
    let key_type = match spki.parsed() {
        Ok(PublicKey::EC(_)) if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == OID_EC_P256 => KeyType::EcP256,
                Some(c) if c == OID_NIST_EC_P384 => KeyType::EcP384,
                _ => return Err(err(CERT_FILE, "EC keys must be P-256 or P-384")),
            }
        }
        Ok(PublicKey::RSA(r)) => match r.key_size() {
            0..=2048 => KeyType::Rsa2048,
            2049..=3072 => KeyType::Rsa3072,
            _ => KeyType::Rsa4096,
        },
        _ => {
            return Err(err(
                CERT_FILE,
                "the certificate's key is not EC P-256/P-384 or RSA",
            ));
        }
    };
    Ok((key_type, raw))
}

/// Opens the private key of `cert_der` and proves it matches by signing a challenge.
fn load_key(
    key: &UpstreamKey,
    cert_der: &[u8],
) -> Result<(Arc<dyn KeyHandle>, &'static str), UpstreamError> {
    let cert = parse(cert_der, CERT_FILE)?;
    let (key_type, public) = public_key_of(&cert)?;
    let (handle, config_key, kind): (Arc<dyn KeyHandle>, _, _) = match key {
        UpstreamKey::Disk { key_file } => {
            const KEY: &str = "upstream_authority.key_file";
            let bytes = continuity_common::fsperm::read_private_file(key_file, KEY, MAX_FILE)
                .map_err(|e| err(KEY, e.to_string()))?;
            let text = std::str::from_utf8(&bytes).map_err(|_| err(KEY, "not PEM text"))?;
            let der = continuity_common::x509::pem_decode_all("PRIVATE KEY", text)
                .map_err(|e| err(KEY, e))?
                .into_iter()
                .next()
                .ok_or_else(|| {
                    err(KEY, "no PEM PRIVATE KEY (PKCS#8) block; convert with `openssl pkcs8 -topk8 -nocrypt`")
                })?;
            let k = SoftwareKey::from_pkcs8("upstream", key_type, der).map_err(|_| {
                err(
                    KEY,
                    format!("not a {key_type} PKCS#8 key matching the certificate"),
                )
            })?;
            (Arc::new(k), KEY, "disk")
        }
        UpstreamKey::Pkcs11 {
            module,
            token_label,
            pin,
            key_label,
        } => {
            const KEY: &str = "upstream_authority.key_label";
            let token = Pkcs11KeyManager::open_for("upstream_authority", module, token_label, pin)
                .map_err(|e| err("upstream_authority.token_label", e.to_string()))?;
            let k = token
                .external_key(key_label, key_type, public.clone())
                .map_err(|e| err(KEY, e.to_string()))?
                .ok_or_else(|| {
                    err(
                        KEY,
                        format!("no private key labelled {key_label:?} in token {token_label:?}"),
                    )
                })?;
            (k, KEY, "pkcs11")
        }
    };
    prove_match(handle.as_ref(), key_type, &public).map_err(|m| err(config_key, m))?;
    Ok((handle, kind))
}

/// Signs a random challenge with `key` and verifies it with the certificate's public key.
fn prove_match(key: &dyn KeyHandle, key_type: KeyType, public: &[u8]) -> Result<(), String> {
    let challenge = continuity_common::rand::array::<32>().map_err(|e| e.to_string())?;
    let sig = key
        .sign(&challenge)
        .map_err(|e| format!("cannot sign with the key: {e}"))?;
    let alg: &dyn signature::VerificationAlgorithm = match key_type {
        KeyType::EcP256 => &signature::ECDSA_P256_SHA256_ASN1,
        KeyType::EcP384 => &signature::ECDSA_P384_SHA384_ASN1,
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
            &signature::RSA_PKCS1_2048_8192_SHA256
        }
    };
    UnparsedPublicKey::new(alg, public)
        .verify(&challenge, &sig)
        .map_err(|_| {
            "the key does not match the certificate in upstream_authority.cert_file".into()
        })
}

#[cfg(test)]
mod tests;
