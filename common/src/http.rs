//! A minimal HTTP/1.1 responder for `/live`, `/ready` and `/metrics`: GET only, one request
//! per connection, bounded reads. Enough for kubelet probes and Prometheus scrapes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A response: status code, content type, body.
pub type Reply = (u16, &'static str, String);

/// Serves `handler(path)` on `addr` until the task is dropped.
pub async fn serve<F, Fut>(addr: SocketAddr, handler: F) -> std::io::Result<()>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send,
{
    let listener = TcpListener::bind(addr).await?;
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while n < buf.len() {
                        let r = sock.read(&mut buf[n..]).await?;
                        if r == 0 {
                            break;
                        }
                        n += r;
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    Ok::<_, std::io::Error>(())
                })
                .await;
                if !matches!(read, Ok(Ok(()))) {
                    return;
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let mut parts = head.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
                let (code, ctype, body) = if method == "GET" || method == "HEAD" {
                    handler(path.to_string()).await
                } else {
                    (405, "text/plain", "method not allowed\n".into())
                };
                let reason = match code {
                    200 => "OK",
                    404 => "Not Found",
                    405 => "Method Not Allowed",
                    _ => "Service Unavailable",
                };
                let resp = format!(
                    "HTTP/1.1 {code} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                    body.len(),
                    if method == "HEAD" { "" } else { body.as_str() }
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(())
}
