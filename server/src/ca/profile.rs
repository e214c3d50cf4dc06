//! The SVID profile (DESIGN §3.2): CA certificates, X509-SVID leaves, JWT-SVIDs, and CSR parsing.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::CaError;
use crate::keys::KeyHandle;

/// A random positive 128-bit serial number.
pub fn random_serial() -> Result<SerialNumber, CaError> {
    let mut b = continuity_common::rand::array::<16>()?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

fn at(unix: i64) -> Result<OffsetDateTime, CaError> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|e| CaError::Profile(e.to_string()))
}

/// Parameters of a self-signed trust-domain root CA.
pub fn ca_params(
    trust_domain: &str,
    not_before: i64,
    not_after: i64,
) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Continuity");
    dn.push(DnType::CommonName, format!("Continuity CA {trust_domain}"));
    // A distinct subject per CA (as SPIRE does with serialNumber), so roots in one bundle
    // never share a name and path builders need not rely on key identifiers alone.
    let serial = random_serial()?;
    dn.push(
        DnType::CustomDnType(vec![2, 5, 4, 5]),
        hex::encode(serial.to_bytes()),
    );
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Profile(e.to_string()))?,
    )];
    p.not_before = at(not_before)?;
    p.not_after = at(not_after)?;
    p.serial_number = Some(serial);
    Ok(p)
}

/// Parameters of an X509-SVID leaf: one URI SAN, cA false, critical key usage, server+client EKU.
pub fn svid_params(
    spiffe_id: &str,
    dns_names: &[String],
    not_before: i64,
    not_after: i64,
) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    // rcgen's default subject (CN "rcgen self signed cert") must not leak into SVIDs.
    p.distinguished_name = DistinguishedName::new();
    if let Some(first) = dns_names.first() {
        p.distinguished_name
            .push(DnType::CommonName, first.as_str());
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyAgreement,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let uri = spiffe_id
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| CaError::Profile(e.to_string()))?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    for d in dns_names {
        let name = d
            .clone()
            .try_into()
            .map_err(|_| CaError::Profile(format!("invalid DNS name {d:?}")))?;
        p.subject_alt_names.push(SanType::DnsName(name));
    }
    p.use_authority_key_identifier_extension = true;
    p.not_before = at(not_before)?;
    p.not_after = at(not_after)?;
    p.serial_number = Some(random_serial()?);
    Ok(p)
}

/// Applies the CSR policy ([`super::csr`]: no weak keys or hashes, the self-signature must
/// verify) and returns the CSR's SubjectPublicKeyInfo (DER). Nothing else in the CSR is
/// trusted: the server builds the SVID from the entry.
pub fn csr_public_key(csr_der: &[u8]) -> Result<Vec<u8>, CaError> {
    Ok(super::csr::check(csr_der)?)
}

/// Encodes and signs a JWT-SVID (compact JWS).
pub fn sign_jwt(
    key: &dyn KeyHandle,
    kid: &str,
    sub: &str,
    audience: &[String],
    issued_at: i64,
    ttl: Duration,
    issuer: Option<&str>,
) -> Result<(String, i64), CaError> {
    let exp = issued_at + ttl.as_secs() as i64;
    let header = serde_json::json!({ "alg": key.key_type().jws_alg(), "kid": kid, "typ": "JWT" });
    let mut claims =
        serde_json::json!({ "sub": sub, "aud": audience, "exp": exp, "iat": issued_at });
    if let Some(iss) = issuer {
        claims["iss"] = iss.into();
    }
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key.sign(signing_input.as_bytes())?;
    let sig = match key.key_type().ecdsa_width() {
        Some(w) => continuity_common::der::ecdsa_der_to_fixed(&sig, w)
            .map_err(|e| CaError::Profile(e.to_string()))?,
        None => sig,
    };
    Ok((
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)),
        exp,
    ))
}
