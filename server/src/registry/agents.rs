//! Attested agents: the in-memory records, and every read-modify-write of one (attestation,
//! authentication by SVID serial, renewal, ban, eviction) as a compare-and-set on its
//! revision in the datastore.

use std::time::Duration;

use continuity_common::SpiffeId;

use super::{Registry, RegistryError, SERVER_ACTOR};
use crate::audit::AuditEvent;
use crate::datastore::{AgentRecord, Applied, StoreError, Write};

/// Attempts of one agent read-modify-write before giving up under contention.
const AGENT_CAS_ATTEMPTS: usize = 4;

/// What an agent read-modify-write decided to do with the record it was given.
// One value lives briefly per read-modify-write; boxing the record would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AgentChange {
    /// Leave it as it is.
    Keep,
    /// Write this record (a compare-and-set on the revision that was read), with these audit
    /// records in the same transaction.
    Write(AgentRecord, Vec<AuditEvent>),
}

/// Which of its serials an agent authenticated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerialUse {
    /// The current agent SVID.
    Current,
    /// The previous one (before the current was used, or within the grace).
    Previous,
}

impl Registry {
    /// One agent.
    pub fn agent(&self, spiffe_id: &str) -> Option<AgentRecord> {
        self.read().agents.get(spiffe_id).cloned()
    }

    /// Every agent, ordered by ID.
    pub fn agents(&self) -> Vec<AgentRecord> {
        let mut v: Vec<_> = self.read().agents.values().cloned().collect();
        v.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        v
    }

    /// An atomic read-modify-write of one agent record. `read` is what the caller read
    /// earlier (before slow work such as signing); `f` decides from it what to write, and
    /// the write is a compare-and-set on its revision in the datastore. If the record changed
    /// meanwhile (a ban, an eviction, another server), the CAS fails, the record is read
    /// again from the datastore and `f` decides again: so a ban or eviction is never undone
    /// by a write prepared before it. Returns the record as committed (or as `f` kept it).
    pub async fn modify_agent(
        &self,
        id: &SpiffeId,
        read: Option<AgentRecord>,
        mut f: impl FnMut(Option<&AgentRecord>) -> Result<AgentChange, RegistryError>,
    ) -> Result<Option<AgentRecord>, RegistryError> {
        let mut current = read;
        // Deciding from what was read needs no lock: most calls change nothing.
        let mut change = f(current.as_ref())?;
        for attempt in 1..=AGENT_CAS_ATTEMPTS {
            let (mut new, events) = match change {
                AgentChange::Keep => return Ok(current),
                AgentChange::Write(new, events) => (new, events),
            };
            // Writes of this server are serialized, so the index follows commit order.
            let _w = self.writes.lock().await;
            new.spiffe_id = id.clone();
            let write = match &current {
                None => Write::InsertAgent(new),
                Some(cur) => {
                    new.revision = cur.revision;
                    Write::UpdateAgent(new)
                }
            };
            match self.audit.commit(&[write], &events).await {
                Ok(mut applied) => {
                    let Some(Applied::Agent(stored)) = applied.pop() else {
                        return Err(RegistryError::Store(StoreError::Corrupt(
                            "agent write result".into(),
                        )));
                    };
                    self.refresh_agent(id.as_str(), Some(stored.clone()));
                    return Ok(Some(stored));
                }
                Err(StoreError::Conflict(_)) if attempt < AGENT_CAS_ATTEMPTS => {
                    tracing::debug!(agent = %id, "agent record changed since it was read; reading it again");
                    current = self.agents.get_agent(id.as_str()).await?;
                    self.refresh_agent(id.as_str(), current.clone());
                    change = f(current.as_ref())?;
                }
                Err(StoreError::Conflict(_)) => break,
                Err(e) => return Err(RegistryError::Store(e)),
            }
        }
        Err(RegistryError::Contended(id.to_string()))
    }

    pub(super) fn refresh_agent(&self, id: &str, a: Option<AgentRecord>) {
        let mut idx = self.write();
        match a {
            Some(a) => idx.agents.insert(id.to_string(), a),
            None => {
                // Evicted: what it last synced here is forgotten with it.
                self.synced
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(id);
                idx.agents.remove(id)
            }
        };
    }

