//! The admin socket's accept loop: a connection cap, and back-off instead of spinning when the
//! process is out of file descriptors. (Only the server's own uid or root can reach the
//! socket; the cap bounds a runaway script, not an outsider.)

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

/// Admin connections open at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// HTTP/2 streams open at once on one admin connection.
pub const MAX_ADMIN_STREAMS: u32 = 32;
/// Time an admin call has to produce its response.
pub const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest admin request decoded (an entry, a federated bundle, a secret).
pub const MAX_ADMIN_REQUEST: usize = 4 * 1024 * 1024;

/// An accepted admin connection; holds its place under the cap until dropped.
pub struct AdminConn {
    io: UnixStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for AdminConn {
    type ConnectInfo = <UnixStream as Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for AdminConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdminConn {
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
}

/// Accepts admin connections, at most `max` open at once (more are closed at once, logged
/// at most every 10 s); backs off when accept fails.
pub fn incoming(
    listener: UnixListener,
    max: usize,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<AdminConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(max.max(1)));
    tokio::spawn(async move {
        let mut backoff = continuity_common::http::AcceptBackoff::default();
        let mut last_log = None::<Instant>;
        loop {
            let io = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    let open = max.saturating_sub(slots.available_permits());
                    tokio::time::sleep(backoff.failed("admin socket", &e, open)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(
                        max,
                        "admin connection refused: too many admin connections open"
                    );
                    last_log = Some(Instant::now());
                }
                continue;
            };
            if tx
                .send(Ok(AdminConn {
                    io,
                    _permit: permit,
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
