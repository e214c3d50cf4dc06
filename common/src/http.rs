//! A minimal HTTP/1.1 responder for `/live`, `/ready` and `/metrics`: GET only, one request
//! per connection, bounded reads. Enough for kubelet probes and Prometheus scrapes.
//!
//! Slow or hostile clients cannot take it down: at most [`HttpLimits::max_connections`] are
//! open; a connection must send its whole request head (at most [`HttpLimits::max_head`]
//! bytes) within [`HttpLimits::head_timeout`] and take its response within
//! [`HttpLimits::write_timeout`]. At the cap the oldest connection still sending its head is
//! closed to make room (a real probe sends its head at once, so a slowloris flood never locks
//! it out); only when every connection is past its head is the new one refused. When accept
//! fails (out of file descriptors: EMFILE/ENFILE) the loop backs off instead of spinning,
//! closes the oldest connection still reading to free a descriptor, and logs once per burst
//! ([`AcceptBackoff`], also used by the server's gRPC accept loops).
//!
//! [`serve_tls_with`] serves the same over TLS (the SPIFFE bundle endpoint): the handshake
//! must finish within the head timeout.
//!
//! Invariant: `Inner::open` equals the number of live, unevicted [`Slot`]s, never more than
//! `max_connections`; `Inner::reading` holds exactly the live slots still reading their head.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// A response: status code, content type, body.
pub type Reply = (u16, &'static str, String);

/// Bounds on what clients of one listener can make it hold.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time a connection has to send its whole request head.
    pub head_timeout: Duration,
    /// Time a connection has to take its response.
    pub write_timeout: Duration,
    /// Largest request head read (bytes); a longer one is answered 431.
    pub max_head: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            head_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            max_head: 4096,
        }
    }
}

/// True when an accept failed because the process or system is out of file descriptors.
pub fn out_of_fds(e: &std::io::Error) -> bool {
    e.raw_os_error().is_some_and(|n| {
        n == rustix::io::Errno::MFILE.raw_os_error() || n == rustix::io::Errno::NFILE.raw_os_error()
    })
}

/// Back-off for a failing accept loop: a pause (longer when out of descriptors, so the loop
/// never spins on a listener that stays readable) and a warning at most every 10 s, with the
/// number of failures since the last one: one line per burst, not one per attempt.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    last_log: Option<Instant>,
    unlogged: u64,
}

impl AcceptBackoff {
    /// Records a failed accept on the listener `what` (with `open` connections); returns how
    /// long to pause before accepting again.
    pub fn failed(&mut self, what: &str, e: &std::io::Error, open: usize) -> Duration {
        self.unlogged += 1;
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(
                listener = what,
                error = %e,
                open,
                failures = self.unlogged,
                "accept failed; backing off"
            );
            self.last_log = Some(Instant::now());
            self.unlogged = 0;
        }
        Duration::from_millis(if out_of_fds(e) { 100 } else { 20 })
    }
}

/// Serves `handler(path)` on `addr` with the default [`HttpLimits`] until the task is dropped.
pub async fn serve<F, Fut>(addr: SocketAddr, handler: F) -> std::io::Result<()>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send,
{
    serve_with(addr, HttpLimits::default(), handler).await
}

/// Serves `handler(path)` on `addr` under `limits` until the task is dropped.
pub async fn serve_with<F, Fut>(
    addr: SocketAddr,
    limits: HttpLimits,
    handler: F,
) -> std::io::Result<()>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send,
{
    serve_inner(addr, limits, None, handler).await
}

/// Serves `handler(path)` over TLS (`acceptor`) on `addr` under `limits` until the task is
/// dropped; the TLS handshake counts against the head timeout.
pub async fn serve_tls_with<F, Fut>(
    addr: SocketAddr,
    limits: HttpLimits,
    acceptor: tokio_rustls::TlsAcceptor,
    handler: F,
) -> std::io::Result<()>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send,
{
    serve_inner(addr, limits, Some(acceptor), handler).await
}

async fn serve_inner<F, Fut>(
    addr: SocketAddr,
    limits: HttpLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: F,
) -> std::io::Result<()>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send,
{
    let listener = TcpListener::bind(addr).await?;
    let handler = Arc::new(handler);
    let conns = Arc::new(Conns {
        max: limits.max_connections.max(1),
        inner: Mutex::default(),
    });
    tokio::spawn(async move {
        let mut backoff = AcceptBackoff::default();
        let what = format!("HTTP {addr}");
        loop {
            let sock = match listener.accept().await {
                Ok((sock, _)) => sock,
                Err(e) => {
                    if out_of_fds(&e) {
                        conns.evict_oldest_reading();
                    }
                    tokio::time::sleep(backoff.failed(&what, &e, conns.open())).await;
                    continue;
                }
            };
            let Some(slot) = conns.admit() else {
                // Every connection is past its head: refuse this one (dropped, so closed).
                continue;
            };
            let (handler, tls) = (handler.clone(), tls.clone());
            tokio::spawn(async move {
                let close = slot.shared.close.clone();
                let serve = async {
                    match tls {
                        None => serve_one(sock, &slot, limits, handler.as_ref()).await,
                        Some(acceptor) => {
                            let accepted =
                                tokio::time::timeout(limits.head_timeout, acceptor.accept(sock));
                            if let Ok(Ok(s)) = accepted.await {
                                serve_one(s, &slot, limits, handler.as_ref()).await;
                            }
                        }
                    }
                };
                tokio::select! {
                    () = close.notified() => {}
                    () = serve => {}
                }
            });
        }
    });
    Ok(())
}

