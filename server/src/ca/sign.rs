//! The signing half of the CA: X509-SVIDs (from a public key or a CSR) and JWT-SVIDs, each
//! under the snapshot's active key, never outliving it.

use std::time::Duration;

use super::{CaError, CaManager, csr, profile};

/// An X509-SVID fresh from the CA.
#[derive(Debug, Clone)]
pub struct SignedSvid {
    /// Leaf certificate, DER.
    pub cert_der: Vec<u8>,
    /// The certificates after the leaf (the CA and upstream intermediates; empty when the CA
    /// is a root).
    pub intermediates: Vec<Vec<u8>>,
    /// Leaf NotAfter, Unix seconds.
    pub expires_at: i64,
}

impl SignedSvid {
    /// The chain as served: leaf first, then the intermediates.
    pub fn chain(self) -> Vec<Vec<u8>> {
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(self.cert_der);
        chain.extend(self.intermediates);
        chain
    }
}

impl CaManager {
    /// Signs an X509-SVID for `spiffe_id` over `spki_der`. Blocking (the key may be in an HSM).
    pub fn sign_x509_svid(
        &self,
        spiffe_id: &str,
        spki_der: &[u8],
        ttl: Duration,
        dns_names: &[String],
    ) -> Result<SignedSvid, CaError> {
        let snap = self.snapshot()?;
        let now = self.clock.unix();
        let not_after = (now + ttl.as_secs() as i64).min(snap.x509.record.not_after);
        let params = profile::svid_params(spiffe_id, dns_names, now - 10, not_after)?;
        let public = rcgen::SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| csr::CsrError::Malformed(format!("unsupported public key: {e}")))?;
        let cert = params
            .signed_by(&public, &snap.x509.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(SignedSvid {
            cert_der: cert.der().to_vec(),
            intermediates: snap.x509.intermediates.clone(),
            expires_at: not_after,
        })
    }

    /// Signs an X509-SVID from a CSR that passes the [`csr`] policy; only its public key is used
    /// (the SANs, constraints and key usages it asks for are ignored). Blocking.
    pub fn sign_x509_svid_from_csr(
        &self,
        spiffe_id: &str,
        csr_der: &[u8],
        ttl: Duration,
        dns_names: &[String],
    ) -> Result<SignedSvid, CaError> {
        let spki = profile::csr_public_key(csr_der)?;
        self.sign_x509_svid(spiffe_id, &spki, ttl, dns_names)
    }

    /// Signs a JWT-SVID; returns (token, expires_at). Blocking.
    pub fn sign_jwt_svid(
        &self,
        spiffe_id: &str,
        audience: &[String],
        ttl: Duration,
    ) -> Result<(String, i64), CaError> {
        let snap = self.snapshot()?;
        let now = self.clock.unix();
        let ttl = ttl.min(Duration::from_secs(
            (snap.jwt.record.not_after - now).max(1) as u64,
        ));
        profile::sign_jwt(
            snap.jwt.key.as_ref(),
            &snap.jwt.record.kid,
            spiffe_id,
            audience,
            now,
            ttl,
            self.cfg.jwt_issuer.as_deref(),
        )
    }
}
