//! TLS 1.3 for the agent API: an accept loop that hands tonic authenticated streams (with the
//! peer's certificates attached to every request) under connection caps (total and per peer
//! IP) and a handshake deadline, and a server identity that follows CA rotation.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::metrics::Metrics;

mod identity;

pub use identity::{ServerIdentity, TlsError};

/// The certificate chain a client presented (empty before attestation).
#[derive(Debug, Clone, Default)]
pub struct PeerCerts(pub Arc<Vec<CertificateDer<'static>>>);

/// An accepted TLS connection; holds its place under the connection caps until dropped. A
/// connection without a client certificate (only AttestAgent is served on it) also has a
/// deadline after which every read and write fails, so the connection closes.
pub struct TlsConn(
    TlsStream<TcpStream>,
    PeerCerts,
    #[expect(
        dead_code,
        reason = "held only to give the slot back when the connection drops"
    )]
    ConnSlot,
    Option<Pin<Box<tokio::time::Sleep>>>,
);

impl TlsConn {
    /// Fails with TimedOut once an anonymous connection's lifetime is over (and registers the
    /// waker, so an idle connection is woken and closed at its deadline).
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let deadline = self.3.as_mut()?;
        deadline.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "connection without a client certificate outlived its lifetime",
            )
        })
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerCerts;
    fn connect_info(&self) -> PeerCerts {
        self.1.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// What the accept loop holds connections to (from `[agent_api]`).
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Open connections in total, handshaking ones included.
    pub max_connections: usize,
    /// Open connections per peer IP address.
    pub max_per_ip: usize,
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// TCP keepalive idle time (probes then every 10 s, 3 of them).
    pub tcp_keepalive: Duration,
    /// Lifetime of a connection without a client certificate: it only serves AttestAgent, so
    /// it cannot hold a place under the caps for long.
    pub anonymous_lifetime: Duration,
}

/// The share of `max_connections` that connections without a client certificate may hold
/// (1/`ANONYMOUS_SHARE`), so attested agents always find room.
pub const ANONYMOUS_SHARE: usize = 4;

/// What per-IP caps count: the address for IPv4, the /64 for IPv6 (one host gets a whole /64).
pub fn cap_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Why a new connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `max_connections` are open.
    #[error("{0} agent API connections are open (agent_api.max_connections)")]
    Total(usize),
    /// Connections without a client certificate hold their share of `max_connections`.
    #[error(
        "{0} agent API connections without a client certificate are open (1/4 of agent_api.max_connections)"
    )]
    Anonymous(usize),
    /// This IP address has `max_connections_per_ip` open.
    #[error("{ip} has {max} agent API connections open (agent_api.max_connections_per_ip)")]
    PerIp {
        /// The peer.
        ip: IpAddr,
        /// The cap.
        max: usize,
    },
}

/// Open connections, in total and per peer IP.
///
/// Invariant: `total` and the per-IP counts equal the number of live [`ConnSlot`]s; an IP is
/// in the map only while it has at least one, so the map never holds more than `total` keys.
#[derive(Debug)]
pub struct ConnCaps {
    limits: AcceptLimits,
    inner: Mutex<CapsInner>,
}

#[derive(Debug, Default)]
struct CapsInner {
    total: usize,
    anonymous: usize,
    per_ip: HashMap<IpAddr, usize>,
    refused_unlogged: u64,
    last_log: Option<Instant>,
}

/// One connection's place under the caps; given back on drop.
#[derive(Debug)]
pub struct ConnSlot {
    caps: Arc<ConnCaps>,
    ip: IpAddr,
    anonymous: bool,
}

impl ConnSlot {
    /// Marks the connection as having no client certificate, under the anonymous share.
    pub fn anonymous(&mut self) -> Result<(), Refused> {
        let mut inner = self.caps.lock();
        let max = (self.caps.limits.max_connections / ANONYMOUS_SHARE).max(1);
        if inner.anonymous >= max {
            return Err(Refused::Anonymous(max));
        }
        inner.anonymous += 1;
        self.anonymous = true;
        Ok(())
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut inner = self.caps.lock();
        inner.total = inner.total.saturating_sub(1);
        if self.anonymous {
            inner.anonymous = inner.anonymous.saturating_sub(1);
        }
        if let Some(n) = inner.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.per_ip.remove(&self.ip);
            }
        }
    }
}

