//! Federation relationships: `federation create|update|delete`, and the rule a refreshed
//! bundle must pass (a newer `spiffe_sequence`) before it replaces the stored one.

use std::sync::Arc;

use continuity_common::TrustDomain;

use super::{Federation, FederationError};
use crate::audit::AuditEvent;
use crate::ca::Bundle;
use crate::datastore::{StoreError, Write};
use crate::trust_bundle::{EndpointAuth, Relationship};

/// What to do with a bundle fetched from a peer's endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Store it: there is none yet, or its sequence is newer.
    Replace,
    /// Identical to the stored bundle: nothing to do.
    Unchanged,
    /// Not newer than the stored bundle but different: refuse it.
    Stale,
}

/// The sequence rule: a fetched bundle replaces the stored one only with a newer
/// `spiffe_sequence`; an equal or older one must be identical.
pub fn sequence_verdict(stored: Option<&Bundle>, fetched: &Bundle) -> Verdict {
    match stored {
        None => Verdict::Replace,
        Some(s) if fetched.sequence > s.sequence => Verdict::Replace,
        Some(s) if same_content(s, fetched) => Verdict::Unchanged,
        Some(_) => Verdict::Stale,
    }
}

/// Same sequence and authorities (what agents are served); the refresh hint may differ (a
/// bundle endpoint may serve its own).
fn same_content(a: &Bundle, b: &Bundle) -> bool {
    a.x509_authorities == b.x509_authorities
        && a.jwt_authorities == b.jwt_authorities
        && a.tainted_x509 == b.tainted_x509
        && a.tainted_jwt == b.tainted_jwt
        && a.sequence == b.sequence
}

impl Federation {
    /// Reads every relationship again; whether anything changed.
    pub(super) async fn reload_relationships(&self) -> Result<bool, StoreError> {
        let fresh: std::collections::BTreeMap<_, _> = self
            .relationship_store
            .list_relationships()
            .await?
            .into_iter()
            .filter(|r| r.trust_domain != self.own)
            .map(|r| (r.trust_domain.clone(), r))
            .collect();
        let mut map = self.relationships_mut();
        let changed = *map != fresh;
        *map = fresh;
        Ok(changed)
    }

    /// The relationship with `trust_domain`, if any.
    pub fn relationship(&self, trust_domain: &TrustDomain) -> Option<Relationship> {
        self.relationships_ref().get(trust_domain).cloned()
    }

    /// Every relationship, by trust domain.
    pub fn relationships(&self) -> Vec<Relationship> {
        self.relationships_ref().values().cloned().collect()
    }

    /// Stores a new relationship (with `initial`, its bootstrap bundle), audited as `actor`.
    pub async fn create_relationship(
        &self,
        r: Relationship,
        initial: Option<Bundle>,
        actor: &str,
    ) -> Result<(), FederationError> {
        if self.relationship(&r.trust_domain).is_some() {
            return Err(FederationError::RelationshipExists(r.trust_domain));
        }
        self.put_relationship(r, initial, actor, "federation.create")
            .await
    }

    /// Replaces an existing relationship (and, with `initial`, its bundle), audited as `actor`.
    pub async fn update_relationship(
        &self,
        r: Relationship,
        initial: Option<Bundle>,
        actor: &str,
    ) -> Result<(), FederationError> {
        if self.relationship(&r.trust_domain).is_none() {
            return Err(FederationError::NoRelationship(r.trust_domain));
        }
        self.put_relationship(r, initial, actor, "federation.update")
            .await
    }

    async fn put_relationship(
        &self,
        r: Relationship,
        initial: Option<Bundle>,
        actor: &str,
        action: &str,
    ) -> Result<(), FederationError> {
        let td = r.trust_domain.clone();
        if td == self.own {
            return Err(FederationError::OwnTrustDomain(td));
        }
        let spiffe = matches!(r.auth, EndpointAuth::HttpsSpiffe(_));
        if spiffe && initial.is_none() && self.bundle(&td).is_none() {
            return Err(FederationError::NeedsBundle(td));
        }
        let now = self.clock.unix();
        let mut writes = vec![Write::PutRelationship(r.clone(), now)];
        if let Some(b) = &initial {
            writes.push(Write::PutForeignBundle(b.clone(), now));
        }
        let ev = AuditEvent::ok(actor, action, &td.id_string());
        self.audit.commit(&writes, &[ev]).await?;
        self.relationships_mut().insert(td.clone(), r);
        if let Some(b) = initial {
            self.write().insert(td, Arc::new(b));
        }
        Ok(())
    }

