//! `continuity-server`: run the trust domain's authority, or administer a running one.
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use continuity_server::Config;
use continuity_server::cli::{self, Cli, CliError, Command};

fn main() -> ExitCode {
    // SPIRE's spellings (`-spiffeID`, `-socketPath`, ...) are accepted as aliases.
    use continuity_common::spire_flags::{COMMON, SERVER, translate};
    let cli = Cli::parse_from(translate(std::env::args_os(), &[COMMON, SERVER]));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
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
