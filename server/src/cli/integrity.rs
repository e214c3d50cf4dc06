//! `integrity verify`: every record MAC of the datastore checked again by the running server.

use std::io::{self, Write};

use clap::Subcommand;
use continuity_proto::admin::VerifyIntegrityRequest;
use continuity_proto::admin::integrity_admin_client::IntegrityAdminClient;
use serde::Serialize;
use tonic::transport::Channel;

use super::error::CliError;
use super::output::{Output, View, show};

/// `integrity` subcommands.
#[derive(Debug, Subcommand)]
pub enum IntegrityCommand {
    /// Re-read every MACed table; list each row whose record MAC fails (exit 1 if any).
    Verify,
}

/// Runs an `integrity` command.
pub async fn run(ch: Channel, out: Output, cmd: IntegrityCommand) -> Result<(), CliError> {
    let mut c = IntegrityAdminClient::new(ch);
    match cmd {
        IntegrityCommand::Verify => {
            let r = c
                .verify_integrity(VerifyIntegrityRequest {})
                .await?
                .into_inner();
            let report = Report {
                intact: r.bad_rows.is_empty(),
                rows: r.rows,
                bad_rows: r
                    .bad_rows
                    .iter()
                    .map(|b| BadRowView {
                        table: &b.table,
                        key: &b.key,
                        reason: &b.reason,
                    })
                    .collect(),
            };
            show(out, &report)?;
            if report.intact {
                Ok(())
            } else {
                Err(CliError::Argument(format!(
                    "{} of {} datastore rows failed their integrity check (record MAC)",
                    report.bad_rows.len(),
                    report.rows
                )))
            }
        }
    }
}

/// A bad row as printed.
#[derive(Debug, Serialize)]
struct BadRowView<'a> {
    table: &'a str,
    key: &'a str,
    reason: &'a str,
}

/// What `integrity verify` prints.
#[derive(Debug, Serialize)]
struct Report<'a> {
    intact: bool,
    rows: u64,
    bad_rows: Vec<BadRowView<'a>>,
}

impl View for Report<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        if self.intact {
            return writeln!(w, "Integrity: all {} rows intact.", self.rows);
        }
        writeln!(
            w,
            "Integrity: {} of {} rows failed:",
            self.bad_rows.len(),
            self.rows
        )?;
        for b in &self.bad_rows {
            writeln!(w, "  {} {}: {}", b.table, b.key, b.reason)?;
        }
        Ok(())
    }
}
