//! Forced rotation of the trust domain's authorities (SPIRE's `localauthority`): an operator
//! prepares a new key now, activates it ahead of the schedule, taints the old one (every agent
//! then replaces what it signed) and finally revokes it (its public part leaves the bundle).
//!
//! Invariants: only a *prepared* authority can be activated; only an *old* authority (retired,
//! no longer signing) can be tainted, never the active or prepared one; only a tainted
//! authority can be revoked. Each change bumps the bundle sequence, so the change feed carries
//! it to every server and the bundle sync to every agent.

use super::{CaError, CaManager};
use crate::datastore::{CaKeyRecord, CaKeyState, KeyPurpose};

/// Which of the trust domain's authorities an operation is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorityKind {
    /// The X.509 CA (authority ID: subject key identifier, lowercase hex).
    X509,
    /// The JWT signing key (authority ID: its `kid`).
    Jwt,
}

/// Why a forced rotation step was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// No authority ID was given.
    #[error("an authority ID is required")]
    MissingId,
    /// The request itself is malformed (an unknown kind, an over-long ID).
    #[error("{0}")]
    Invalid(String),
    /// No authority of this kind has that ID.
    #[error("no {0} authority has the ID {1:?}")]
    Unknown(&'static str, String),
    /// The authority is not in the state the step needs.
    #[error("{0}")]
    Precondition(String),
    /// The CA failed underneath.
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// One authority as `authority show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityState {
    /// Subject key identifier (X.509, lowercase hex) or `kid` (JWT).
    pub authority_id: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// active, prepared, old or tainted.
    pub state: &'static str,
}

/// The active, prepared and old authority of one kind (absent slots are None).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthoritySlots {
    /// Signing now.
    pub active: Option<AuthorityState>,
    /// Published, signing after activation.
    pub prepared: Option<AuthorityState>,
    /// The most recently retired one (tainted or not).
    pub old: Option<AuthorityState>,
}

impl AuthorityKind {
    fn purpose(self) -> KeyPurpose {
        match self {
            Self::X509 => KeyPurpose::X509,
            Self::Jwt => KeyPurpose::Jwt,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::X509 => "X.509",
            Self::Jwt => "JWT",
        }
    }
}

/// The authority ID of a journal record: the CA certificate's subject key identifier in
/// lowercase hex (as SPIRE shows it), or the JWT key's `kid`. Empty if the certificate has no
/// subject key identifier (never for certificates this CA made).
pub fn authority_id(r: &CaKeyRecord) -> String {
    match r.purpose {
        KeyPurpose::Jwt => r.kid.clone(),
        KeyPurpose::X509 => ski_hex(&r.cert_der).unwrap_or_default(),
    }
}

fn ski_hex(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                Some(hex::encode(k.0))
            }
            _ => None,
        })
}

/// The authority IDs of the tainted authorities of `purpose` in the journal.
pub(super) fn tainted(records: &[CaKeyRecord], purpose: KeyPurpose) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.purpose == purpose && r.state == CaKeyState::Tainted)
        .map(authority_id)
        .collect()
}

fn state_of(r: &CaKeyRecord) -> AuthorityState {
    AuthorityState {
        authority_id: authority_id(r),
        expires_at: r.not_after,
        state: match r.state {
            CaKeyState::Active => "active",
            CaKeyState::Prepared => "prepared",
            CaKeyState::Retired => "old",
            CaKeyState::Tainted => "tainted",
        },
    }
}

/// The record of `id` if it can be revoked (it exists and is tainted).
fn revocable<'a>(
    records: &'a [CaKeyRecord],
    kind: AuthorityKind,
    id: &str,
) -> Result<&'a CaKeyRecord, AuthorityError> {
    let p = position(records, kind, id).ok_or_else(|| unknown(kind, id))?;
    let r = &records[p];
    signed_here(kind, id, r)?;
    if r.state != CaKeyState::Tainted {
        return Err(AuthorityError::Precondition(format!(
            "{} authority {id} is {}: only a tainted authority can be revoked (taint it first)",
            kind.name(),
            state_of(r).state
        )));
    }
    Ok(r)
}

