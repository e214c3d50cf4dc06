//! What a client command can fail with.

/// CLI failures.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The socket could not be reached.
    #[error("cannot reach the Workload API at {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The agent refused.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(Box<tonic::Status>),
    /// Reading or writing files failed.
    #[error("{0}")]
    Io(String),
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