/// Reads one request head, answers it, closes.
async fn serve_one<S, F, Fut>(mut sock: S, slot: &Slot, limits: HttpLimits, handler: &F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    F: Fn(String) -> Fut,
    Fut: Future<Output = Reply>,
{
    let mut buf = vec![0u8; limits.max_head.max(64)];
    let mut n = 0;
    let read = tokio::time::timeout(limits.head_timeout, async {
        while n < buf.len() {
            let r = sock.read(&mut buf[n..]).await?;
            if r == 0 {
                return Ok(false);
            }
            n += r;
            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
        }
        Ok::<_, std::io::Error>(false)
    })
    .await;
    let complete = match read {
        Ok(Ok(c)) => c,
        _ => return,
    };
    slot.conns.done_reading(&slot.shared);
    let (code, ctype, body, head_only) = if !complete && n >= buf.len() {
        (431, "text/plain", "request head too large\n".into(), false)
    } else if !complete {
        return;
    } else {
        let head = String::from_utf8_lossy(&buf[..n]);
        let mut parts = head.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        if method == "GET" || method == "HEAD" {
            let (c, t, b) = handler(path.to_string()).await;
            (c, t, b, method == "HEAD")
        } else {
            (405, "text/plain", "method not allowed\n".into(), false)
        }
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        body.len(),
        if head_only { "" } else { body.as_str() }
    );
    let _ = tokio::time::timeout(limits.write_timeout, async {
        let _ = sock.write_all(resp.as_bytes()).await;
        let _ = sock.shutdown().await;
    })
    .await;
}

/// The open connections of one listener.
#[derive(Debug)]
struct Conns {
    max: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    open: usize,
    /// Connections still reading their request head, oldest first.
    reading: BTreeMap<u64, Arc<Shared>>,
}

/// What a connection's task and the listener share.
#[derive(Debug)]
struct Shared {
    id: u64,
    /// Set once the slot no longer counts (evicted or dropped).
    released: AtomicBool,
    /// Notified to close the connection.
    close: Arc<Notify>,
}

/// One connection's place under the cap; given back on drop.
#[derive(Debug)]
struct Slot {
    conns: Arc<Conns>,
    shared: Arc<Shared>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.conns.lock();
        inner.reading.remove(&self.shared.id);
        if !self.shared.released.swap(true, Ordering::AcqRel) {
            inner.open = inner.open.saturating_sub(1);
        }
    }
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self) -> usize {
        self.lock().open
    }

    /// A slot for a new connection, closing the oldest one still reading its head at the cap;
    /// None when every open connection is past its head.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut inner = self.lock();
        if inner.open >= self.max && !Self::evict(&mut inner) {
            return None;
        }
        inner.open += 1;
        inner.next_id += 1;
        let shared = Arc::new(Shared {
            id: inner.next_id,
            released: AtomicBool::new(false),
            close: Arc::new(Notify::new()),
        });
        inner.reading.insert(shared.id, shared.clone());
        Some(Slot {
            conns: self.clone(),
            shared,
        })
    }

    /// Closes the oldest connection still reading its head (frees a descriptor).
    fn evict_oldest_reading(&self) {
        Self::evict(&mut self.lock());
    }

    fn evict(inner: &mut Inner) -> bool {
        let Some((_, victim)) = inner.reading.pop_first() else {
            return false;
        };
        if !victim.released.swap(true, Ordering::AcqRel) {
            inner.open = inner.open.saturating_sub(1);
        }
        victim.close.notify_one();
        true
    }

    fn done_reading(&self, s: &Shared) {
        self.lock().reading.remove(&s.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_evicts_readers_then_refuses() {
        let c = Arc::new(Conns {
            max: 2,
            inner: Mutex::default(),
        });
        let a = c.admit().unwrap();
        let b = c.admit().unwrap();
        // At the cap: the oldest reader (a) makes room.
        let d = c.admit().unwrap();
        assert!(a.shared.released.load(Ordering::Acquire));
        assert_eq!(c.open(), 2);
        drop(a);
        assert_eq!(c.open(), 2);
        // Both past their head: refused.
        c.done_reading(&b.shared);
        c.done_reading(&d.shared);
        assert!(c.admit().is_none());
        drop(b);
        assert_eq!(c.open(), 1);
        assert!(c.admit().is_some());
    }
}
