//! Who is calling: every call after attestation is authenticated by the agent SVID the caller
//! presented in the TLS handshake, checked against the registry's current record.

use continuity_common::{Clock, TrustDomain};
use tonic::{Request, Status};

use super::AgentService;
use crate::api::registry_status;
use crate::api::tls::PeerCerts;
use crate::datastore::AgentRecord;
use crate::registry::Registry;

/// Authenticates an agent-API caller by its agent SVID and returns its current record:
/// the SVID must be unexpired, of an attested, unbanned agent, and current (or the previous
/// one, briefly: see [`Registry::authenticate_agent`]; a superseded one flags a fork).
pub async fn authenticate_agent<T>(
    trust_domain: &TrustDomain,
    registry: &Registry,
    clock: &dyn Clock,
    req: &Request<T>,
) -> Result<AgentRecord, Status> {
    Ok(authenticate_serial(trust_domain, registry, clock, req)
        .await?
        .0)
}

/// [`authenticate_agent`], also returning the serial the caller presented.
pub(super) async fn authenticate_serial<T>(
    trust_domain: &TrustDomain,
    registry: &Registry,
    clock: &dyn Clock,
    req: &Request<T>,
) -> Result<(AgentRecord, String), Status> {
    let leaf = req
        .extensions()
        .get::<PeerCerts>()
        .and_then(|p| p.0.first().cloned())
        .ok_or_else(|| Status::unauthenticated("this call needs an agent SVID; attest first"))?;
    let (id, not_after, serial) = continuity_common::x509::svid_facts(&leaf)
        .map_err(|e| Status::unauthenticated(format!("agent SVID: {e}")))?;
    if id.trust_domain() != *trust_domain || !id.path().starts_with("/continuity/agent/") {
        return Err(Status::permission_denied(format!(
            "{id} is not an agent of this trust domain"
        )));
    }
    // A long-lived connection can outlive the certificate it was opened with.
    if not_after <= clock.unix() {
        return Err(Status::unauthenticated(
            "agent SVID has expired; reconnect with a renewed SVID",
        ));
    }
    let (agent, _) = registry
        .authenticate_agent(&id, &serial)
        .await
        .map_err(registry_status)?;
    Ok((agent, serial))
}

impl AgentService {
    /// [`authenticate_agent`] with this service's trust domain, registry and clock.
    pub(super) async fn authenticate<T>(&self, req: &Request<T>) -> Result<AgentRecord, Status> {
        authenticate_agent(&self.trust_domain, &self.registry, self.clock.as_ref(), req).await
    }
}
