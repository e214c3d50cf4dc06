//! The server's gRPC APIs: [`agent`] (TLS, for agents) and [`admin`] (Unix socket, for operators),
//! plus the TLS plumbing in [`tls`]. Domain errors become `tonic::Status` only here.

pub mod admin;
pub mod agent;
mod authority;
pub mod engine;
pub mod federation;
pub mod federation_relationships;
pub mod limits;
pub mod tls;
pub mod uds;

use continuity_proto::types;
use tonic::Status;

use crate::ca::{Bundle, CaError};
use crate::datastore::{AgentRecord, Entry, StoreError};
use crate::registry::RegistryError;

/// The wire form of a bundle.
pub fn bundle_to_proto(b: &Bundle) -> types::Bundle {
    types::Bundle {
        trust_domain: b.trust_domain.name().to_string(),
        x509_authorities: b.x509_authorities.clone(),
        jwt_authorities: b
            .jwt_authorities
            .iter()
            .map(|k| types::JwtKey {
                public_key: k.public_key.clone(),
                key_id: k.key_id.clone(),
                expires_at: k.expires_at,
            })
            .collect(),
        refresh_hint: b.refresh_hint,
        sequence_number: b.sequence,
        tainted_x509_authorities: b.tainted_x509.clone(),
        tainted_jwt_authorities: b.tainted_jwt.clone(),
    }
}

/// The wire form of an entry.
pub fn entry_to_proto(e: &Entry) -> types::Entry {
    types::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: e
            .selectors
            .iter()
            .map(|s| types::Selector {
                r#type: s.kind.clone(),
                value: s.value.clone(),
            })
            .collect(),
        x509_svid_ttl: e.x509_svid_ttl,
        jwt_svid_ttl: e.jwt_svid_ttl,
        dns_names: e.dns_names.clone(),
        hint: e.hint.clone(),
        admin: e.admin,
        engine: e.engine.clone().unwrap_or_default(),
        federates_with: e.federates_with.clone(),
        revision: e.revision,
        created_at: e.created_at,
    }
}

/// The wire form of an agent.
pub fn agent_to_proto(a: &AgentRecord) -> types::Agent {
    types::Agent {
        spiffe_id: a.spiffe_id.to_string(),
        attestation_type: a.attestation_type.clone(),
        serial_number: a.serial.clone(),
        expires_at: a.expires_at,
        banned: a.banned,
        alias: a
            .alias
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        created_at: a.created_at,
        last_seen: a.last_seen,
        selectors: a
            .selectors
            .iter()
            .map(|s| types::Selector {
                r#type: s.kind.clone(),
                value: s.value.clone(),
            })
            .collect(),
        forked: a.forked,
        forked_at: a.forked_at,
    }
}

/// Runs an audited write to completion even if its RPC is cancelled: the datastore commit and
/// the in-memory update after it must never be separated by a client that went away.
pub async fn to_completion<T, F>(write: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, Status>> + Send + 'static,
{
    tokio::spawn(write)
        .await
        .map_err(|e| Status::internal(format!("the write task failed: {e}")))?
}

/// Maps registry errors to gRPC statuses.
pub fn registry_status(e: RegistryError) -> Status {
    match e {
        RegistryError::Duplicate(_) => Status::already_exists(e.to_string()),
        RegistryError::NotFound(_) => Status::not_found(e.to_string()),
        RegistryError::Store(e) => store_status(&e),
        RegistryError::NotAttested(_)
        | RegistryError::Banned(_)
        | RegistryError::Forked(_)
        | RegistryError::Refused(_) => Status::permission_denied(e.to_string()),
        RegistryError::Contended(_) => Status::unavailable(e.to_string()),
        RegistryError::Rng(_) => {
            tracing::error!(error = %e, "no randomness for a new id");
            Status::unavailable(e.to_string())
        }
    }
}

/// Maps datastore errors to gRPC statuses: a row that failed its record MAC is `DataLoss`
/// naming the row; anything else is `Unavailable`.
pub fn store_status(e: &StoreError) -> Status {
    match e {
        StoreError::Integrity { .. } => Status::data_loss(e.to_string()),
        _ => {
            tracing::error!(error = %e, "datastore failure");
            Status::unavailable(e.to_string())
        }
    }
}

/// Maps CA errors to gRPC statuses.
pub fn ca_status(e: CaError) -> Status {
    match e {
        CaError::Csr(_) => Status::invalid_argument(e.to_string()),
        other => {
            tracing::error!(error = %other, "CA failure");
            Status::internal(other.to_string())
        }
    }
}
