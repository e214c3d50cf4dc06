//! The SPIFFE bundle endpoint (`[federation] bundle_endpoint`): this trust domain's bundle as
//! the SPIFFE bundle document (`spiffe_sequence`, `spiffe_refresh_hint`), over HTTPS with the
//! server's own SVID (`https_spiffe`) or a configured Web PKI certificate (`https_web`), with
//! the bounded HTTP responder of the health and metrics listeners.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::api::tls::ServerIdentity;
use crate::ca::CaManager;
use crate::config::{BundleEndpointConfig, EndpointProfile};

/// Why the bundle endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The https_web certificate or key could not be read.
    #[error("federation.bundle_endpoint.{key}: {path}: {reason}")]
    File {
        /// The config key.
        key: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// TLS could not be set up.
    #[error("federation.bundle_endpoint: TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The listener could not bind.
    #[error("federation.bundle_endpoint.bind_address {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Starts serving `ca`'s bundle on `cfg.bind_address` (the task runs until the process ends).
pub async fn serve(
    cfg: &BundleEndpointConfig,
    ca: Arc<CaManager>,
    identity: Arc<ServerIdentity>,
) -> Result<(), EndpointError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth();
    let mut tls = match &cfg.profile {
        EndpointProfile::HttpsSpiffe => builder.with_cert_resolver(identity),
        EndpointProfile::HttpsWeb {
            cert_file,
            key_file,
        } => {
            let bad = |key, path: &std::path::Path, reason: String| EndpointError::File {
                key,
                path: path.display().to_string(),
                reason,
            };
            let chain = CertificateDer::pem_file_iter(cert_file)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad("cert_file", cert_file, e.to_string()))?;
            if chain.is_empty() {
                return Err(bad("cert_file", cert_file, "no CERTIFICATE".into()));
            }
            let key = PrivateKeyDer::from_pem_file(key_file)
                .map_err(|e| bad("key_file", key_file, e.to_string()))?;
            builder.with_single_cert(chain, key)?
        }
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let (addr, hint) = (cfg.bind_address, cfg.refresh_hint);
    continuity_common::http::serve_tls_with(
        addr,
        continuity_common::http::HttpLimits::default(),
        acceptor,
        move |path| std::future::ready(reply(&ca, hint, &path)),
    )
    .await
    .map_err(|source| EndpointError::Bind { addr, source })?;
    tracing::info!(bind_address = %addr, "SPIFFE bundle endpoint serving");
    Ok(())
}

/// `/`: the SPIFFE bundle document (with `hint` as its refresh hint, when configured).
fn reply(ca: &CaManager, hint: Option<u64>, path: &str) -> continuity_common::http::Reply {
    if path != "/" {
        return (404, "text/plain", "GET / for the SPIFFE bundle\n".into());
    }
    match ca.bundle().to_spiffe_json() {
        Ok(mut doc) => {
            if let (Some(h), Some(o)) = (hint, doc.as_object_mut()) {
                o.insert("spiffe_refresh_hint".into(), h.into());
            }
            (200, "application/json", doc.to_string())
        }
        Err(e) => {
            tracing::error!(error = %e, "the bundle cannot be rendered as a SPIFFE document");
            (503, "text/plain", "bundle unavailable\n".into())
        }
    }
}