impl CaManager {
    /// The active, prepared and old authority of `kind`, from the CA journal.
    pub async fn authority_slots(&self, kind: AuthorityKind) -> Result<AuthoritySlots, CaError> {
        let now = self.clock.unix();
        let records = self.store.list_ca_keys().await?;
        let mine = || {
            records
                .iter()
                .filter(|r| r.purpose == kind.purpose() && r.not_after > now)
        };
        let find = |s: CaKeyState| mine().find(|r| r.state == s).map(state_of);
        Ok(AuthoritySlots {
            active: find(CaKeyState::Active),
            prepared: find(CaKeyState::Prepared),
            old: mine()
                .filter(|r| r.state.is_old())
                .max_by_key(|r| r.not_before)
                .map(state_of),
        })
    }

    /// Prepares a new authority of `kind` now (replacing a prepared one not yet activated);
    /// it is published in the bundle at once and signs after [`CaManager::activate_authority`].
    pub async fn prepare_authority(
        &self,
        kind: AuthorityKind,
    ) -> Result<AuthorityState, AuthorityError> {
        let _guard = self.rotate_lock.lock().await;
        let now = self.clock.unix();
        let records = self.store.list_ca_keys().await.map_err(CaError::from)?;
        let fresh = self
            .generate(kind.purpose(), now, CaKeyState::Prepared)
            .await?;
        for r in records
            .iter()
            .filter(|r| r.purpose == kind.purpose() && r.state == CaKeyState::Prepared)
        {
            self.store
                .delete_ca_key(&r.key_id)
                .await
                .map_err(CaError::from)?;
            self.keys.delete(&r.key_id).await.map_err(CaError::from)?;
        }
        self.publish_journal().await?;
        tracing::info!(key_id = %fresh.key_id, kind = kind.name(), "authority prepared by an operator");
        Ok(state_of(&fresh))
    }

    /// Makes the prepared authority `id` active; the active one becomes old (its private key
    /// is deleted: it never signs again). Returns the new active authority.
    pub async fn activate_authority(
        &self,
        kind: AuthorityKind,
        id: &str,
    ) -> Result<AuthorityState, AuthorityError> {
        let _guard = self.rotate_lock.lock().await;
        let mut records = self.journal_with(id).await?;
        let p = position(&records, kind, id).ok_or_else(|| unknown(kind, id))?;
        if records[p].state != CaKeyState::Prepared {
            return Err(AuthorityError::Precondition(format!(
                "{} authority {id} is {}, not prepared: only the prepared authority can be activated",
                kind.name(),
                state_of(&records[p]).state
            )));
        }
        if let Some(a) = records
            .iter()
            .position(|r| r.purpose == kind.purpose() && r.state == CaKeyState::Active)
        {
            // Retired first, as the schedule does: a crash in between leaves one prepared and
            // no active authority, which the next rotation check activates.
            self.set_state(&mut records[a], CaKeyState::Retired).await?;
            self.keys
                .delete(&records[a].key_id)
                .await
                .map_err(CaError::from)?;
        }
        self.set_state(&mut records[p], CaKeyState::Active).await?;
        self.publish_journal().await?;
        tracing::info!(key_id = %records[p].key_id, kind = kind.name(), "authority activated by an operator");
        Ok(state_of(&records[p]))
    }