    /// Ends the federation with `trust_domain`: deletes the relationship and the bundle it
    /// manages, audited as `actor` (entries federating with it are the caller's warning).
    pub async fn delete_relationship(
        &self,
        trust_domain: &TrustDomain,
        actor: &str,
    ) -> Result<(), FederationError> {
        if self.relationship(trust_domain).is_none() {
            return Err(FederationError::NoRelationship(trust_domain.clone()));
        }
        let mut writes = vec![Write::DeleteRelationship(trust_domain.name().to_string())];
        if self.bundle(trust_domain).is_some() {
            writes.push(Write::DeleteForeignBundle(trust_domain.name().to_string()));
        }
        let ev = AuditEvent::ok(actor, "federation.delete", &trust_domain.id_string());
        match self.audit.commit(&writes, &[ev]).await {
            Ok(_) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.relationships_mut().remove(trust_domain);
        self.write().remove(trust_domain);
        Ok(())
    }

    /// Applies the sequence rule to a bundle fetched from the endpoint of its trust domain and
    /// stores it when newer (audited `federation.refresh` as `actor`, as is a refusal); whether
    /// it was stored.
    pub async fn accept_fetched(&self, b: Bundle, actor: &str) -> Result<bool, FederationError> {
        let td = b.trust_domain.clone();
        if self.relationship(&td).is_none() {
            return Err(FederationError::NoRelationship(td));
        }
        let stored = self.bundle(&td);
        match sequence_verdict(stored.as_deref(), &b) {
            Verdict::Unchanged => Ok(false),
            Verdict::Stale => {
                let refusal = FederationError::StaleSequence {
                    trust_domain: td.clone(),
                    stored: stored.map_or(0, |s| s.sequence),
                    fetched: b.sequence,
                };
                // A rolled-back or forked bundle is what an attacker on the endpoint would
                // serve: the operator must find it in the audit log, not only in a warning.
                let result = format!("refused: {refusal}");
                if let Err(e) = (self.audit)
                    .record(actor, "federation.refresh", &td.id_string(), 0, &result)
                    .await
                {
                    tracing::warn!(trust_domain = %td, error = %e, "could not audit a refused federated bundle");
                }
                Err(refusal)
            }
            Verdict::Replace => {
                let ev = AuditEvent::ok(actor, "federation.refresh", &td.id_string());
                let w = Write::PutForeignBundle(b.clone(), self.clock.unix());
                self.audit.commit(&[w], &[ev]).await?;
                self.write().insert(td, Arc::new(b));
                Ok(true)
            }
        }
    }

    fn relationships_ref(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, std::collections::BTreeMap<TrustDomain, Relationship>> {
        self.relationships.read().unwrap_or_else(|e| e.into_inner())
    }

    fn relationships_mut(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, std::collections::BTreeMap<TrustDomain, Relationship>>
    {
        self.relationships
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(sequence: u64, roots: &[&[u8]]) -> Bundle {
        Bundle {
            trust_domain: TrustDomain::new("peer.test").unwrap(),
            x509_authorities: roots.iter().map(|r| r.to_vec()).collect(),
            jwt_authorities: vec![],
            tainted_x509: vec![],
            tainted_jwt: vec![],
            sequence,
            refresh_hint: 300,
        }
    }

    #[test]
    fn a_newer_sequence_replaces_an_equal_one_must_be_identical() {
        let stored = bundle(5, &[b"a"]);
        assert_eq!(sequence_verdict(None, &stored), Verdict::Replace);
        assert_eq!(
            sequence_verdict(Some(&stored), &bundle(6, &[b"a", b"b"])),
            Verdict::Replace
        );
        assert_eq!(
            sequence_verdict(Some(&stored), &bundle(5, &[b"a"])),
            Verdict::Unchanged
        );
        assert_eq!(
            sequence_verdict(Some(&stored), &bundle(5, &[b"x"])),
            Verdict::Stale
        );
        assert_eq!(
            sequence_verdict(Some(&stored), &bundle(4, &[b"x"])),
            Verdict::Stale
        );
        assert_eq!(
            sequence_verdict(Some(&stored), &bundle(4, &[b"a"])),
            Verdict::Stale,
            "an older sequence is never identical to the stored one"
        );
    }

    #[tokio::test]
    async fn a_stale_fetched_bundle_is_refused_audited_and_the_stored_one_kept() {
        use crate::audit::Audit;
        use crate::datastore::DataStore;
        let (_dir, _url, store) = crate::datastore::scratch_sqlite("stalefed").await;
        let store: Arc<dyn DataStore> = Arc::new(store);
        let clock = Arc::new(continuity_common::ManualClock::new(
            std::time::SystemTime::now(),
        ));
        let audit = Audit::scratch(store.clone(), clock.clone()).await;
        let own = TrustDomain::new("example.org").unwrap();
        let fed = Federation::load(own, store.clone(), store.clone(), audit.clone(), clock)
            .await
            .unwrap();
        let peer = TrustDomain::new("peer.test").unwrap();
        let root = || {
            let kp = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.self_signed(&kp).unwrap().der().to_vec()
        };
        let (a, x) = (root(), root());
        let rel = Relationship {
            trust_domain: peer.clone(),
            bundle_endpoint_url: "https://peer.test/bundle".into(),
            auth: EndpointAuth::HttpsWeb,
        };
        fed.create_relationship(rel, Some(bundle(5, &[&a])), "admin")
            .await
            .unwrap();

        for forged in [bundle(4, &[&x]), bundle(5, &[&x])] {
            let err = fed
                .accept_fetched(forged, "federation-refresher")
                .await
                .unwrap_err();
            assert!(
                matches!(err, FederationError::StaleSequence { stored: 5, .. }),
                "{err}"
            );
            let last = audit.records(1).await.unwrap().pop().unwrap();
            assert_eq!(
                (
                    last.actor.as_str(),
                    last.action.as_str(),
                    last.target.as_str()
                ),
                (
                    "federation-refresher",
                    "federation.refresh",
                    "spiffe://peer.test"
                )
            );
            assert_eq!(last.result, format!("refused: {err}"));
        }
        assert_eq!(fed.bundle(&peer).unwrap().x509_authorities, vec![a.clone()]);
        let stored = store.list_foreign_bundles().await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].sequence, 5);
        assert_eq!(stored[0].x509_authorities, vec![a.clone()]);
    }
}
