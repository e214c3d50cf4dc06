//! `federation create|list|show|update|delete|refresh`: relationships with other trust
//! domains, whose bundle endpoints the server fetches (SPIRE's `federation` commands).

use std::io::{self, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand};
use continuity_proto::admin::federation_admin_client::FederationAdminClient;
use continuity_proto::admin::{
    BundleDocumentFormat, FederationRelationship, GetFederationRelationshipRequest,
    ListFederationRelationshipsRequest,
};
use serde::Serialize;
use tonic::transport::Channel;

use super::bundle::BundleFormat;
use super::error::CliError;
use super::output::{Output, View, show};

/// Largest bundle file read (the server accepts at most 1 MiB).
const MAX_FILE: u64 = 1024 * 1024 + 1;

/// `federation` subcommands.
#[derive(Debug, Subcommand)]
pub enum FederationCommand {
    /// Create a relationship with another trust domain.
    Create(RelationshipArgs),
    /// Replace a relationship (every field).
    Update(RelationshipArgs),
    /// List the relationships.
    List,
    /// Show one relationship.
    Show {
        /// The trust domain (`spiffe://other.td`).
        #[arg(long)]
        trust_domain: String,
    },
    /// End a federation: delete the relationship and the bundle it manages.
    Delete {
        /// The trust domain (`spiffe://other.td`).
        #[arg(long, visible_alias = "trust-domain")]
        id: String,
    },
    /// Fetch the trust domain's bundle endpoint now.
    Refresh {
        /// The trust domain (`spiffe://other.td`).
        #[arg(long, visible_alias = "trust-domain")]
        id: String,
    },
}

/// The fields of a relationship.
#[derive(Debug, Args)]
pub struct RelationshipArgs {
    /// The trust domain (`spiffe://other.td`).
    #[arg(long)]
    trust_domain: String,
    /// `https://host[:port]/path` of its SPIFFE bundle endpoint.
    #[arg(long)]
    bundle_endpoint_url: String,
    /// https_spiffe (the endpoint's X509-SVID) or https_web (Web PKI).
    #[arg(long, value_parser = ["https_spiffe", "https_web"])]
    bundle_endpoint_profile: String,
    /// The endpoint's SPIFFE ID (https_spiffe).
    #[arg(long)]
    endpoint_spiffe_id: Option<String>,
    /// The trust domain's current bundle, to authenticate its endpoint the first time.
    #[arg(long)]
    trust_domain_bundle_path: Option<PathBuf>,
    /// pem or spiffe.
    #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
    trust_domain_bundle_format: BundleFormat,
}

/// A relationship as printed.
#[derive(Debug, Serialize)]
struct Summary {
    trust_domain: String,
    bundle_endpoint_url: String,
    bundle_endpoint_profile: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    endpoint_spiffe_id: String,
    bundle_sequence: Option<u64>,
}

impl Summary {
    fn of(r: &FederationRelationship) -> Self {
        Self {
            trust_domain: format!("spiffe://{}", r.trust_domain),
            bundle_endpoint_url: r.bundle_endpoint_url.clone(),
            bundle_endpoint_profile: r.bundle_endpoint_profile.clone(),
            endpoint_spiffe_id: r.endpoint_spiffe_id.clone(),
            bundle_sequence: r.bundle.as_ref().map(|b| b.sequence_number),
        }
    }
}

impl View for Summary {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        writeln!(w, "Trust domain      : {}", self.trust_domain)?;
        writeln!(w, "Bundle endpoint   : {}", self.bundle_endpoint_url)?;
        writeln!(w, "Profile           : {}", self.bundle_endpoint_profile)?;
        if !self.endpoint_spiffe_id.is_empty() {
            writeln!(w, "Endpoint SPIFFE ID: {}", self.endpoint_spiffe_id)?;
        }
        match self.bundle_sequence {
            Some(s) => writeln!(w, "Bundle sequence   : {s}"),
            None => writeln!(w, "Bundle sequence   : (no bundle yet)"),
        }
    }
}

/// `federation list` output.
#[derive(Debug, Serialize)]
struct List {
    relationships: Vec<Summary>,
}

impl View for List {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        if self.relationships.is_empty() {
            return writeln!(w, "No federation relationships.");
        }
        for (i, r) in self.relationships.iter().enumerate() {
            if i > 0 {
                writeln!(w)?;
            }
            r.text(w)?;
        }
        Ok(())
    }
}

/// `federation delete` output.
#[derive(Debug, Serialize)]
struct Deleted {
    trust_domain: String,
    federating_entries: Vec<String>,
}

