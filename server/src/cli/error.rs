//! What an admin command can fail with.

use std::path::PathBuf;

/// CLI failures.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server is not reachable on its socket.
    #[error("cannot reach the server on {socket}: {source} (is it running? is --socket right?)")]
    Connect {
        /// The socket tried.
        socket: PathBuf,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The server refused the request.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(Box<tonic::Status>),
    /// An argument was malformed.
    #[error("{0}")]
    Argument(String),
    /// A view could not be turned into JSON.
    #[error("cannot render the output as JSON: {0}")]
    Render(#[from] serde_json::Error),
    /// Printing the result failed (a closed pipe is [`CliError::is_broken_pipe`]).
    #[error(transparent)]
    Output(#[from] continuity_common::output::OutputError),
}

impl CliError {
    /// The reader of stdout went away (`… | head`): the conventional answer is a quiet exit.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Output(e) if e.is_broken_pipe())
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        Self::Status(Box::new(s))
    }
}
