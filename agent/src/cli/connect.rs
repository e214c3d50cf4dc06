//! Reaching the agent: which socket, the channel, and the header every Workload API call carries.

use std::path::Path;

use tonic::transport::Channel;

use super::error::CliError;
use crate::config::DEFAULT_SOCKET_PATH;
use crate::endpoints::workload::SECURITY_HEADER;

/// The socket to use: the flag, else `SPIFFE_ENDPOINT_SOCKET` (`unix:` URI or path), else the default.
pub fn socket_path(flag: Option<String>) -> String {
    let raw = flag
        .or_else(|| {
            std::env::var("SPIFFE_ENDPOINT_SOCKET")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_SOCKET_PATH.to_string());
    raw.strip_prefix("unix://")
        .or_else(|| raw.strip_prefix("unix:"))
        .unwrap_or(&raw)
        .to_string()
}

/// A channel to the agent's socket (see [`socket_path`]).
pub async fn channel(flag: Option<String>) -> Result<Channel, CliError> {
    let path = socket_path(flag);
    continuity_common::grpc::uds_channel(Path::new(&path))
        .await
        .map_err(|source| CliError::Connect { path, source })
}

/// A request carrying the Workload API's security header.
pub fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}
