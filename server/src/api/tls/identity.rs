//! The server's own SVID (`spiffe://<td>/continuity/server`): issued at start, renewed at
//! half-life (a scheduler job) and whenever the active CA changes, swapped in place.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use continuity_common::Clock;
use continuity_common::tls::{SpiffeClientVerifier, TrustRoots};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

use crate::ca::CaManager;

/// The server's own SVID (`spiffe://<td>/continuity/server`), swapped in place on renewal.
pub struct ServerIdentity {
    current: RwLock<Arc<CertifiedKey>>,
    /// When `current` expires (Unix seconds) and which X.509 CA key signed it.
    issued: Mutex<(i64, Option<String>)>,
    /// Held across a renewal: the CA watcher and the scheduler never renew at once.
    renewing: tokio::sync::Mutex<()>,
    ca: Arc<CaManager>,
    clock: Arc<dyn Clock>,
    ttl: Duration,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ServerIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.resolve_current())
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
    let expires_at = svid.expires_at;
    let chain = svid.chain().into_iter().map(CertificateDer::from).collect();
    let ck = CertifiedKey::new(chain, signing);
    Ok((Arc::new(ck), expires_at))
}

impl ServerIdentity {
    /// Issues the first server SVID and follows the CA: keeps `roots` equal to the bundle's
    /// X.509 authorities and renews whenever the active CA changes. Renewal at half-life is
    /// periodic work: schedule [`ServerIdentity::renew`] every [`ServerIdentity::renew_in`].
    pub async fn start(
        ca: Arc<CaManager>,
        roots: TrustRoots,
        ttl: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, TlsError> {
        let ca2 = ca.clone();
        let (ck, expires) = tokio::task::spawn_blocking(move || issue(&ca2, ttl))
            .await
            .map_err(|e| TlsError::Issue(e.to_string()))??;
        let me = Arc::new(Self {
            current: RwLock::new(ck),
            issued: Mutex::new((expires, ca.active_x509_key_id())),
            renewing: tokio::sync::Mutex::new(()),
            ca: ca.clone(),
            clock,
            ttl,
        });
        roots.replace(ca.bundle().x509_authorities.clone());
        let weak = Arc::downgrade(&me);
        let mut bundle_rx = ca.subscribe();
        tokio::spawn(async move {
            while bundle_rx.changed().await.is_ok() {
                roots.replace(bundle_rx.borrow_and_update().x509_authorities.clone());
                let Some(me) = weak.upgrade() else { return };
                if ca.active_x509_key_id() == me.issued().1 {
                    continue;
                }
                if let Err(e) = me.renew().await {
                    tracing::error!(error = %e, "server SVID renewal failed");
                }
            }
        });
        Ok(me)
    }

    /// The certificate handshakes are answered with right now.
    fn resolve_current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn issued(&self) -> (i64, Option<String>) {
        self.issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Half the remaining life of the current SVID by the injected clock (at least 1 s): when
    /// the next renewal is due.
    pub fn renew_in(&self) -> Duration {
        let (expires, _) = self.issued();
        Duration::from_secs(((expires - self.clock.unix()) / 2).max(1) as u64)
    }

    /// Issues a new server SVID and swaps it in. A panic of the signing task is logged here
    /// (and the current SVID kept); a signing error is returned.
    pub async fn renew(&self) -> Result<(), TlsError> {
        let _one_at_a_time = self.renewing.lock().await;
        let (ca, ttl) = (self.ca.clone(), self.ttl);
        match tokio::task::spawn_blocking(move || issue(&ca, ttl)).await {
            Ok(Ok((ck, exp))) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = ck;
                *self.issued.lock().unwrap_or_else(|e| e.into_inner()) =
                    (exp, self.ca.active_x509_key_id());
                tracing::info!("server SVID renewed");
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(e) => {
                tracing::error!(error = %e, "server SVID renewal panicked");
                Ok(())
            }
        }
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

#[cfg(test)]
#[path = "identity_tests.rs"]
mod tests;