    /// Authenticates an agent by the serial of the SVID it presented (chain and expiry are
    /// checked by the caller). The current serial is accepted (its first use is recorded
    /// once); the previous one until the current is first used plus the grace. Any other
    /// serial of this agent ID, or the previous after the grace, means two lineages exist:
    /// the agent is flagged forked (audited, counted, logged) and the call refused; the
    /// current lineage keeps working.
    pub async fn authenticate_agent(
        &self,
        id: &SpiffeId,
        serial: &str,
    ) -> Result<(AgentRecord, SerialUse), RegistryError> {
        let now = self.clock.unix();
        let grace = self.previous_svid_grace;
        let mut flagged = None;
        let rec = self
            .modify_agent(id, self.agent(id.as_str()), |cur| {
                let (change, fork) = authentication(cur, id, serial, now, grace)?;
                flagged = fork;
                Ok(change)
            })
            .await?
            .ok_or_else(|| RegistryError::NotAttested(id.to_string()))?;
        if let Some(detail) = flagged {
            self.metrics.inc(&self.metrics.agent_forks);
            tracing::warn!(agent = %id, %detail, "agent identity forked: a superseded agent SVID was presented; ban or evict the agent and re-attest it");
            return Err(RegistryError::Forked(format!("agent {id}: {detail}")));
        }
        let used = if serial == rec.serial {
            SerialUse::Current
        } else {
            SerialUse::Previous
        };
        Ok((rec, used))
    }

    /// Records a renewal: `presented` (the serial the agent authenticated with, read as
    /// `read`) is replaced by `serial`. Refused if the agent was banned or evicted meanwhile,
    /// or if `presented` is no longer renewable (the previous SVID renews only while its
    /// successor has never been used: a lost RenewAgent response).
    pub async fn renew_agent(
        &self,
        read: AgentRecord,
        presented: &str,
        serial: &str,
        expires_at: i64,
    ) -> Result<AgentRecord, RegistryError> {
        let id = read.spiffe_id.clone();
        let now = self.clock.unix();
        self.modify_agent(&id, Some(read), |cur| {
            let a = cur.ok_or_else(|| RegistryError::NotAttested(id.to_string()))?;
            if a.banned {
                return Err(RegistryError::Banned(id.to_string()));
            }
            let renewable = presented == a.serial
                || (presented == a.previous_serial && a.serial_first_used == 0);
            if !renewable {
                return Err(RegistryError::Refused(format!(
                    "agent {id} may renew only with its current SVID"
                )));
            }
            let mut new = a.clone();
            new.previous_serial = presented.to_string();
            new.serial = serial.to_string();
            new.serial_first_used = 0;
            new.expires_at = expires_at;
            new.last_seen = now;
            Ok(AgentChange::Write(new, vec![]))
        })
        .await?
        .ok_or_else(|| RegistryError::NotAttested(id.to_string()))
    }

    /// Records a node attestation of `id` with a freshly signed SVID. `read` is the record
    /// read before signing: a new agent is inserted only if none appeared meanwhile, an
    /// existing one replaced only if it did not change (banned or evicted meanwhile: refused).
    /// A banned agent cannot attest again; a forked flag stays until the agent is evicted.
    /// Replacing an agent whose SVID is unexpired and that was seen within `svid_ttl` (a
    /// live agent) is audited as `agent.takeover` in the same transaction and logged.
    pub async fn attest_agent(
        &self,
        read: Option<AgentRecord>,
        attested: AgentRecord,
        svid_ttl: Duration,
    ) -> Result<AgentRecord, RegistryError> {
        let id = attested.spiffe_id.clone();
        let now = self.clock.unix();
        let ttl = i64::try_from(svid_ttl.as_secs()).unwrap_or(i64::MAX);
        let was_present = read.is_some();
        let mut takeover = None;
        let rec = self
            .modify_agent(&id, read, |cur| {
                takeover = None;
                let mut new = attested.clone();
                new.created_at = now;
                let mut events = vec![];
                match cur {
                    None if was_present => return Err(RegistryError::NotAttested(id.to_string())),
                    None => {}
                    Some(a) if a.banned => return Err(RegistryError::Banned(id.to_string())),
                    Some(a) => {
                        new.created_at = a.created_at;
                        new.forked = a.forked;
                        new.forked_at = a.forked_at;
                        if a.expires_at > now && now.saturating_sub(a.last_seen) <= ttl {
                            let detail = format!(
                                "replaced the live agent's SVID serial {} (last seen {}s ago) with {} by {} attestation",
                                a.serial,
                                now.saturating_sub(a.last_seen),
                                new.serial,
                                new.attestation_type
                            );
                            events.push(
                                AuditEvent::ok(SERVER_ACTOR, "agent.takeover", id.as_str())
                                    .result(format!("ok; {detail}")),
                            );
                            takeover = Some(detail);
                        }
                    }
                }
                Ok(AgentChange::Write(new, events))
            })
            .await?
            .ok_or_else(|| RegistryError::NotAttested(id.to_string()))?;
        if let Some(detail) = takeover {
            tracing::warn!(agent = %id, %detail, "re-attestation took over a node whose agent was live; if that agent was not restarted on purpose, investigate the node");
        }
        Ok(rec)
    }

