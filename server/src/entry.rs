//! Registration entries, the domain rules they obey, and their tombstones.
//!
//! An entry reaches the server as strings (from the admin API); [`EntryRequest::validate`] is
//! the one place that turns those into an [`Entry`], so every path that creates or replaces an
//! entry applies the same rules. IDs are [`SpiffeId`]s from then on.

use continuity_attestors::Selector;
use continuity_common::{SpiffeId, SpiffeIdError, TrustDomain};

/// Why an entry (or an ID given with it) is refused. Every variant but [`Self::NoSuchEngine`]
/// is the caller's malformed input.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// A SPIFFE ID field does not parse.
    #[error("{field}: {source}")]
    Id {
        /// The field (`spiffe_id`, `parent_id`).
        field: &'static str,
        /// Why it does not parse.
        source: SpiffeIdError,
    },
    /// A SPIFFE ID field names another trust domain.
    #[error("{field}: {id} is not in trust domain {trust_domain}")]
    ForeignId {
        /// The field.
        field: &'static str,
        /// The ID given.
        id: SpiffeId,
        /// The server's trust domain.
        trust_domain: TrustDomain,
    },
    /// A workload SPIFFE ID without a path (the trust domain's own ID).
    #[error("spiffe_id: a workload ID needs a path")]
    NoPath,
    /// A workload SPIFFE ID under the path reserved for agents and the server.
    #[error("spiffe_id: {0} is under /continuity/, which is reserved for agents and the server")]
    Reserved(SpiffeId),
    /// No selector: the entry would match nothing (or, worse, everything).
    #[error("at least one selector is required (e.g. unix:uid:1000)")]
    NoSelectors,
    /// A selector is malformed.
    #[error("{0}")]
    Selector(#[from] continuity_attestors::SelectorError),
    /// A negative TTL.
    #[error("SVID TTLs must not be negative")]
    NegativeTtl,
    /// A DNS SAN that is not a DNS name.
    #[error("dns_name {0:?} is not a valid DNS name")]
    DnsName(String),
    /// A federated trust domain that does not parse.
    #[error("federates_with: {0}")]
    FederatesWith(SpiffeIdError),
    /// A node alias entry's selectors are not node selectors of a cluster.
    #[error(
        "a node entry (--node) needs a k8s_psat:cluster:NAME selector and only k8s_psat selectors ({NODE_SELECTOR_KEYS:?}); got {0}"
    )]
    NodeSelectors(String),
    /// The entry is bound to an Engine that does not exist.
    #[error("engine {0:?} does not exist; create it with `engine create`")]
    NoSuchEngine(String),
}

/// The parent path that makes an entry a node alias entry (SPIRE's `-node`): its SPIFFE ID
/// is an alias for every agent whose node selectors include the entry's selectors.
pub const NODE_PARENT_PATH: &str = "/continuity/server";

/// The `k8s_psat:` selector keys node attestation produces (what a node entry may use).
pub const NODE_SELECTOR_KEYS: &[&str] = &[
    "cluster",
    "agent_ns",
    "agent_sa",
    "agent_pod_name",
    "agent_pod_uid",
    "agent_node_name",
    "agent_node_uid",
    "agent_node_label",
    "agent_pod_label",
];

/// A registration entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Stable id.
    pub id: String,
    /// The SPIFFE ID workloads matching this entry receive.
    pub spiffe_id: SpiffeId,
    /// The agent (or node alias) this entry is for.
    pub parent_id: SpiffeId,
    /// All must match the workload.
    pub selectors: Vec<Selector>,
    /// X509-SVID TTL in seconds; 0 = server default.
    pub x509_svid_ttl: i32,
    /// JWT-SVID TTL in seconds; 0 = server default.
    pub jwt_svid_ttl: i32,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Hint passed to workloads.
    pub hint: String,
    /// Whether the workload gets admin rights.
    pub admin: bool,
    /// Engine the entry is bound to, if any.
    pub engine: Option<String>,
    /// Trust domains the workload federates with.
    pub federates_with: Vec<String>,
    /// Revision at which the entry last changed.
    pub revision: i64,
    /// Creation time, Unix seconds.
    pub created_at: i64,
}

impl Entry {
    /// Whether this is a node alias entry (parented to the server's ID).
    pub fn is_node(&self) -> bool {
        self.parent_id.path() == NODE_PARENT_PATH
    }

    /// Whether `other` registers the same identity: same SPIFFE ID, same parent, same
    /// selectors (in any order).
    pub fn same_registration(&self, other: &Entry) -> bool {
        if self.spiffe_id != other.spiffe_id || self.parent_id != other.parent_id {
            return false;
        }
        let mut a: Vec<&Selector> = self.selectors.iter().collect();
        let mut b: Vec<&Selector> = other.selectors.iter().collect();
        a.sort();
        b.sort();
        a == b
    }
}

/// An entry deletion (or move to another parent), kept so incremental syncs can report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    /// The removed entry.
    pub entry_id: String,
    /// The parent it was removed from.
    pub parent_id: SpiffeId,
    /// Revision of the removal.
    pub revision: i64,
}