    /// Marks the old authority `id` tainted: it stays in the bundle, flagged, so every agent
    /// replaces the SVIDs it signed. The active and prepared authorities cannot be tainted.
    pub async fn taint_authority(
        &self,
        kind: AuthorityKind,
        id: &str,
    ) -> Result<AuthorityState, AuthorityError> {
        let _guard = self.rotate_lock.lock().await;
        let mut records = self.journal_with(id).await?;
        let p = position(&records, kind, id).ok_or_else(|| unknown(kind, id))?;
        signed_here(kind, id, &records[p])?;
        match records[p].state {
            CaKeyState::Retired => {}
            CaKeyState::Tainted => {
                return Err(AuthorityError::Precondition(format!(
                    "{} authority {id} is already tainted",
                    kind.name()
                )));
            }
            _ => {
                return Err(AuthorityError::Precondition(format!(
                    "{} authority {id} is {}: only an old authority can be tainted (prepare and activate a new one first)",
                    kind.name(),
                    state_of(&records[p]).state
                )));
            }
        }
        self.set_state(&mut records[p], CaKeyState::Tainted).await?;
        self.publish_journal().await?;
        tracing::warn!(key_id = %records[p].key_id, kind = kind.name(), "authority tainted by an operator");
        Ok(state_of(&records[p]))
    }

    /// Whether `id` could be revoked now: it exists and is tainted.
    pub async fn check_revocable(
        &self,
        kind: AuthorityKind,
        id: &str,
    ) -> Result<(), AuthorityError> {
        let records = self.journal_with(id).await?;
        revocable(&records, kind, id).map(|_| ())
    }

    /// Removes the tainted authority `id` from the bundle (and the CA journal). An untainted
    /// authority cannot be revoked.
    pub async fn revoke_authority(
        &self,
        kind: AuthorityKind,
        id: &str,
    ) -> Result<AuthorityState, AuthorityError> {
        let _guard = self.rotate_lock.lock().await;
        let records = self.journal_with(id).await?;
        let r = revocable(&records, kind, id)?;
        self.store
            .delete_ca_key(&r.key_id)
            .await
            .map_err(CaError::from)?;
        self.publish_journal().await?;
        tracing::warn!(key_id = %r.key_id, kind = kind.name(), "tainted authority revoked: removed from the bundle");
        Ok(state_of(r))
    }

    /// The CA journal, after checking an ID was given.
    async fn journal_with(&self, id: &str) -> Result<Vec<CaKeyRecord>, AuthorityError> {
        if id.trim().is_empty() {
            return Err(AuthorityError::MissingId);
        }
        Ok(self.store.list_ca_keys().await.map_err(CaError::from)?)
    }

    /// Bumps the bundle sequence and rebuilds the signers and bundle from the journal (the
    /// change feed carries the new sequence to the other servers). Caller holds the rotate lock.
    async fn publish_journal(&self) -> Result<(), CaError> {
        self.store.next_bundle_sequence().await?;
        self.reload_locked().await?;
        Ok(())
    }
}

/// Where authority `id` of `kind` is in the journal (X.509 IDs are hex, matched in any case;
/// JWT kids exactly).
fn position(records: &[CaKeyRecord], kind: AuthorityKind, id: &str) -> Option<usize> {
    let id = match kind {
        AuthorityKind::X509 => id.to_ascii_lowercase(),
        AuthorityKind::Jwt => id.to_string(),
    };
    records
        .iter()
        .position(|r| r.purpose == kind.purpose() && !id.is_empty() && authority_id(r) == id)
}

/// Refuses an X.509 authority the upstream authority signed: SVIDs it signed chain to the
/// upstream roots, which the bundle keeps, so neither tainting nor revoking it here would take
/// away their trust (SPIRE refuses the same with an upstream authority).
fn signed_here(kind: AuthorityKind, id: &str, r: &CaKeyRecord) -> Result<(), AuthorityError> {
    if kind == AuthorityKind::X509 && !super::upstream::self_signed(&r.cert_der) {
        return Err(AuthorityError::Precondition(format!(
            "x509 authority {id} is an intermediate signed by the upstream authority: what it signed chains to the upstream roots, so it cannot be tainted or revoked here; prepare and activate a new authority to move SVIDs off it, and revoke the intermediate at the upstream CA"
        )));
    }
    Ok(())
}

fn unknown(kind: AuthorityKind, id: &str) -> AuthorityError {
    AuthorityError::Unknown(kind.name(), id.to_string())
}
