//! X509-SVID responses: how `api fetch x509` and `api watch` print them, and `--write`.

use std::io::{self, Write};
use std::path::Path;

use continuity_common::x509::{not_after, pem_encode};
use continuity_proto::workload::X509svidResponse;
use serde::Serialize;

use super::error::CliError;
use super::files;
use super::output::{View, plural};

/// The certificates of a DER concatenation, each as its own DER (stops at the first malformed one).
pub fn split_der(concat: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = concat;
    while let Ok((_, _, tail)) = continuity_common::der::read_tlv(rest) {
        let len = rest.len() - tail.len();
        out.push(&rest[..len]);
        rest = tail;
        if rest.is_empty() {
            break;
        }
    }
    out
}

/// A DER concatenation as PEM certificates.
pub fn pem_chain(concat: &[u8]) -> String {
    split_der(concat)
        .into_iter()
        .map(|c| pem_encode("CERTIFICATE", c))
        .collect()
}

/// Writes svid.N.pem, svid.N.key (0600) and bundle.N.pem for every SVID into `dir`, and
/// federated_bundle.N.pem (the CAs of every foreign bundle received, by trust domain) when
/// the workload federates, as SPIRE's `api fetch x509 -write` does.
pub fn write(dir: &Path, resp: &X509svidResponse) -> Result<(), CliError> {
    std::fs::create_dir_all(dir).map_err(|e| CliError::Io(format!("{}: {e}", dir.display())))?;
    let mut federated: Vec<_> = resp.federated_bundles.iter().collect();
    federated.sort_by(|a, b| a.0.cmp(b.0));
    let federated: String = federated.iter().map(|(_, der)| pem_chain(der)).collect();
    for (i, s) in resp.svids.iter().enumerate() {
        if !federated.is_empty() {
            files::write_mode(
                &dir.join(format!("federated_bundle.{i}.pem")),
                federated.as_bytes(),
                0o644,
            )?;
        }
        let key = pem_encode("PRIVATE KEY", &s.x509_svid_key);
        let file = |name: String| dir.join(name);
        files::write_mode(
            &file(format!("svid.{i}.pem")),
            pem_chain(&s.x509_svid).as_bytes(),
            0o644,
        )?;
        files::write_mode(&file(format!("svid.{i}.key")), key.as_bytes(), 0o600)?;
        files::write_mode(
            &file(format!("bundle.{i}.pem")),
            pem_chain(&s.bundle).as_bytes(),
            0o644,
        )?;
    }
    Ok(())
}

/// X509-SVIDs as printed (never the private key).
#[derive(Debug, Serialize)]
pub struct X509View<'a> {
    svids: Vec<SvidView<'a>>,
}

/// One X509-SVID as printed.
#[derive(Debug, Serialize)]
struct SvidView<'a> {
    spiffe_id: &'a str,
    hint: &'a str,
    expires_at: i64,
    x509_svid: String,
    bundle: String,
    /// How many CA certificates the bundle holds (text form only).
    #[serde(skip)]
    ca_certificates: usize,
}

impl<'a> From<&'a X509svidResponse> for X509View<'a> {
    fn from(resp: &'a X509svidResponse) -> Self {
        let svids = resp
            .svids
            .iter()
            .map(|s| {
                let leaf = split_der(&s.x509_svid)
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                SvidView {
                    spiffe_id: &s.spiffe_id,
                    hint: &s.hint,
                    expires_at: not_after(leaf).unwrap_or_default(),
                    x509_svid: pem_chain(&s.x509_svid),
                    bundle: pem_chain(&s.bundle),
                    ca_certificates: split_der(&s.bundle).len(),
                }
            })
            .collect();
        Self { svids }
    }
}

impl View for X509View<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        let n = self.svids.len();
        writeln!(w, "Received {n} svid{}", plural(n, "", "s"))?;
        for s in &self.svids {
            writeln!(w, "\nSPIFFE ID:       {}", s.spiffe_id)?;
            if !s.hint.is_empty() {
                writeln!(w, "Hint:            {}", s.hint)?;
            }
            writeln!(w, "Expires at:      {}", s.expires_at)?;
            writeln!(w, "CA certificates: {}", s.ca_certificates)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use continuity_proto::workload::X509svid;
    use serde_json::json;

    use super::super::output::{Output, rendered};
    use super::*;

    fn cert() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["x".into()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    // `.into()`: the Workload API's byte fields may be `Vec<u8>` or `bytes::Bytes`.
    #[allow(clippy::useless_conversion)]
    fn x509_output_is_what_it_always_was() {
        let (leaf, ca) = (cert(), cert());
        let resp = X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: "spiffe://example.org/web".into(),
                x509_svid: [leaf.clone(), ca.clone()].concat().into(),
                x509_svid_key: vec![1, 2, 3].into(),
                bundle: [ca.clone(), ca.clone()].concat().into(),
                hint: "h".into(),
            }],
            ..Default::default()
        };
        let expires = not_after(&leaf).unwrap();
        let before = json!({"svids": [{
            "spiffe_id": "spiffe://example.org/web", "hint": "h", "expires_at": expires,
            "x509_svid": pem_chain(&[leaf, ca.clone()].concat()),
            "bundle": pem_chain(&[ca.clone(), ca].concat()),
        }]});
        let view = X509View::from(&resp);
        assert_eq!(rendered(Output::Json, &view), format!("{before}\n"));
        assert_eq!(
            rendered(Output::Text, &view),
            format!(
                "Received 1 svid\n\nSPIFFE ID:       spiffe://example.org/web\nHint:            h\n\
                 Expires at:      {expires}\nCA certificates: 2\n"
            )
        );
        assert!(!rendered(Output::Json, &view).contains("PRIVATE KEY"));
    }

    #[test]
    fn split_der_stops_at_garbage() {
        let c = cert();
        let mut concat = [c.clone(), c.clone()].concat();
        concat.extend_from_slice(&[0x30, 0x85]);
        assert_eq!(split_der(&concat), vec![&c[..], &c[..]]);
        assert!(split_der(&[]).is_empty());
    }
}
