//! The published snapshot the Workload API reads: the identities (one SVID per entry, shared
//! by every workload that matches it) and the bundle, built from the persisted state.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use continuity_attestors::Selector;
use continuity_common::secret::SecretBytes;

/// The persisted types, where they were before they moved to [`crate::state`].
pub use crate::state::{
    BundleState, EngineJwks, EnginePublicKey, Entry, JwtKey, PersistedState, Svid,
};

/// The bundle in the forms the Workload API sends.
#[derive(Debug, Clone, Default)]
pub struct PublishedBundle {
    /// Sequence number (changes mean "re-send").
    pub sequence: u64,
    /// `spiffe://<td>`.
    pub trust_domain_id: String,
    /// Concatenated DER CA certificates.
    pub x509: Bytes,
    /// JWKS JSON of the JWT keys.
    pub jwks: Bytes,
    /// JWT keys for local validation: (kid, SPKI).
    pub jwt_keys: Vec<(String, Vec<u8>)>,
}

/// One identity a workload may receive: an entry and its current SVID.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Entry id.
    pub entry_id: String,
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// Sorted selectors.
    pub selectors: Vec<Selector>,
    /// Hint.
    pub hint: String,
    /// Concatenated DER chain.
    pub x509_svid: Bytes,
    /// PKCS#8 key (shared with the SVID it came from; wiped when the last holder drops it).
    pub key: SecretBytes,
    /// NotAfter.
    pub expires_at: i64,
    /// Unique per SVID the agent ever held: a changed generation means "send again".
    pub generation: u64,
    /// Engine the entry is bound to.
    pub engine: Option<String>,
    /// When the entry was created: the older of two entries sharing a hint wins.
    pub created_at: i64,
    /// Trust domain IDs (`spiffe://td`) whose bundles the workload receives.
    pub federates_with: Vec<String>,
}

static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Identity {
    /// Whether a workload with `selectors` may have this identity (all of the entry's selectors
    /// are among the workload's).
    pub fn matches(&self, selectors: &HashSet<Selector>) -> bool {
        continuity_common::selector::matches(&self.selectors, selectors)
    }
}

/// What the Workload API serves, replaced whole on every change.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The bundle.
    pub bundle: Arc<PublishedBundle>,
    /// Identities with SVIDs, ordered by entry id.
    pub identities: Vec<Arc<Identity>>,
    /// Engine JWKS by Engine name.
    pub engine_jwks: Arc<BTreeMap<String, EngineJwks>>,
    /// Foreign bundles (X.509 DER and JWKS) by trust domain ID (`spiffe://td`); a workload
    /// receives those its identities federate with ([`Snapshot::federated_for`]).
    pub federated: Arc<BTreeMap<String, Arc<PublishedBundle>>>,
}

impl Snapshot {
    /// Builds the snapshot from persisted state.
    pub fn build(state: &PersistedState, previous: Option<&Snapshot>) -> Snapshot {
        let bundle = match previous {
            Some(p) if p.bundle.sequence == state.bundle.sequence && !p.bundle.x509.is_empty() => {
                p.bundle.clone()
            }
            _ => Arc::new(publish_bundle(&state.bundle)),
        };
        let prev: std::collections::HashMap<&str, &Arc<Identity>> = previous
            .map(|p| {
                p.identities
                    .iter()
                    .map(|i| (i.entry_id.as_str(), i))
                    .collect()
            })
            .unwrap_or_default();
        let mut identities = Vec::with_capacity(state.svids.len());
        for (id, svid) in &state.svids {
            let Some(entry) = state.entries.get(id) else {
                continue;
            };
            // The state file is hostile too: an SVID without a certificate is not served.
            let Some(leaf) = svid.chain.first() else {
                continue;
            };
            // Reuse the previous Arc when nothing changed: cheap diffing by pointer downstream.
            if let Some(p) = prev.get(id.as_str())
                && unchanged(p, entry, svid, leaf)
            {
                identities.push((*p).clone());
                continue;
            }
            identities.push(Arc::new(Identity {
                entry_id: id.clone(),
                spiffe_id: entry.spiffe_id.clone(),
                selectors: entry.selectors.clone(),
                hint: entry.hint.clone(),
                // One certificate (our CAs are roots): share it; longer chains are joined once.
                x509_svid: match svid.chain.as_slice() {
                    [one] => one.clone(),
                    many => Bytes::from(many.concat()),
                },
                key: svid.key.clone(),
                expires_at: svid.expires_at,
                generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                engine: Some(entry.engine.clone()).filter(|e| !e.is_empty()),
                created_at: entry.created_at,
                federates_with: entry.federates_with.clone(),
            }));
        }
        let engine_jwks = match previous {
            Some(p) if *p.engine_jwks == state.engine_jwks => p.engine_jwks.clone(),
            _ => Arc::new(state.engine_jwks.clone()),
        };
        Snapshot {
            bundle,
            identities,
            engine_jwks,
            federated: publish_federated(state),
        }
    }

