//! `continuity-agent`: run the node agent, or talk to a running one through the Workload API.
#![forbid(unsafe_code)]

use clap::Parser;
use continuity_agent::Config;
use continuity_agent::cli::{self, Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = rt.block_on(async {
        match &cli.command {
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
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
