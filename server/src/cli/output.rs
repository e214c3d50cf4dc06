//! Rendering: every command prints a serde view through the shared CLI output module (JSON for
//! `--output json`, else its text form; a closed pipe is an error, not a panic), with this
//! binary's error type.

use std::fmt;

use continuity_common::output;
pub use continuity_common::output::{Output, View, plural};

use super::error::CliError;

/// What a `count` command prints: `{"count": N}`, or "N registration entries".
#[derive(Debug, serde::Serialize)]
pub struct Count {
    count: usize,
    #[serde(skip)]
    noun: &'static str,
    #[serde(skip)]
    endings: (&'static str, &'static str),
}

impl Count {
    /// `count` things called `noun` + one of `endings` (singular, plural).
    pub fn new(count: usize, noun: &'static str, endings: (&'static str, &'static str)) -> Self {
        Self {
            count,
            noun,
            endings,
        }
    }
}

impl View for Count {
    fn text(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        let (one, many) = self.endings;
        writeln!(
            w,
            "{} {}{}",
            self.count,
            self.noun,
            plural(self.count, one, many)
        )
    }
}

/// Prints `view` on stdout in the chosen format.
pub fn show(out: Output, view: &impl View) -> Result<(), CliError> {
    Ok(output::show(out, view)?)
}

/// Prints one line on stdout, whatever the output format.
pub fn say(line: impl fmt::Display) -> Result<(), CliError> {
    Ok(output::say(line)?)
}

/// Writes raw bytes on stdout, whatever the output format.
pub fn raw(bytes: &[u8]) -> Result<(), CliError> {
    Ok(output::raw(bytes)?)
}

/// `view` as `show` would print it, for tests.
#[cfg(test)]
pub use continuity_common::output::rendered;