impl View for Deleted {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        writeln!(
            w,
            "Federation with {} ended; its bundle is deleted.",
            self.trust_domain
        )?;
        if !self.federating_entries.is_empty() {
            writeln!(
                w,
                "Warning: entries still federate with it (agents drop its bundle at their next sync): {}",
                self.federating_entries.join(", ")
            )?;
        }
        Ok(())
    }
}

/// `federation refresh` output.
#[derive(Debug, Serialize)]
struct Refreshed {
    trust_domain: String,
    updated: bool,
    sequence: Option<u64>,
    next_refresh_in: i64,
}

impl View for Refreshed {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        let what = if self.updated { "updated" } else { "unchanged" };
        let seq = self.sequence.map_or("-".into(), |s| s.to_string());
        writeln!(
            w,
            "Bundle of {} {what} (sequence {seq}); next refresh in {}s.",
            self.trust_domain, self.next_refresh_in
        )
    }
}

/// Runs a `federation` command.
pub async fn run(ch: Channel, out: Output, cmd: FederationCommand) -> Result<(), CliError> {
    let mut c = FederationAdminClient::new(ch);
    match cmd {
        FederationCommand::Create(a) => {
            let r = c.create_federation_relationship(request(a)?).await;
            show(out, &Summary::of(&r.map_err(flag_error)?.into_inner()))
        }
        FederationCommand::Update(a) => {
            let r = c.update_federation_relationship(request(a)?).await;
            show(out, &Summary::of(&r.map_err(flag_error)?.into_inner()))
        }
        FederationCommand::List => {
            let r = c
                .list_federation_relationships(ListFederationRelationshipsRequest {})
                .await?
                .into_inner();
            let relationships = r.relationships.iter().map(Summary::of).collect();
            show(out, &List { relationships })
        }
        FederationCommand::Show { trust_domain } => {
            let r = c.get_federation_relationship(get(trust_domain)).await?;
            show(out, &Summary::of(&r.into_inner()))
        }
        FederationCommand::Delete { id } => {
            let r = c.delete_federation_relationship(get(id.clone())).await?;
            let federating_entries = r.into_inner().federating_entries;
            show(
                out,
                &Deleted {
                    trust_domain: id,
                    federating_entries,
                },
            )
        }
        FederationCommand::Refresh { id } => {
            let r = c
                .refresh_federation_relationship(get(id.clone()))
                .await?
                .into_inner();
            show(
                out,
                &Refreshed {
                    trust_domain: id,
                    updated: r.updated,
                    sequence: r.bundle.map(|b| b.sequence_number),
                    next_refresh_in: r.next_refresh_in,
                },
            )
        }
    }
}

fn get(trust_domain: String) -> GetFederationRelationshipRequest {
    GetFederationRelationshipRequest { trust_domain }
}

/// The request of `create`/`update`, with the bundle file read.
fn request(a: RelationshipArgs) -> Result<FederationRelationship, CliError> {
    let trust_domain_bundle = match &a.trust_domain_bundle_path {
        None => Vec::new(),
        Some(path) => {
            let bad = |e: io::Error| {
                CliError::Argument(format!(
                    "--trust-domain-bundle-path {}: {e}",
                    path.display()
                ))
            };
            let f = std::fs::File::open(path).map_err(bad)?;
            let mut buf = Vec::new();
            io::Read::read_to_end(&mut io::Read::take(f, MAX_FILE), &mut buf).map_err(bad)?;
            buf
        }
    };
    let format = match a.trust_domain_bundle_format {
        BundleFormat::Pem => BundleDocumentFormat::Pem,
        BundleFormat::Spiffe => BundleDocumentFormat::Spiffe,
    };
    Ok(FederationRelationship {
        trust_domain: a.trust_domain,
        bundle_endpoint_url: a.bundle_endpoint_url,
        bundle_endpoint_profile: a.bundle_endpoint_profile,
        endpoint_spiffe_id: a.endpoint_spiffe_id.unwrap_or_default(),
        trust_domain_bundle,
        trust_domain_bundle_format: format as i32,
        bundle: None,
    })
}

/// A refused create/update, with the server's field name spelled as the CLI flag.
fn flag_error(s: tonic::Status) -> CliError {
    let msg = s.message();
    let flag = msg
        .split_once(':')
        .map(|(field, _)| field)
        .filter(|f| f.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') && !f.is_empty());
    match flag {
        Some(field) if s.code() == tonic::Code::InvalidArgument => CliError::Argument(format!(
            "--{}{}",
            field.replace('_', "-"),
            &msg[field.len()..]
        )),
        _ => CliError::from(s),
    }
}
