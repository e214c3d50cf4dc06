//! SPIFFE federation: the trust bundles of other trust domains and the relationships (bundle
//! endpoints) they are refreshed from, kept in the datastore (record-MACed, audited) and in
//! memory for the admin API, entry validation and the [`refresher`].
//!
//! Invariant: the in-memory maps hold exactly the intact rows of `foreign_bundles` and
//! `federation_relationships` as of the last write of this server or the last change-feed
//! reload; neither ever names this server's own trust domain. Writes go through the audit log's transaction, so a bundle and
//! its audit record commit together or not at all.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use continuity_common::{Clock, TrustDomain};

use crate::audit::{Audit, AuditEvent};
use crate::ca::Bundle;
use crate::datastore::{ForeignBundleStore, RelationshipStore, StoreError, Write};
use crate::trust_bundle::Relationship;

pub mod refresher;
mod relationships;

pub use relationships::{Verdict, sequence_verdict};

pub use crate::trust_bundle::{BundleFormat, BundleParseError, MAX_BUNDLE_BYTES, parse_bundle};

/// Why a federation change was refused.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// The trust domain is this server's own.
    #[error("{0} is this server's own trust domain; its bundle is managed by the CA")]
    OwnTrustDomain(TrustDomain),
    /// No bundle is stored for the trust domain.
    #[error("no bundle of trust domain {0}")]
    NotFound(TrustDomain),
    /// Entries still federate with the trust domain (SPIRE's RESTRICT mode).
    #[error(
        "entries federate with {trust_domain} ({}); remove it from their federates_with first",
        entries.join(", ")
    )]
    InUse {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// Ids of the entries that federate with it (at most a few).
        entries: Vec<String>,
    },
    /// A relationship with the trust domain exists already.
    #[error("a federation relationship with {0} exists; use `federation update`")]
    RelationshipExists(TrustDomain),
    /// No relationship with the trust domain exists.
    #[error("no federation relationship with {0}")]
    NoRelationship(TrustDomain),
    /// https_spiffe needs a bundle to authenticate the endpoint, and none is held or given.
    #[error(
        "no bundle of {0} is held to authenticate its https_spiffe endpoint; give one with --trust-domain-bundle-path"
    )]
    NeedsBundle(TrustDomain),
    /// A fetched bundle does not advance the sequence of the stored one but differs from it.
    #[error(
        "bundle of {trust_domain} fetched with spiffe_sequence {fetched}, not newer than the stored {stored}, but with different content; refused"
    )]
    StaleSequence {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// The stored sequence.
        stored: u64,
        /// The fetched sequence.
        fetched: u64,
    },
    /// The datastore (or the audit log) failed; nothing was changed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The foreign bundles of this server.
pub struct Federation {
    own: TrustDomain,
    store: Arc<dyn ForeignBundleStore>,
    relationship_store: Arc<dyn RelationshipStore>,
    audit: Arc<Audit>,
    clock: Arc<dyn Clock>,
    bundles: RwLock<BTreeMap<TrustDomain, Arc<Bundle>>>,
    relationships: RwLock<BTreeMap<TrustDomain, Relationship>>,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("own", &self.own)
            .field("bundles", &self.read().len())
            .finish_non_exhaustive()
    }
}

impl Federation {
    /// Loads the foreign bundles and relationships of the trust domain `own`'s server.
    pub async fn load(
        own: TrustDomain,
        store: Arc<dyn ForeignBundleStore>,
        relationship_store: Arc<dyn RelationshipStore>,
        audit: Arc<Audit>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, StoreError> {
        let f = Self {
            own,
            store,
            relationship_store,
            audit,
            clock,
            bundles: RwLock::default(),
            relationships: RwLock::default(),
        };
        f.reload().await?;
        Ok(Arc::new(f))
    }

    /// Reads every foreign bundle and relationship again (the change feed); whether anything
    /// changed.
    pub async fn reload(&self) -> Result<bool, StoreError> {
        let relationships_changed = self.reload_relationships().await?;
        Ok(self.reload_bundles().await? || relationships_changed)
    }

    async fn reload_bundles(&self) -> Result<bool, StoreError> {
        let fresh: BTreeMap<_, _> = self
            .store
            .list_foreign_bundles()
            .await?
            .into_iter()
            .filter(|b| b.trust_domain != self.own)
            .map(|b| (b.trust_domain.clone(), Arc::new(b)))
            .collect();
        let mut map = self.write();
        let changed = *map != fresh;
        *map = fresh;
        Ok(changed)
    }

    /// The bundle of `trust_domain`, if one is stored.
    pub fn bundle(&self, trust_domain: &TrustDomain) -> Option<Arc<Bundle>> {
        self.read().get(trust_domain).cloned()
    }

    /// Every foreign bundle, by trust domain.
    pub fn bundles(&self) -> Vec<Arc<Bundle>> {
        self.read().values().cloned().collect()
    }

    /// Stores `bundle` (replacing the one of its trust domain), audited as `actor`.
    pub async fn set(&self, bundle: Bundle, actor: &str) -> Result<Arc<Bundle>, FederationError> {
        let td = bundle.trust_domain.clone();
        if td == self.own {
            return Err(FederationError::OwnTrustDomain(td));
        }
        let ev = AuditEvent::ok(actor, "bundle.set", &td.id_string());
        self.audit
            .commit(
                &[Write::PutForeignBundle(bundle.clone(), self.clock.unix())],
                &[ev],
            )
            .await?;
        let bundle = Arc::new(bundle);
        self.write().insert(td, bundle.clone());
        Ok(bundle)
    }

    /// Deletes the bundle of `trust_domain`, audited as `actor`; refused while any of
    /// `federating` (ids of entries that federate with it) exist.
    pub async fn delete(
        &self,
        trust_domain: &TrustDomain,
        federating: Vec<String>,
        actor: &str,
    ) -> Result<(), FederationError> {
        if self.bundle(trust_domain).is_none() {
            return Err(FederationError::NotFound(trust_domain.clone()));
        }
        if !federating.is_empty() {
            return Err(FederationError::InUse {
                trust_domain: trust_domain.clone(),
                entries: federating.into_iter().take(5).collect(),
            });
        }
        let ev = AuditEvent::ok(actor, "bundle.delete", &trust_domain.id_string());
        let w = Write::DeleteForeignBundle(trust_domain.name().to_string());
        match self.audit.commit(&[w], &[ev]).await {
            Ok(_) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.write().remove(trust_domain);
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<TrustDomain, Arc<Bundle>>> {
        self.bundles.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<TrustDomain, Arc<Bundle>>> {
        self.bundles.write().unwrap_or_else(|e| e.into_inner())
    }
}
