//! Rendering: every command prints a serde view, as JSON for `--output json` or as its text
//! form, through a locked stdout whose write errors (a closed pipe) are returned, not panicked on.

use std::fmt;
use std::io::{self, Write};

use clap::ValueEnum;
use serde::Serialize;

use super::error::CliError;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable.
    Text,
    /// JSON.
    Json,
}

/// What a command prints: serialized for `--output json`, written by [`View::text`] otherwise.
pub trait View: Serialize {
    /// Writes the human-readable form.
    fn text(&self, w: &mut dyn Write) -> io::Result<()>;
}

/// Prints `view` on stdout in the chosen format.
pub fn show(out: Output, view: &impl View) -> Result<(), CliError> {
    match out {
        Output::Json => {
            let value = json(view)?;
            stdout(|w| writeln!(w, "{value}"))
        }
        Output::Text => stdout(|w| view.text(w)),
    }
}

/// The JSON form of `view`. Through a `Value`, so keys come out sorted, as they always have.
pub fn json(view: &impl Serialize) -> Result<serde_json::Value, CliError> {
    Ok(serde_json::to_value(view)?)
}

/// Prints one line on stdout, whatever the output format.
pub fn say(line: impl fmt::Display) -> Result<(), CliError> {
    stdout(|w| writeln!(w, "{line}"))
}

/// Writes raw bytes on stdout, whatever the output format.
pub fn raw(bytes: &[u8]) -> Result<(), CliError> {
    stdout(|w| w.write_all(bytes))
}

fn stdout(write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<(), CliError> {
    let mut w = io::stdout().lock();
    write(&mut w)
        .and_then(|()| w.flush())
        .map_err(CliError::Stdout)
}

/// The ending for `n` things: `one` when `n` is 1, else `many` ("entr" + "y" / "ies").
pub fn plural(n: usize, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

/// `view` as `show` would print it, for tests.
#[cfg(test)]
pub fn rendered(out: Output, view: &impl View) -> String {
    let mut w = Vec::new();
    match out {
        Output::Json => writeln!(w, "{}", json(view).expect("views serialize")),
        Output::Text => view.text(&mut w),
    }
    .expect("writing to a Vec");
    String::from_utf8(w).expect("views are UTF-8")
}
