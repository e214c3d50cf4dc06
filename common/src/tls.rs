//! rustls verifiers that authenticate peers by SPIFFE ID against a live trust bundle.
//!
//! The server accepts agent SVIDs (client certificates, optional so that an unattested agent
//! can call `AttestAgent`); agents accept the server only if its SVID chains to the bundle and
//! names the server's SPIFFE ID. Both read the roots from a shared [`TrustRoots`] so a CA
//! rotation takes effect for the next handshake.

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::SpiffeId;

/// The X.509 authorities of the trust bundle, shared and replaceable at run time.
#[derive(Debug, Clone, Default)]
pub struct TrustRoots(Arc<RwLock<Vec<CertificateDer<'static>>>>);

impl TrustRoots {
    /// Roots from DER certificates.
    pub fn new(roots: Vec<Vec<u8>>) -> Self {
        let r = Self::default();
        r.replace(roots);
        r
    }

    /// Replaces the roots (after a bundle change).
    pub fn replace(&self, roots: Vec<Vec<u8>>) {
        let certs = roots.into_iter().map(CertificateDer::from).collect();
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = certs;
    }

    /// The current roots, DER.
    pub fn current(&self) -> Vec<CertificateDer<'static>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Verifies `leaf` (+ `intermediates`) chains to a current root for the given usage.
    pub fn verify_chain(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), Error> {
        let roots = self.current();
        let anchors: Vec<_> = roots
            .iter()
            .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
            .collect();
        if anchors.is_empty() {
            return Err(Error::InvalidCertificate(CertificateError::UnknownIssuer));
        }
        let ee = webpki::EndEntityCert::try_from(leaf)
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map(|_| ())
        .map_err(webpki_error)
    }
}

fn webpki_error(e: webpki::Error) -> Error {
    use webpki::Error as W;
    let ce = match e {
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    Error::InvalidCertificate(ce)
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}

/// Agent side: accepts the server only with an SVID for `expected` chaining to the bundle.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: TrustRoots,
    expected: SpiffeId,
}

impl SpiffeServerVerifier {
    /// A verifier for the server whose SPIFFE ID is `expected`.
    pub fn new(roots: TrustRoots, expected: SpiffeId) -> Self {
        Self { roots, expected }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.roots.verify_chain(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        let id = crate::x509::spiffe_id_of(end_entity)
            .map_err(|e| Error::InvalidCertificate(CertificateError::Other(other(e))))?;
        if id != self.expected {
            return Err(Error::InvalidCertificate(CertificateError::Other(other(
                format!("server presented {id}, expected {}", self.expected),
            ))));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Server side: client certificates are optional, but when presented must chain to the bundle.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    roots: TrustRoots,
}

impl SpiffeClientVerifier {
    /// A verifier over the given roots.
    pub fn new(roots: TrustRoots) -> Self {
        Self { roots }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.roots.verify_chain(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

fn other(msg: String) -> rustls::OtherError {
    rustls::OtherError(Arc::new(std::io::Error::other(msg)))
}

/// A TLS 1.3-only client config that authenticates the server by SPIFFE ID and, when given,
/// presents `client` (certificate chain + PKCS#8 key) as the agent SVID.
pub fn client_config(
    roots: TrustRoots,
    server_id: SpiffeId,
    client: Option<(
        Vec<CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<rustls::ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(roots, server_id)));
    let mut cfg = match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Verifiers that do not verify. Only for explicitly insecure modes (`insecure_bootstrap`,
/// `insecure_skip_kubelet_verify`); the name says so wherever it is used.
pub mod danger {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::{DigitallySignedStruct, Error, SignatureScheme};
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    /// Accepts any server certificate (handshake signatures are still checked).
    #[derive(Debug)]
    pub struct AcceptAnyServerCert(Arc<rustls::crypto::CryptoProvider>);

    impl AcceptAnyServerCert {
        /// With the aws-lc-rs provider's algorithms.
        pub fn new() -> Arc<Self> {
            Arc::new(Self(
                Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            ))
        }
    }

    impl ServerCertVerifier for AcceptAnyServerCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}
