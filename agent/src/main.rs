//! `continuity-agent`: not implemented yet; exits with an explanation.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    eprintln!("Error: continuity-agent is not implemented yet in this build");
    std::process::ExitCode::FAILURE
}