    /// Bans an agent: every call it makes is refused and it cannot attest again under this
    /// ID. Unconditional: wins over any write in flight. Audited as `actor`.
    pub async fn ban_agent(&self, spiffe_id: &str, actor: &str) -> Result<(), RegistryError> {
        let _w = self.writes.lock().await;
        let ev = AuditEvent::ok(actor, "agent.ban", spiffe_id);
        if let Applied::Agent(a) = self.commit(Write::BanAgent(spiffe_id.into()), ev).await? {
            self.write().agents.insert(a.spiffe_id.to_string(), a);
        }
        Ok(())
    }

    /// Removes an agent; it must attest again (with a new token) to come back.
    /// Unconditional: wins over any write in flight. Audited as `actor`.
    pub async fn evict_agent(&self, spiffe_id: &str, actor: &str) -> Result<(), RegistryError> {
        let _w = self.writes.lock().await;
        let ev = AuditEvent::ok(actor, "agent.evict", spiffe_id);
        self.commit(Write::DeleteAgent(spiffe_id.into()), ev)
            .await?;
        self.write().agents.remove(spiffe_id);
        Ok(())
    }
}

/// What presenting `serial` does to the agent record `cur` at `now` (see
/// [`Registry::authenticate_agent`]): the change to write, and the fork detail when the
/// serial shows a second lineage.
fn authentication(
    cur: Option<&AgentRecord>,
    id: &SpiffeId,
    serial: &str,
    now: i64,
    grace: i64,
) -> Result<(AgentChange, Option<String>), RegistryError> {
    let a = cur.ok_or_else(|| RegistryError::NotAttested(id.to_string()))?;
    if a.banned {
        return Err(RegistryError::Banned(id.to_string()));
    }
    if serial == a.serial {
        if a.serial_first_used != 0 {
            return Ok((AgentChange::Keep, None));
        }
        let mut new = a.clone();
        new.serial_first_used = now;
        new.last_seen = now;
        return Ok((AgentChange::Write(new, vec![]), None));
    }
    let in_grace = a.serial_first_used == 0 || now < a.serial_first_used.saturating_add(grace);
    if serial == a.previous_serial && in_grace {
        return Ok((AgentChange::Keep, None));
    }
    if a.forked {
        return Err(RegistryError::Forked(format!(
            "agent {id} presented superseded SVID serial {serial} (already flagged forked)"
        )));
    }
    let detail = if serial == a.previous_serial {
        format!(
            "serial {serial} presented {}s after its successor {} was first used",
            now - a.serial_first_used,
            a.serial
        )
    } else {
        format!(
            "superseded serial {serial} presented; current {}, previous {}",
            a.serial,
            if a.previous_serial.is_empty() {
                "none"
            } else {
                &a.previous_serial
            }
        )
    };
    let mut new = a.clone();
    new.forked = true;
    new.forked_at = now;
    // The older lineage is refused from now on, whichever serial it shows.
    new.previous_serial = String::new();
    let ev = AuditEvent::ok(SERVER_ACTOR, "agent.forked", id.as_str())
        .result(format!("refused: {detail}"));
    Ok((AgentChange::Write(new, vec![ev]), Some(detail)))
}