    /// The identities a Workload API response carries: those [`Snapshot::matching`] finds,
    /// with hints unique (the spec requires it). Of entries sharing a non-empty hint the oldest
    /// is kept (ties: the smaller entry id), as SPIRE does; the others are left out and logged.
    pub fn served(&self, selectors: &HashSet<Selector>) -> Vec<Arc<Identity>> {
        unique_hints(self.matching(selectors))
    }

    /// The foreign bundles a workload holding `ids` receives: those its identities federate
    /// with that the agent holds, by trust domain ID.
    pub fn federated_for(&self, ids: &[Arc<Identity>]) -> BTreeMap<String, Arc<PublishedBundle>> {
        ids.iter()
            .flat_map(|i| i.federates_with.iter())
            .filter_map(|td| self.federated.get(td).map(|b| (td.clone(), b.clone())))
            .collect()
    }

    /// The identities a workload with these selectors may have.
    pub fn matching(&self, selectors: &HashSet<Selector>) -> Vec<Arc<Identity>> {
        self.identities
            .iter()
            .filter(|i| i.matches(selectors))
            .cloned()
            .collect()
    }
}

/// Drops every identity whose non-empty hint an older one (by creation, then entry id) has.
fn unique_hints(ids: Vec<Arc<Identity>>) -> Vec<Arc<Identity>> {
    let mut keep: std::collections::HashMap<&str, &Arc<Identity>> = Default::default();
    for i in ids.iter().filter(|i| !i.hint.is_empty()) {
        let slot = keep.entry(i.hint.as_str()).or_insert(i);
        if (i.created_at, &i.entry_id) < (slot.created_at, &slot.entry_id) {
            *slot = i;
        }
    }
    if keep.len() == ids.iter().filter(|i| !i.hint.is_empty()).count() {
        return ids;
    }
    let winners: HashSet<&str> = keep.values().map(|i| i.entry_id.as_str()).collect();
    let (served, dropped): (Vec<_>, Vec<_>) = ids
        .iter()
        .partition(|i| i.hint.is_empty() || winners.contains(i.entry_id.as_str()));
    for d in dropped {
        tracing::warn!(entry_id = %d.entry_id, hint = %d.hint, "ignoring entry with duplicate hint");
    }
    served.into_iter().cloned().collect()
}

/// Whether the published identity `p` is still what `entry` and `svid` (whose leaf is `leaf`)
/// would make.
fn unchanged(p: &Identity, entry: &Entry, svid: &Svid, leaf: &Bytes) -> bool {
    p.expires_at == svid.expires_at
        && p.spiffe_id == entry.spiffe_id
        && p.selectors == entry.selectors
        && p.hint == entry.hint
        && p.engine.as_deref().unwrap_or("") == entry.engine
        && p.federates_with == entry.federates_with
        && p.x509_svid.len() == svid.chain.iter().map(Bytes::len).sum::<usize>()
        && p.x509_svid.starts_with(leaf)
}