impl ConnCaps {
    /// Caps with these limits.
    pub fn new(limits: AcceptLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CapsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open connections right now.
    pub fn open(&self) -> usize {
        self.lock().total
    }

    /// A slot for a connection from `ip`, or why not (refusals are logged, rate-limited).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Refused> {
        let mut inner = self.lock();
        let from_ip = inner.per_ip.get(&ip).copied().unwrap_or(0);
        let refused = if inner.total >= self.limits.max_connections {
            Some(Refused::Total(self.limits.max_connections))
        } else if from_ip >= self.limits.max_per_ip {
            Some(Refused::PerIp {
                ip,
                max: self.limits.max_per_ip,
            })
        } else {
            None
        };
        if let Some(r) = refused {
            inner.refused_unlogged += 1;
            let now = Instant::now();
            if inner
                .last_log
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
            {
                tracing::warn!(reason = %r, refused = inner.refused_unlogged, "agent API connections refused");
                inner.refused_unlogged = 0;
                inner.last_log = Some(now);
            }
            return Err(r);
        }
        inner.total += 1;
        *inner.per_ip.entry(ip).or_insert(0) += 1;
        Ok(ConnSlot {
            caps: self.clone(),
            ip,
            anonymous: false,
        })
    }
}

/// Accepts TCP connections (nodelay, keepalive) under the caps of `limits` and completes TLS
/// handshakes concurrently within `handshake_timeout` (a slow client never holds up the accept
/// loop; pending handshakes count against the caps, so they are bounded); yields finished
/// connections. Out of file descriptors, it backs off instead of spinning.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: AcceptLimits,
    metrics: Arc<Metrics>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
    use tokio_stream::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    let caps = ConnCaps::new(limits);
    let mut tcp_in = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(limits.tcp_keepalive))
        .with_keepalive_interval(Some(Duration::from_secs(10)))
        .with_keepalive_retries(Some(3));
    tokio::spawn(async move {
        let mut backoff = continuity_common::http::AcceptBackoff::default();
        loop {
            let tcp = match tcp_in.next().await {
                None => break,
                Some(Ok(t)) => t,
                Some(Err(e)) => {
                    let pause = backoff.failed("agent API", &e, caps.open());
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            let Ok(peer) = tcp.peer_addr() else {
                continue;
            };
            let slot = match caps.admit(cap_key(peer.ip())) {
                Ok(s) => s,
                Err(_) => {
                    metrics.inc(&metrics.agent_connections_refused);
                    continue;
                }
            };
            let (acceptor, conn_tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
            tokio::spawn(handshake(
                tcp, peer, slot, acceptor, limits, conn_tx, metrics,
            ));
            if tx.is_closed() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Completes one TLS handshake within `handshake_timeout` and hands the connection to tonic;
/// a connection without a client certificate gets the anonymous share and lifetime.
async fn handshake(
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    mut slot: ConnSlot,
    acceptor: TlsAcceptor,
    limits: AcceptLimits,
    conn_tx: tokio::sync::mpsc::Sender<io::Result<TlsConn>>,
    metrics: Arc<Metrics>,
) {
    match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            let certs = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let deadline = if Vec::is_empty(&certs) {
                if let Err(r) = slot.anonymous() {
                    metrics.inc(&metrics.agent_connections_refused);
                    tracing::debug!(%peer, reason = %r, "connection refused");
                    return;
                }
                Some(Box::pin(tokio::time::sleep(limits.anonymous_lifetime)))
            } else {
                None
            };
            let _ = conn_tx
                .send(Ok(TlsConn(tls, PeerCerts(Arc::new(certs)), slot, deadline)))
                .await;
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => {
            metrics.inc(&metrics.agent_handshake_timeouts);
            tracing::debug!(%peer, "TLS handshake timed out");
        }
    }
}

#[cfg(test)]
mod tests;
