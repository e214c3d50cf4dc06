//! `token`: join tokens.

use std::io::{self, Write};

use clap::Subcommand;
use continuity_proto::admin::GenerateTokenRequest;
use continuity_proto::admin::token_admin_client::TokenAdminClient;
use serde::Serialize;
use tonic::transport::Channel;

use super::error::CliError;
use super::output::{Output, View, show};
use super::parse;

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Generate a single-use join token.
    Generate {
        /// Node alias: entries parented to this ID reach the agent that uses the token.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Lifetime (seconds or "10m"); default 10m, at most 1h.
        #[arg(long)]
        ttl: Option<String>,
    },
}

/// Runs a `token` command.
pub async fn run(ch: Channel, out: Output, cmd: TokenCommand) -> Result<(), CliError> {
    let TokenCommand::Generate { spiffe_id, ttl } = cmd;
    let request = GenerateTokenRequest {
        spiffe_id: spiffe_id.unwrap_or_default(),
        ttl: parse::seconds("--ttl", ttl.as_deref())?,
    };
    let r = TokenAdminClient::new(ch)
        .generate_token(request)
        .await?
        .into_inner();
    show(
        out,
        &TokenView {
            token: &r.token,
            expires_at: r.expires_at,
        },
    )
}

/// A join token as printed.
#[derive(Debug, Serialize)]
struct TokenView<'a> {
    token: &'a str,
    expires_at: i64,
}

impl View for TokenView<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        writeln!(w, "Token: {}", self.token)
    }
}
