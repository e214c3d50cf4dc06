//! `bundle set|list|show --id|delete`: the bundles of other trust domains (federation).

use std::io::{self, Write};
use std::path::Path;

use continuity_proto::admin::federated_bundle_admin_client::FederatedBundleAdminClient;
use continuity_proto::admin::{
    BundleDocumentFormat, DeleteFederatedBundleRequest, GetFederatedBundleRequest,
    ListFederatedBundlesRequest, SetFederatedBundleRequest,
};
use continuity_proto::types;
use serde::Serialize;
use tonic::transport::Channel;

use super::super::error::CliError;
use super::super::output::{Output, View, plural, say, show};
use super::BundleFormat;

/// Largest bundle file read (the server accepts at most 1 MiB; a little more is read so the
/// server names the problem).
const MAX_FILE: u64 = 1024 * 1024 + 1;

/// A foreign bundle as `list` and `set` print it.
#[derive(Debug, Serialize)]
struct Summary {
    trust_domain: String,
    x509_authorities: usize,
    jwt_authorities: usize,
    sequence: u64,
    refresh_hint: i64,
}

impl Summary {
    fn of(b: &types::Bundle) -> Self {
        Self {
            trust_domain: format!("spiffe://{}", b.trust_domain),
            x509_authorities: b.x509_authorities.len(),
            jwt_authorities: b.jwt_authorities.len(),
            sequence: b.sequence_number,
            refresh_hint: b.refresh_hint,
        }
    }
}

impl View for Summary {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        writeln!(
            w,
            "{}: {} {}, {} {}, sequence {}, refresh hint {}s",
            self.trust_domain,
            self.x509_authorities,
            plural(
                self.x509_authorities,
                "X.509 authority",
                "X.509 authorities"
            ),
            self.jwt_authorities,
            plural(self.jwt_authorities, "JWT key", "JWT keys"),
            self.sequence,
            self.refresh_hint
        )
    }
}

/// `bundle list` output.
#[derive(Debug, Serialize)]
struct List {
    bundles: Vec<Summary>,
}

impl View for List {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        if self.bundles.is_empty() {
            return writeln!(w, "No foreign bundles.");
        }
        for b in &self.bundles {
            b.text(w)?;
        }
        Ok(())
    }
}

/// Reads the bundle file, naming it in any error.
fn read_file(path: &Path) -> Result<Vec<u8>, CliError> {
    let bad = |e: io::Error| CliError::Argument(format!("--path {}: {e}", path.display()));
    let f = std::fs::File::open(path).map_err(bad)?;
    let mut buf = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(f, MAX_FILE), &mut buf).map_err(bad)?;
    Ok(buf)
}

/// `bundle set --id TD --path F [--format pem|spiffe]`.
pub async fn set(
    ch: Channel,
    out: Output,
    id: String,
    path: &Path,
    format: BundleFormat,
) -> Result<(), CliError> {
    let document = read_file(path)?;
    let format = match format {
        BundleFormat::Pem => BundleDocumentFormat::Pem,
        BundleFormat::Spiffe => BundleDocumentFormat::Spiffe,
    };
    let b = FederatedBundleAdminClient::new(ch)
        .set_federated_bundle(SetFederatedBundleRequest {
            trust_domain: id,
            document,
            format: format as i32,
        })
        .await
        .map_err(|s| {
            CliError::Argument(format!(
                "{}: {:?}: {}",
                path.display(),
                s.code(),
                s.message()
            ))
        })?
        .into_inner();
    show(out, &Summary::of(&b))
}

/// `bundle list`.
pub async fn list(ch: Channel, out: Output) -> Result<(), CliError> {
    let r = FederatedBundleAdminClient::new(ch)
        .list_federated_bundles(ListFederatedBundlesRequest {})
        .await?
        .into_inner();
    show(
        out,
        &List {
            bundles: r.bundles.iter().map(Summary::of).collect(),
        },
    )
}

/// The stored bundle of a foreign trust domain (`bundle show --id`).
pub async fn get(ch: Channel, id: String) -> Result<types::Bundle, CliError> {
    Ok(FederatedBundleAdminClient::new(ch)
        .get_federated_bundle(GetFederatedBundleRequest { trust_domain: id })
        .await?
        .into_inner())
}

/// `bundle delete --id TD`.
pub async fn delete(ch: Channel, id: String) -> Result<(), CliError> {
    FederatedBundleAdminClient::new(ch)
        .delete_federated_bundle(DeleteFederatedBundleRequest {
            trust_domain: id.clone(),
        })
        .await?;
    say(format!("Bundle of {id} deleted."))
}
