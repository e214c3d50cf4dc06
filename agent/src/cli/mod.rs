//! The `continuity-agent` command line: `run`, `healthcheck`, and `api` commands that talk to
//! the Workload API like any SPIFFE client would, and `engine` commands on the EngineAPI.
//!
//! One module per command group; each prints through a serde view ([`output::View`]) used for
//! both `--output json` and the text form, and returns write errors instead of panicking, so
//! `continuity-agent api fetch x509 | head -1` exits quietly ([`CliError::is_broken_pipe`]).

mod api;
mod connect;
mod engine;
mod envelope;
mod error;
mod files;
mod output;
mod verify_chain;
mod x509;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use self::api::{ApiCommand, FetchCommand, ValidateCommand};
pub use self::connect::socket_path;
pub use self::engine::{CryptArgs, EngineArgs, EngineCommand};
pub use self::error::CliError;
pub use self::output::Output;

/// The Continuity node agent.
#[derive(Debug, Parser)]
#[command(name = "continuity-agent", version, about)]
pub struct Cli {
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Workload API socket of client commands (default: $SPIFFE_ENDPOINT_SOCKET, then the
    /// default path).
    #[arg(long, global = true)]
    pub socket_path: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent.
    Run {
        /// Path to agent.toml.
        #[arg(long)]
        config: PathBuf,
        /// Join token for the first attestation (overrides join_token in the config).
        #[arg(long)]
        join_token: Option<String>,
    },
    /// Check that the agent answers on its Workload API socket.
    Healthcheck,
    /// Talk to the Workload API.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Use the caller's Engine keys through the EngineAPI.
    Engine(EngineArgs),
}

/// Runs a client command (everything but `run`).
pub async fn client_command(cli: Cli) -> Result<(), CliError> {
    let (out, socket) = (cli.output, cli.socket_path);
    match cli.command {
        Command::Run { .. } => Err(CliError::Io(
            "`run` starts the agent; it is not a client command".into(),
        )),
        Command::Healthcheck => healthcheck(socket).await,
        Command::Api(cmd) => api::run(socket, out, cmd).await,
        Command::Engine(args) => engine::run(socket, out, args).await,
    }
}

async fn healthcheck(socket: Option<String>) -> Result<(), CliError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let ch = connect::channel(socket).await?;
    let r = HealthClient::new(ch).check(request).await?.into_inner();
    if r.status != ServingStatus::Serving as i32 {
        return Err(tonic::Status::unavailable("agent is not serving").into());
    }
    output::say("Agent is healthy.")
}
