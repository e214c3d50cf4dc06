//! CLI rendering shared by both binaries: every command prints a serde view, as JSON for
//! `--output json` or as its text form, through a locked stdout whose write errors (a closed
//! pipe) are returned, not panicked on.

use std::fmt;
use std::io::{self, Write};

use clap::ValueEnum;
use serde::Serialize;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable (`pretty`, SPIRE's name for it, is accepted too).
    #[value(alias = "pretty")]
    Text,
    /// JSON.
    Json,
}

/// What a command prints: serialized for `--output json`, written by [`View::text`] otherwise.
pub trait View: Serialize {
    /// Writes the human-readable form.
    fn text(&self, w: &mut dyn Write) -> io::Result<()>;
}

/// Why printing failed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// A view could not be turned into JSON.
    #[error("cannot render the output as JSON: {0}")]
    Render(#[from] serde_json::Error),
    /// Writing to stdout failed (a closed pipe is [`OutputError::is_broken_pipe`]).
    #[error("cannot write to stdout: {0}")]
    Stdout(io::Error),
}

impl OutputError {
    /// The reader of stdout went away (`… | head`): the conventional answer is a quiet exit.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Stdout(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// Prints `view` on stdout in the chosen format.
pub fn show(out: Output, view: &impl View) -> Result<(), OutputError> {
    match out {
        Output::Json => {
            let value = json(view)?;
            stdout(|w| writeln!(w, "{value}"))
        }
        Output::Text => stdout(|w| view.text(w)),
    }
}

/// The JSON form of `view`. Through a `Value`, so keys come out sorted, as they always have.
pub fn json(view: &impl Serialize) -> Result<serde_json::Value, OutputError> {
    Ok(serde_json::to_value(view)?)
}

/// Prints one line on stdout, whatever the output format.
pub fn say(line: impl fmt::Display) -> Result<(), OutputError> {
    stdout(|w| writeln!(w, "{line}"))
}

/// Writes raw bytes on stdout, whatever the output format.
pub fn raw(bytes: &[u8]) -> Result<(), OutputError> {
    stdout(|w| w.write_all(bytes))
}

fn stdout(write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<(), OutputError> {
    let mut w = io::stdout().lock();
    write(&mut w)
        .and_then(|()| w.flush())
        .map_err(OutputError::Stdout)
}

/// The ending for `n` things: `one` when `n` is 1, else `many` ("entr" + "y" / "ies").
pub fn plural(n: usize, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

/// `view` as [`show`] would print it (for tests of the views).
pub fn rendered(out: Output, view: &impl View) -> String {
    let mut w = Vec::new();
    let written = match out {
        Output::Json => json(view)
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|v| writeln!(w, "{v}")),
        Output::Text => view.text(&mut w),
    };
    match written {
        Ok(()) => String::from_utf8_lossy(&w).into_owned(),
        Err(e) => format!("<not rendered: {e}>"),
    }
}
