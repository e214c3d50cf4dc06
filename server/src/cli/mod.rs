//! The `continuity-server` command line: `run`, `healthcheck`, and the admin commands that talk
//! to a running server over its admin socket.
//!
//! One module per command group; each prints through a serde view ([`output::View`]) used for
//! both `--output json` and the text form, and returns write errors instead of panicking, so
//! `continuity-server entry show | head -1` exits quietly ([`CliError::is_broken_pipe`]).

mod agent;
mod audit;
mod authority;
mod backup;
mod bundle;
mod engine;
mod entry;
mod error;
mod federation;
mod integrity;
mod key;
mod key_import;
mod output;
mod parse;
mod token;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tonic::transport::Channel;

pub use self::agent::AgentCommand;
pub use self::audit::AuditCommand;
pub use self::authority::{AuthorityCommand, AuthorityStep};
pub use self::backup::BackupCommand;
pub use self::bundle::{BundleCommand, BundleFormat};
pub use self::engine::{EngineCommand, SecretCommand};
pub use self::entry::{CreateArgs, EntryCommand, EntryFields, EntryFilter};
pub use self::error::CliError;
pub use self::federation::{FederationCommand, RelationshipArgs};
pub use self::integrity::IntegrityCommand;
pub use self::key::{KeyCommand, VersionArgs};
pub use self::output::Output;
pub use self::token::TokenCommand;
use crate::config::DEFAULT_ADMIN_SOCKET;

/// The Continuity server: the trust domain's authority.
#[derive(Debug, Parser)]
#[command(name = "continuity-server", version, about)]
pub struct Cli {
    /// Admin socket of the running server.
    #[arg(long, global = true, default_value = DEFAULT_ADMIN_SOCKET)]
    pub socket: PathBuf,
    /// Output format of show/list commands.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Run {
        /// Path to server.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check that a running server answers on its admin socket.
    Healthcheck,
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// The trust bundle.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Federation relationships with other trust domains (their bundle endpoints).
    #[command(subcommand)]
    Federation(FederationCommand),
    /// Attested agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Engines: persistent identities of logical services and their keys.
    #[command(subcommand)]
    Engine(EngineCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Integrity at rest: the record MACs of the datastore.
    #[command(subcommand)]
    Integrity(IntegrityCommand),
    /// Forced rotation of the trust domain's X.509 and JWT authorities.
    #[command(subcommand)]
    Authority(AuthorityCommand),
    /// Backups: create one from the running server, restore one into an empty data_dir.
    #[command(subcommand)]
    Backup(BackupCommand),
}

/// Runs an admin command (everything but `run`).
pub async fn admin(cli: Cli) -> Result<(), CliError> {
    // Offline: the server must not be running, so there is no socket to reach.
    if let Command::Backup(BackupCommand::Restore {
        file,
        config,
        passphrase_file,
    }) = &cli.command
    {
        return backup::restore(file, config, passphrase_file.as_deref()).await;
    }
    let ch = channel(&cli).await?;
    let out = cli.output;
    match cli.command {
        Command::Run { .. } => Err(CliError::Argument(
            "`run` starts a server; it is not an admin command".into(),
        )),
        Command::Healthcheck => healthcheck(ch).await,
        Command::Token(cmd) => token::run(ch, out, cmd).await,
        Command::Entry(cmd) => entry::run(ch, out, cmd).await,
        Command::Bundle(cmd) => bundle::run(ch, out, cmd).await,
        Command::Federation(cmd) => federation::run(ch, out, cmd).await,
        Command::Agent(cmd) => agent::run(ch, out, cmd).await,
        Command::Engine(cmd) => engine::run(ch, out, cmd).await,
        Command::Audit(cmd) => audit::run(ch, out, cmd).await,
        Command::Integrity(cmd) => integrity::run(ch, out, cmd).await,
        Command::Authority(cmd) => authority::run(ch, out, cmd).await,
        Command::Backup(BackupCommand::Create {
            file,
            passphrase_file,
        }) => backup::create(ch, &file, passphrase_file.as_deref()).await,
        Command::Backup(BackupCommand::Restore { .. }) => Ok(()),
    }
}

async fn channel(cli: &Cli) -> Result<Channel, CliError> {
    continuity_common::grpc::uds_channel(&cli.socket)
        .await
        .map_err(|source| CliError::Connect {
            socket: cli.socket.clone(),
            source,
        })
}

async fn healthcheck(ch: Channel) -> Result<(), CliError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let r = HealthClient::new(ch).check(request).await?.into_inner();
    if r.status != ServingStatus::Serving as i32 {
        return Err(tonic::Status::unavailable("server is not serving").into());
    }
    output::say("Server is healthy.")
}
