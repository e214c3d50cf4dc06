//! `continuity-agent`: run the node agent, or talk to a running one through the Workload API.
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use continuity_agent::Config;
use continuity_agent::cli::{self, Cli, CliError, Command};

fn main() -> ExitCode {
    // SPIRE's spellings (`-spiffeID`, `-socketPath`, ...) are accepted as aliases.
    use continuity_common::spire_flags::{AGENT, COMMON, translate};
    let cli = Cli::parse_from(translate(std::env::args_os(), &[COMMON, AGENT]));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    let result: anyhow::Result<()> = rt.block_on(async {
        match &cli.command {
            Command::Run { .. } if cli.socket_path.is_some() => Err(anyhow::anyhow!(
                "--socket-path is for client commands; the agent serves socket_path from agent.toml"
            )),
            Command::Run { config, join_token } => {
                let cfg = Config::load(config)?;
                continuity_common::logging::init(&cfg.log_level, cfg.log_format);
                continuity_agent::run(cfg, join_token.clone()).await?;
                Ok(())
            }
            _ => Ok(cli::client_command(cli).await?),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout left (`… | head`): nothing more to say, like any Unix filter.
        Err(e)
            if e.downcast_ref::<CliError>()
                .is_some_and(CliError::is_broken_pipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("{e:#}")),
    }
}

/// Reports `message` on stderr (ignoring a closed stderr) and fails.
fn fail(message: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "Error: {message}");
    ExitCode::FAILURE
}