/// An entry as an operator asks for it: the strings as they came, not yet checked.
#[derive(Debug, Clone, Default)]
pub struct EntryRequest {
    /// Id of the entry to replace (empty when creating).
    pub id: String,
    /// The workload SPIFFE ID.
    pub spiffe_id: String,
    /// The agent or node alias SPIFFE ID.
    pub parent_id: String,
    /// Selectors as (type, value).
    pub selectors: Vec<(String, String)>,
    /// X509-SVID TTL in seconds; 0 = server default.
    pub x509_svid_ttl: i32,
    /// JWT-SVID TTL in seconds; 0 = server default.
    pub jwt_svid_ttl: i32,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Hint passed to workloads.
    pub hint: String,
    /// Whether the workload gets admin rights.
    pub admin: bool,
    /// Engine to bind (empty: none).
    pub engine: String,
    /// Trust domains the workload federates with.
    pub federates_with: Vec<String>,
}

impl EntryRequest {
    /// Checks the request against the entry rules of `trust_domain` and turns it into an
    /// [`Entry`] (revision and creation time are left for the registry). `engine_exists` says
    /// whether an Engine of that name exists. The first rule broken is the error.
    pub fn validate(
        self,
        trust_domain: &TrustDomain,
        engine_exists: impl Fn(&str) -> bool,
    ) -> Result<Entry, EntryError> {
        let spiffe_id = workload_id(trust_domain, &self.spiffe_id)?;
        let parent_id = id_in_domain(trust_domain, "parent_id", &self.parent_id)?;
        if self.selectors.is_empty() {
            return Err(EntryError::NoSelectors);
        }
        let selectors = self
            .selectors
            .iter()
            .map(|(kind, value)| Selector::new(kind, value))
            .collect::<Result<Vec<_>, _>>()?;
        if parent_id.path() == NODE_PARENT_PATH {
            check_node_selectors(&selectors)?;
        }
        if self.x509_svid_ttl < 0 || self.jwt_svid_ttl < 0 {
            return Err(EntryError::NegativeTtl);
        }
        if let Some(bad) = self.dns_names.iter().find(|d| !is_dns_name(d)) {
            return Err(EntryError::DnsName(bad.clone()));
        }
        for td in &self.federates_with {
            TrustDomain::new(td).map_err(EntryError::FederatesWith)?;
        }
        let engine = match self.engine.as_str() {
            "" => None,
            name if engine_exists(name) => Some(self.engine),
            name => return Err(EntryError::NoSuchEngine(name.to_string())),
        };
        Ok(Entry {
            id: self.id,
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: self.x509_svid_ttl,
            jwt_svid_ttl: self.jwt_svid_ttl,
            dns_names: self.dns_names,
            hint: self.hint,
            admin: self.admin,
            engine,
            federates_with: self.federates_with,
            revision: 0,
            created_at: 0,
        })
    }
}

/// Parses `value` (the field `field`) as a SPIFFE ID in `trust_domain`.
pub fn id_in_domain(
    trust_domain: &TrustDomain,
    field: &'static str,
    value: &str,
) -> Result<SpiffeId, EntryError> {
    let id = SpiffeId::new(value).map_err(|source| EntryError::Id { field, source })?;
    if id.trust_domain() != *trust_domain {
        return Err(EntryError::ForeignId {
            field,
            id,
            trust_domain: trust_domain.clone(),
        });
    }
    Ok(id)
}

/// A node entry's selectors: `k8s_psat:` ones of the keys node attestation produces, one of
/// them the cluster (a node alias never spans clusters by accident).
fn check_node_selectors(selectors: &[Selector]) -> Result<(), EntryError> {
    fn key(s: &Selector) -> Option<&str> {
        (s.kind == continuity_attestors::k8s_psat::ATTESTOR_TYPE)
            .then(|| s.value.split_once(':').map(|(k, _)| k))
            .flatten()
    }
    let bad = selectors
        .iter()
        .find(|s| key(s).is_none_or(|k| !NODE_SELECTOR_KEYS.contains(&k)));
    if let Some(s) = bad {
        return Err(EntryError::NodeSelectors(format!("{}:{}", s.kind, s.value)));
    }
    if !selectors.iter().any(|s| key(s) == Some("cluster")) {
        return Err(EntryError::NodeSelectors(
            "no k8s_psat:cluster: selector".into(),
        ));
    }
    Ok(())
}

/// A workload SPIFFE ID: in the trust domain, with a path, not under `/continuity/`.
fn workload_id(trust_domain: &TrustDomain, value: &str) -> Result<SpiffeId, EntryError> {
    let id = id_in_domain(trust_domain, "spiffe_id", value)?;
    if id.path().is_empty() {
        return Err(EntryError::NoPath);
    }
    if id.path().starts_with("/continuity/") {
        return Err(EntryError::Reserved(id));
    }
    Ok(id)
}

/// A DNS name for a SAN: at most 253 bytes of labels (1–63 letters, digits and inner
/// hyphens), the first of which may be `*`.
fn is_dns_name(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').enumerate().all(|(i, l)| {
            (i == 0 && l == "*")
                || (!l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        })
}

/// Which entries a listing wants: empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    /// Only entries with this SPIFFE ID.
    pub spiffe_id: String,
    /// Only entries with this parent.
    pub parent_id: String,
    /// Only entries that have all of these selectors.
    pub selectors: Vec<Selector>,
}

impl EntryFilter {
    /// Whether `e` passes the filter.
    pub fn matches(&self, e: &Entry) -> bool {
        (self.spiffe_id.is_empty() || e.spiffe_id.as_str() == self.spiffe_id)
            && (self.parent_id.is_empty() || e.parent_id.as_str() == self.parent_id)
            && continuity_common::selector::subset(&self.selectors, &e.selectors)
    }
}

#[cfg(test)]
#[path = "entry_tests.rs"]
mod tests;
