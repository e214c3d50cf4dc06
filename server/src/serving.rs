//! What the agents serve: each agent reports, with every entry sync, the authorities that
//! signed the SVIDs it holds and the bundle sequence it holds. A tainted authority is revoked
//! only once every live agent has reported, at the current bundle, that it no longer serves
//! anything the authority signed (SPIRE's localauthority leaves this to the operator).
//!
//! Reports are kept in the datastore (so any server of a cluster can decide a revoke) and
//! written only when they change: a steady agent costs no write per sync.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use continuity_proto::agent::ServingReport as WireReport;

use crate::ca::AuthorityKind;
use crate::datastore::{AgentRecord, ServingReport, ServingStore, StoreError};

/// At most this many authority IDs of each kind in one report.
pub const MAX_REPORTED_AUTHORITIES: usize = 64;

/// An authority ID is at most this long (a kid; an SKI is 40 hex digits).
const MAX_AUTHORITY_ID_LEN: usize = 128;

/// The serving reports of the agents, written through to the datastore when they change.
#[derive(Debug)]
pub struct ServingReports {
    store: Arc<dyn ServingStore>,
    /// The last report written by this server, per agent.
    written: Mutex<HashMap<String, ServingReport>>,
}

/// Why a revoke must wait: the live agents that may still serve what the authority signed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RevokeBlockers {
    /// Agents that have not reported at the current bundle sequence.
    pub not_reported: Vec<String>,
    /// Agents whose latest report names the authority.
    pub still_serving: Vec<String>,
}

impl RevokeBlockers {
    /// True when nothing blocks the revoke.
    pub fn is_empty(&self) -> bool {
        self.not_reported.is_empty() && self.still_serving.is_empty()
    }

    /// The refusal an operator reads: who blocks, and what to do.
    pub fn describe(&self, kind: &str, id: &str) -> String {
        let names = |v: &[String]| {
            let mut s = v.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > 5 {
                s.push_str(&format!(" and {} more", v.len() - 5));
            }
            s
        };
        let mut parts = Vec::new();
        if !self.still_serving.is_empty() {
            parts.push(format!(
                "{} agent(s) still serve what it signed ({})",
                self.still_serving.len(),
                names(&self.still_serving)
            ));
        }
        if !self.not_reported.is_empty() {
            parts.push(format!(
                "{} agent(s) have not synced since the bundle changed ({})",
                self.not_reported.len(),
                names(&self.not_reported)
            ));
        }
        format!(
            "{kind} authority {id} cannot be revoked yet: {}; wait a sync, evict or ban those agents, or pass --force",
            parts.join("; ")
        )
    }
}

/// Checks a report from the wire; the reason names the bad field.
pub fn check_report(r: &WireReport) -> Result<(), String> {
    for (field, ids) in [
        ("x509_authority_ids", &r.x509_authority_ids),
        ("jwt_authority_ids", &r.jwt_authority_ids),
    ] {
        if ids.len() > MAX_REPORTED_AUTHORITIES {
            return Err(format!(
                "serving.{field} holds more than {MAX_REPORTED_AUTHORITIES} IDs"
            ));
        }
        let bad = |id: &String| {
            id.is_empty()
                || id.len() > MAX_AUTHORITY_ID_LEN
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        };
        if ids.iter().any(bad) {
            return Err(format!(
                "serving.{field}: each ID must be 1 to {MAX_AUTHORITY_ID_LEN} characters of [A-Za-z0-9._-]"
            ));
        }
    }
    if r.bundle_sequence < 0 {
        return Err("serving.bundle_sequence is negative".into());
    }
    Ok(())
}

/// The IDs as stored: sorted, without duplicates.
fn normalized(ids: &[String]) -> Vec<String> {
    let mut v = ids.to_vec();
    v.sort();
    v.dedup();
    v
}

