//! The agent's listeners: the Workload API (plus gRPC health and reflection) on `socket_path`.

pub mod authority;
pub mod engine;
pub mod peer;
pub mod workload;

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use continuity_proto::engine::engine_api_server::EngineApiServer;
use continuity_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;

use self::authority::AuthorityFix;
use self::peer::{ConnInfo, Peer};
use self::workload::{WorkloadHandler, check_security_header};

/// An accepted Workload API connection.
pub struct WorkloadConn {
    io: AuthorityFix<UnixStream>,
    info: ConnInfo,
}

impl Connected for WorkloadConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for WorkloadConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for WorkloadConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.get_ref().is_write_vectored()
    }
}

/// Binds the Workload API socket: opens (creating, 0755) its directory, refusing one another
/// user could have made or changed, replaces a stale socket, and lets every local user connect
/// (workloads are told apart by attestation).
pub async fn bind(path: &Path) -> io::Result<UnixListener> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "must name a socket file in a directory",
        ));
    };
    let dir = continuity_common::fsperm::secure_dir(dir, 0o755, "socket directory")
        .map_err(io::Error::other)?;
    if dir.socket_exists(name).map_err(io::Error::other)? {
        if UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use: another agent is running", path.display()),
            ));
        }
        dir.remove_socket(name).map_err(io::Error::other)?;
    }
    // `dir` was verified writable only by us (parents only by us or root), so binding by path
    // and setting the socket's mode by name inside it cannot be redirected.
    let listener = UnixListener::bind(path)?;
    dir.set_mode(name, 0o777).map_err(io::Error::other)?;
    Ok(listener)
}

/// Accepts connections, reading each peer's credentials at accept time.
pub fn incoming(
    listener: UnixListener,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<WorkloadConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "Workload API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            };
            let peer = match Peer::of(&stream) {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    tracing::info!(error = %e, "cannot read Workload API peer credentials");
                    None
                }
            };
            let workload_id: Arc<str> = peer
                .as_ref()
                .map_or_else(|| "unknown".into(), |p| p.workload_id().into());
            let info = ConnInfo {
                workload_id,
                peer,
                selectors: Arc::default(),
            };
            if tx
                .send(Ok(WorkloadConn {
                    io: AuthorityFix::new(stream),
                    info,
                }))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Serves the Workload API, the EngineAPI, health and reflection until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    handler: WorkloadHandler,
    engine: engine::EngineHandler,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("SpiffeWorkloadAPI", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(continuity_proto::FILE_DESCRIPTOR_SET)
        .build_v1();
    // The limits the authority adapter enforces are the ones advertised here.
    let mut router = tonic::transport::Server::builder()
        .max_frame_size(authority::MAX_FRAME_SIZE)
        .http2_max_header_list_size(authority::MAX_HEADER_LIST_SIZE)
        .add_service(health)
        .add_service(SpiffeWorkloadApiServer::with_interceptor(
            handler,
            check_security_header,
        ))
        .add_service(EngineApiServer::with_interceptor(
            engine,
            check_security_header,
        ));
    match reflection {
        Ok(r) => router = router.add_service(r),
        Err(e) => tracing::warn!(error = %e, "gRPC reflection unavailable"),
    }
    router
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await
}
