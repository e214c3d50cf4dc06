//! Small X.509 and PEM helpers used by both agent and server.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use x509_parser::extensions::GeneralName;

/// Encodes DER as PEM with the given label, 64-column lines.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Decodes every PEM block with the given label, in order.
pub fn pem_decode_all(label: &str, text: &str) -> Result<Vec<Vec<u8>>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let stop = after
            .find(&end)
            .ok_or_else(|| format!("unterminated PEM block {label}"))?;
        let body: String = after[..stop]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        out.push(
            STANDARD
                .decode(body)
                .map_err(|e| format!("bad base64 in PEM block {label}: {e}"))?,
        );
        rest = &after[stop + end.len()..];
    }
    Ok(out)
}

/// The URI SANs of a DER certificate.
pub fn uri_sans(cert_der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| format!("bad certificate: {e}"))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                out.push((*u).to_string());
            }
        }
    }
    Ok(out)
}

/// The single SPIFFE ID of an SVID, or an error when it has none or several.
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<crate::SpiffeId, String> {
    let uris = uri_sans(cert_der)?;
    match uris.as_slice() {
        [one] => crate::SpiffeId::new(one).map_err(|e| e.to_string()),
        [] => Err("certificate has no URI SAN".into()),
        _ => Err("certificate has more than one URI SAN".into()),
    }
}

/// The certificate's NotAfter in Unix seconds.
pub fn not_after(cert_der: &[u8]) -> Result<i64, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| format!("bad certificate: {e}"))?;
    Ok(cert.validity().not_after.timestamp())
}

/// The certificate's serial number as lowercase hex.
pub fn serial_hex(cert_der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| format!("bad certificate: {e}"))?;
    Ok(cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// What a peer's SVID says about it, from one parse: (SPIFFE ID, NotAfter, serial hex).
pub fn svid_facts(cert_der: &[u8]) -> Result<(crate::SpiffeId, i64, String), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| format!("bad certificate: {e}"))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push(*u);
            }
        }
    }
    let id = match uris.as_slice() {
        [one] => crate::SpiffeId::new(one).map_err(|e| e.to_string())?,
        [] => return Err("certificate has no URI SAN".into()),
        _ => return Err("certificate has more than one URI SAN".into()),
    };
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((id, cert.validity().not_after.timestamp(), serial))
}
