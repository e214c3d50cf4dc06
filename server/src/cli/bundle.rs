//! `bundle`: this trust domain's bundle (`show`), as PEM or as the SPIFFE bundle document,
//! printed the same with either `--output`; and the bundles of other trust domains
//! (`set`, `list`, `show --id`, `delete`; see [`super::foreign_bundle`]).

mod foreign;

use clap::{Subcommand, ValueEnum};
use continuity_common::jwk::{self, JwtAuthority};
use continuity_proto::admin::GetBundleRequest;
use continuity_proto::admin::bundle_admin_client::BundleAdminClient;
use continuity_proto::types;
use tonic::transport::Channel;

use super::error::CliError;
use super::output::{Output, raw, say};

/// `bundle` subcommands.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print the trust bundle (or, with --id, the stored bundle of another trust domain).
    Show {
        /// pem: CA certificates; spiffe: the SPIFFE bundle document (JWKS).
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        /// A foreign trust domain (`spiffe://other.td`).
        #[arg(long)]
        id: Option<String>,
    },
    /// Store (or replace) the bundle of another trust domain, read from a file.
    Set {
        /// The trust domain (`spiffe://other.td`).
        #[arg(long)]
        id: String,
        /// The bundle file.
        #[arg(long)]
        path: std::path::PathBuf,
        /// pem: CA certificates; spiffe: the SPIFFE bundle document (JWKS).
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// List the bundles of other trust domains.
    List,
    /// Delete the bundle of another trust domain (refused while entries federate with it).
    Delete {
        /// The trust domain (`spiffe://other.td`).
        #[arg(long)]
        id: String,
    },
}

/// Bundle formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// Concatenated PEM certificates.
    Pem,
    /// SPIFFE bundle JSON.
    Spiffe,
}

/// Runs a `bundle` command.
pub async fn run(ch: Channel, out: Output, cmd: BundleCommand) -> Result<(), CliError> {
    match cmd {
        BundleCommand::Show { format, id: None } => {
            let b = BundleAdminClient::new(ch)
                .get_bundle(GetBundleRequest {})
                .await?
                .into_inner();
            print_bundle(&b, format)
        }
        BundleCommand::Show {
            format,
            id: Some(id),
        } => print_bundle(&foreign::get(ch, id).await?, format),
        BundleCommand::Set { id, path, format } => foreign::set(ch, out, id, &path, format).await,
        BundleCommand::List => foreign::list(ch, out).await,
        BundleCommand::Delete { id } => foreign::delete(ch, id).await,
    }
}

/// Prints a bundle as PEM or as the SPIFFE bundle document.
fn print_bundle(b: &types::Bundle, format: BundleFormat) -> Result<(), CliError> {
    match format {
        BundleFormat::Pem => {
            let pem: String = b
                .x509_authorities
                .iter()
                .map(|c| continuity_common::x509::pem_encode("CERTIFICATE", c))
                .collect();
            raw(pem.as_bytes())
        }
        BundleFormat::Spiffe => {
            let jwt: Vec<_> = b
                .jwt_authorities
                .iter()
                .map(|k| JwtAuthority {
                    key_id: &k.key_id,
                    public_key: &k.public_key,
                })
                .collect();
            let doc =
                jwk::spiffe_bundle(&b.x509_authorities, &jwt, b.sequence_number, b.refresh_hint)
                    .map_err(|e| CliError::Argument(e.to_string()))?;
            say(serde_json::to_string_pretty(&doc)?)
        }
    }
}
