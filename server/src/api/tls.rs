//! TLS 1.3 for the agent API: an accept loop that hands tonic authenticated streams (with the
//! peer's certificates attached to every request) and a server identity that follows CA rotation.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use continuity_common::tls::{SpiffeClientVerifier, TrustRoots};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::ca::CaManager;

/// The certificate chain a client presented (empty before attestation).
#[derive(Debug, Clone, Default)]
pub struct PeerCerts(pub Arc<Vec<CertificateDer<'static>>>);

/// An accepted TLS connection.
pub struct TlsConn(TlsStream<TcpStream>, PeerCerts);

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
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow client never
/// holds up the accept loop); yields finished connections.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, conn_tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let certs = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                            .unwrap_or_default();
                        let _ = conn_tx
                            .send(Ok(TlsConn(tls, PeerCerts(Arc::new(certs)))))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The server's own SVID (`spiffe://<td>/continuity/server`), swapped in place on renewal.
#[derive(Debug)]
pub struct ServerIdentity {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ServerIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// Errors building the server's TLS identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Signing the server SVID failed.
    #[error("cannot issue the server SVID: {0}")]
    Issue(String),
    /// rustls rejected the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn issue(ca: &CaManager, ttl: Duration) -> Result<(Arc<CertifiedKey>, i64), TlsError> {
    let kp = rcgen::KeyPair::generate().map_err(|e| TlsError::Issue(e.to_string()))?;
    let id = format!("spiffe://{}/continuity/server", ca.trust_domain().name());
    let spki = rcgen::PublicKeyData::subject_public_key_info(&kp);
    let svid = ca
        .sign_x509_svid(&id, &spki, ttl, &[])
        .map_err(|e| TlsError::Issue(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(kp.serialize_der()));
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider.key_provider.load_private_key(key)?;
    let ck = CertifiedKey::new(vec![CertificateDer::from(svid.cert_der)], signing);
    Ok((Arc::new(ck), svid.expires_at))
}

impl ServerIdentity {
    /// Issues the first server SVID and keeps it fresh: renewed at half-life and whenever the
    /// active CA changes. Also keeps `roots` equal to the bundle's X.509 authorities.
    pub async fn start(
        ca: Arc<CaManager>,
        roots: TrustRoots,
        ttl: Duration,
    ) -> Result<Arc<Self>, TlsError> {
        let ca2 = ca.clone();
        let (ck, mut expires) = tokio::task::spawn_blocking(move || issue(&ca2, ttl))
            .await
            .map_err(|e| TlsError::Issue(e.to_string()))??;
        let me = Arc::new(Self {
            current: RwLock::new(ck),
        });
        roots.replace(ca.bundle().x509_authorities.clone());
        let weak = Arc::downgrade(&me);
        let mut bundle_rx = ca.subscribe();
        tokio::spawn(async move {
            let mut issued_by = ca.active_x509_key_id();
            loop {
                let now = continuity_common::clock::unix_seconds(std::time::SystemTime::now());
                let half = Duration::from_secs(((expires - now) / 2).max(1) as u64);
                tokio::select! {
                    changed = bundle_rx.changed() => {
                        if changed.is_err() { return; }
                        roots.replace(bundle_rx.borrow_and_update().x509_authorities.clone());
                        if ca.active_x509_key_id() == issued_by { continue; }
                    }
                    _ = tokio::time::sleep(half) => {}
                }
                let Some(me) = weak.upgrade() else { return };
                let ca2 = ca.clone();
                match tokio::task::spawn_blocking(move || issue(&ca2, ttl)).await {
                    Ok(Ok((ck, exp))) => {
                        *me.current.write().unwrap_or_else(|e| e.into_inner()) = ck;
                        expires = exp;
                        issued_by = ca.active_x509_key_id();
                        tracing::info!("server SVID renewed");
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "server SVID renewal failed"),
                    Err(e) => tracing::error!(error = %e, "server SVID renewal panicked"),
                }
            }
        });
        Ok(me)
    }

    /// A TLS 1.3-only acceptor that asks for (but does not require) agent SVIDs.
    pub fn acceptor(self: &Arc<Self>, roots: TrustRoots) -> Result<TlsAcceptor, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(roots)))
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(cfg)))
    }
}
