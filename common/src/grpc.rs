//! gRPC client plumbing shared by the CLIs and tests: channels over Unix sockets.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// Connects a gRPC channel to a Unix socket (`:authority` is `localhost`).
pub async fn uds_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
}

/// Connects a gRPC channel over TCP + TLS (the agent ↔ server link). The TLS config decides
/// who the server must be (see [`crate::tls::client_config`]).
pub async fn tls_channel(
    addr: String,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(config);
    let target = addr.clone();
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, target) = (connector.clone(), target.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&target).await?;
                let _ = tcp.set_nodelay(true);
                // The server is authenticated by SPIFFE ID, not by this name.
                let name = rustls_pki_types::ServerName::try_from("continuity-server")
                    .map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
}
