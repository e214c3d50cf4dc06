//! `continuity-server`: run the trust domain's authority, or administer a running one.
#![forbid(unsafe_code)]

use clap::Parser;
use continuity_server::Config;
use continuity_server::cli::{self, Cli, Command};

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
            Command::Run { config } => {
                let cfg = Config::load(config)?;
                continuity_common::logging::init(&cfg.log_level, cfg.log_format);
                continuity_server::run(cfg).await?;
                Ok(())
            }
            _ => Ok(cli::admin(cli).await?),
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