/// The foreign bundles of `state`, in the forms the Workload API sends.
fn publish_federated(state: &PersistedState) -> Arc<BTreeMap<String, Arc<PublishedBundle>>> {
    Arc::new(
        state
            .federated_bundles
            .iter()
            .map(|(id, b)| (id.clone(), Arc::new(publish_bundle(b))))
            .collect(),
    )
}

fn publish_bundle(b: &BundleState) -> PublishedBundle {
    let keys: Vec<_> = b
        .jwt_authorities
        .iter()
        .map(|k| continuity_common::jwk::JwtAuthority {
            key_id: &k.kid,
            public_key: &k.public_key,
        })
        .collect();
    let jwks = continuity_common::jwk::jwt_jwks(&keys)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| "{\"keys\":[]}".into());
    PublishedBundle {
        sequence: b.sequence,
        trust_domain_id: format!("spiffe://{}", b.trust_domain),
        x509: Bytes::from(b.x509_authorities.concat()),
        jwks: Bytes::from(jwks),
        jwt_keys: b
            .jwt_authorities
            .iter()
            .map(|k| (k.kid.clone(), k.public_key.clone()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_keys_never_print_and_survive_the_state_file() {
        let key = b"PKCS8-PRIVATE-KEY-BYTES".to_vec();
        let svid = Svid {
            chain: vec![Bytes::from_static(b"cert")],
            key: SecretBytes::new(key.clone()),
            expires_at: 2,
            issued_at: 1,
            rotate_at: 1,
        };
        let state = PersistedState {
            agent_svid: Some(svid.clone()),
            svids: [("e".to_string(), svid.clone())].into(),
            ..Default::default()
        };
        for shown in [format!("{svid:?}"), format!("{state:?}")] {
            assert!(!shown.contains("PKCS8"), "{shown}");
            assert!(shown.contains("redacted"), "{shown}");
        }
        let json = serde_json::to_string(&state).unwrap();
        let back: PersistedState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.agent_svid.as_ref().unwrap().key.expose(), &key[..]);
        let snap = Snapshot::build(&back, None);
        for id in &snap.identities {
            assert!(!format!("{id:?}").contains("PKCS8"));
        }
    }

    fn state_with(chain: Vec<Bytes>) -> PersistedState {
        let mut st = PersistedState::default();
        st.entries.insert(
            "e1".into(),
            Entry {
                id: "e1".into(),
                spiffe_id: "spiffe://example.org/w".into(),
                selectors: vec![Selector::raw("unix", "uid:0")],
                x509_svid_ttl: 0,
                jwt_svid_ttl: 0,
                hint: String::new(),
                engine: String::new(),
                revision: 1,
                created_at: 0,
                federates_with: vec![],
            },
        );
        st.svids.insert(
            "e1".into(),
            Svid {
                chain,
                key: SecretBytes::new(b"k".to_vec()),
                expires_at: 10,
                issued_at: 0,
                rotate_at: 5,
            },
        );
        st
    }

    #[test]
    fn a_state_file_svid_without_certificates_is_skipped_not_a_panic() {
        let st = state_with(vec![]);
        let first = Snapshot::build(&st, None);
        assert!(first.identities.is_empty());
        // The rebuild compares with the previous snapshot: it used to index chain[0].
        let second = Snapshot::build(&st, Some(&first));
        assert!(second.identities.is_empty());
    }

    #[test]
    fn an_unchanged_svid_keeps_its_identity() {
        let st = state_with(vec![Bytes::from_static(b"leaf"), Bytes::from_static(b"ca")]);
        let first = Snapshot::build(&st, None);
        let second = Snapshot::build(&st, Some(&first));
        assert_eq!(second.identities.len(), 1);
        assert!(Arc::ptr_eq(&first.identities[0], &second.identities[0]));
        assert_eq!(&second.identities[0].x509_svid[..], b"leafca");
    }
}
