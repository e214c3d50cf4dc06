//! `bundle`: the trust bundle, as PEM or as the SPIFFE bundle document. Printed the same with
//! either `--output`.

use clap::{Subcommand, ValueEnum};
use continuity_common::jwk::{self, JwtAuthority};
use continuity_proto::admin::GetBundleRequest;
use continuity_proto::admin::bundle_admin_client::BundleAdminClient;
use tonic::transport::Channel;

use super::error::CliError;
use super::output::{raw, say};

/// `bundle` subcommands.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print the trust bundle.
    Show {
        /// pem: CA certificates; spiffe: the SPIFFE bundle document (JWKS).
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
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
pub async fn run(ch: Channel, cmd: BundleCommand) -> Result<(), CliError> {
    let BundleCommand::Show { format } = cmd;
    let b = BundleAdminClient::new(ch)
        .get_bundle(GetBundleRequest {})
        .await?
        .into_inner();
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