impl ServingReports {
    /// Reports kept in `store`.
    pub fn new(store: Arc<dyn ServingStore>) -> Self {
        Self {
            store,
            written: Mutex::new(HashMap::new()),
        }
    }

    /// Records the (checked) report of `agent_id`, writing it only if it differs from the
    /// last one this server wrote.
    pub async fn record(&self, agent_id: &str, r: &WireReport, now: i64) -> Result<(), StoreError> {
        let report = ServingReport {
            agent_id: agent_id.to_string(),
            bundle_sequence: r.bundle_sequence,
            x509_authorities: normalized(&r.x509_authority_ids),
            jwt_authorities: normalized(&r.jwt_authority_ids),
            reported_at: now,
        };
        let same = |w: &ServingReport| {
            w.bundle_sequence == report.bundle_sequence
                && w.x509_authorities == report.x509_authorities
                && w.jwt_authorities == report.jwt_authorities
        };
        if self.lock().get(agent_id).is_some_and(same) {
            return Ok(());
        }
        self.store.put_serving_report(&report).await?;
        self.lock().insert(agent_id.to_string(), report);
        Ok(())
    }

    /// The live agents (not banned, SVID unexpired) that block revoking authority `id` of
    /// `kind` at bundle `sequence`: those not reported at it, and those still serving `id`.
    /// Reports are read from the datastore, so reports made to other servers count.
    pub async fn blockers(
        &self,
        kind: AuthorityKind,
        id: &str,
        agents: &[AgentRecord],
        sequence: u64,
        now: i64,
    ) -> Result<RevokeBlockers, StoreError> {
        let reports: HashMap<String, ServingReport> = self
            .store
            .list_serving_reports()
            .await?
            .into_iter()
            .map(|r| (r.agent_id.clone(), r))
            .collect();
        let mut out = RevokeBlockers::default();
        for a in agents.iter().filter(|a| !a.banned && a.expires_at > now) {
            let name = a.spiffe_id.to_string();
            match reports.get(&name) {
                Some(r) if u64::try_from(r.bundle_sequence).unwrap_or(0) >= sequence => {
                    // X.509 IDs are hex, equal in any case; JWT kids are compared exactly.
                    let serving = match kind {
                        AuthorityKind::X509 => r
                            .x509_authorities
                            .iter()
                            .any(|s| s.eq_ignore_ascii_case(id)),
                        AuthorityKind::Jwt => r.jwt_authorities.iter().any(|s| s == id),
                    };
                    if serving {
                        out.still_serving.push(name);
                    }
                }
                _ => out.not_reported.push(name),
            }
        }
        Ok(out)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ServingReport>> {
        self.written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::on_both_backends;

    fn live_agent(n: u32, banned: bool, expires_at: i64) -> AgentRecord {
        AgentRecord {
            spiffe_id: continuity_common::SpiffeId::new(&format!(
                "spiffe://example.org/continuity/agent/join_token/{n}"
            ))
            .unwrap(),
            attestation_type: "join_token".into(),
            serial: format!("{n:04x}"),
            previous_serial: String::new(),
            expires_at,
            banned,
            alias: None,
            created_at: 1,
            last_seen: 1,
            revision: 1,
            serial_first_used: 0,
            forked: false,
            forked_at: 0,
            selectors: vec![],
        }
    }

    on_both_backends! {
        /// Only live agents count: one not reported at the current bundle, one still serving
        /// the key and one whose stored report was tampered with block the revoke; a banned
        /// or expired agent, or one reporting other authorities, does not.
        async fn blockers_are_the_live_agents_not_clear_of_the_key(s) {
            let reports = ServingReports::new(Arc::new(s.open_again().await));
            let agents: Vec<AgentRecord> = vec![
                live_agent(1, false, 100), // reports clear at sequence 5
                live_agent(2, false, 100), // reports at sequence 4 only
                live_agent(3, false, 100), // still serves "old"
                live_agent(4, false, 100), // never reports
                live_agent(5, true, 100),  // banned, still serving
                live_agent(6, false, 10),  // expired, still serving
                live_agent(7, false, 100), // its row is tampered with
            ];
            let report = |seq: i64, ids: &[&str]| WireReport {
                bundle_sequence: seq,
                x509_authority_ids: ids.iter().map(|s| s.to_string()).collect(),
                jwt_authority_ids: vec!["old".into()],
            };
            let id = |n: usize| agents[n].spiffe_id.to_string();
            for (n, r) in [
                (0, report(5, &["new"])),
                (1, report(4, &["new"])),
                (2, report(5, &["new", "old"])),
                (4, report(5, &["old"])),
                (5, report(5, &["old"])),
                (6, report(5, &["new"])),
            ] {
                reports.record(&id(n), &r, 50).await.unwrap();
            }
            sqlx::query("UPDATE agent_serving SET bundle_sequence = 9 WHERE agent_id LIKE '%/7'")
                .execute(&s.raw().await)
                .await
                .unwrap();
            let b = reports
                .blockers(AuthorityKind::X509, "old", &agents, 5, 50)
                .await
                .unwrap();
            assert_eq!(b.still_serving, vec![id(2)]);
            assert_eq!(b.not_reported, vec![id(1), id(3), id(6)]);
            // An X.509 ID typed in upper case (as openssl prints it) is the same authority.
            let b = reports
                .blockers(AuthorityKind::X509, "OLD", &agents, 5, 50)
                .await
                .unwrap();
            assert_eq!(b.still_serving, vec![id(2)], "an upper-case ID skipped the check");
            // The JWT side reads its own list: every reporting agent still has the kid.
            let b = reports
                .blockers(AuthorityKind::Jwt, "old", &agents, 5, 50)
                .await
                .unwrap();
            assert_eq!(b.still_serving, vec![id(0), id(2)]);
            // Once each has reported clear at the current bundle, nothing blocks.
            for n in [0, 1, 2, 3, 6] {
                reports.record(&id(n), &report(6, &["new"]), 60).await.unwrap();
            }
            let b = reports
                .blockers(AuthorityKind::X509, "old", &agents, 6, 60)
                .await
                .unwrap();
            assert!(b.is_empty(), "{b:?}");
        }
    }

    fn wire(ids: &[&str]) -> WireReport {
        WireReport {
            bundle_sequence: 3,
            x509_authority_ids: ids.iter().map(|s| s.to_string()).collect(),
            jwt_authority_ids: vec![],
        }
    }

    #[test]
    fn reports_with_bad_ids_or_too_many_are_refused_naming_the_field() {
        assert!(check_report(&wire(&["ab12", "cd34"])).is_ok());
        let err = check_report(&wire(&["ab,12"])).unwrap_err();
        assert!(err.contains("serving.x509_authority_ids"), "{err}");
        assert!(check_report(&wire(&[""])).is_err());
        let many: Vec<String> = (0..=MAX_REPORTED_AUTHORITIES)
            .map(|i| format!("k{i}"))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(
            check_report(&wire(&refs))
                .unwrap_err()
                .contains("more than")
        );
        let mut neg = wire(&[]);
        neg.bundle_sequence = -1;
        assert!(check_report(&neg).is_err());
    }

    #[test]
    fn the_refusal_names_the_blocking_agents_and_the_way_out() {
        let b = RevokeBlockers {
            not_reported: vec!["spiffe://td/a".into()],
            still_serving: (0..7).map(|i| format!("spiffe://td/s{i}")).collect(),
        };
        let msg = b.describe("x509", "abcd");
        assert!(msg.contains("7 agent(s) still serve"), "{msg}");
        assert!(msg.contains("and 2 more"), "{msg}");
        assert!(msg.contains("spiffe://td/a"), "{msg}");
        assert!(msg.contains("--force"), "{msg}");
    }
}
