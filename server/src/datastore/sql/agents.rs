//! Attested agents and join tokens.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{SqlDataStore, Table, id_column, json_list, optional_id_column, to_json};
use crate::datastore::{AgentRecord, AgentStore, Canon, JoinToken, JoinTokenStore, StoreError};

/// The agents table, MACed (ban and fork state and the revision included).
pub(super) const AGENTS: Table = Table {
    name: "agents",
    pk: &["spiffe_id"],
    select: "SELECT spiffe_id, attestation_type, serial, previous_serial, expires_at, banned, alias, created_at, last_seen, revision, serial_first_used, forked, forked_at, selectors, mac FROM agents",
    canon: |r| agent_from_row(r).map(|a| agent_canon(&a)),
};

/// The join tokens, MACed.
pub(super) const JOIN_TOKENS: Table = Table {
    name: "join_tokens",
    pk: &["token_hash"],
    select: "SELECT token_hash, id, alias, expires_at, mac FROM join_tokens",
    canon: |r| join_token_from_row(r).map(|t| join_token_canon(&t)),
};

/// The canonical encoding of an agent row (every column). The node selectors (the last
/// column, added later) are encoded only when present, so rows sealed before they existed
/// still verify.
fn agent_canon(a: &AgentRecord) -> Canon {
    let c = Canon::new("agents")
        .key(a.spiffe_id.as_str())
        .text(&a.attestation_type)
        .text(&a.serial)
        .text(&a.previous_serial)
        .int(a.expires_at)
        .int(i64::from(a.banned))
        .opt_text(a.alias.as_ref().map(|a| a.as_str()))
        .int(a.created_at)
        .int(a.last_seen)
        .int(a.revision)
        .int(a.serial_first_used)
        .int(i64::from(a.forked))
        .int(a.forked_at);
    if a.selectors.is_empty() {
        c
    } else {
        c.text(&to_json(&a.selectors))
    }
}

/// The canonical encoding of a join token row.
fn join_token_canon(t: &JoinToken) -> Canon {
    Canon::new("join_tokens")
        .key(&t.token_hash)
        .text(&t.id)
        .opt_text(t.alias.as_ref().map(|a| a.as_str()))
        .int(t.expires_at)
}

fn join_token_from_row(r: &AnyRow) -> Result<JoinToken, StoreError> {
    let id: String = r.try_get("id")?;
    Ok(JoinToken {
        token_hash: r.try_get("token_hash")?,
        alias: optional_id_column(r, "alias", &format!("join token {id}"))?,
        id,
        expires_at: r.try_get("expires_at")?,
    })
}

/// Replaces every column of an agent row (its revision as given) and its MAC.
const AGENT_WRITE: &str = "UPDATE agents SET attestation_type = $2, serial = $3, previous_serial = $4, expires_at = $5,
     banned = $6, alias = $7, last_seen = $8, serial_first_used = $9, forked = $10, forked_at = $11,
     created_at = $12, revision = $13, mac = $14, selectors = $16
     WHERE spiffe_id = $1 AND revision = $15 RETURNING spiffe_id, attestation_type, serial, previous_serial, expires_at, banned, alias, created_at, last_seen, revision, serial_first_used, forked, forked_at, selectors, mac";

/// The agents table as the record-MAC upgrade (migration 5) seals it: before migration 8
/// added the node selectors (so none; the canonical encoding then omits them).
pub(super) const AGENTS_AT_RECORD_MACS: Table = Table {
    select: "SELECT spiffe_id, attestation_type, serial, previous_serial, expires_at, banned, alias, created_at, last_seen, revision, serial_first_used, forked, forked_at, mac FROM agents",
    canon: |r| agent_fields(r, vec![]).map(|a| agent_canon(&a)),
    ..AGENTS
};

pub(super) fn agent_from_row(r: &AnyRow) -> Result<AgentRecord, StoreError> {
    let selectors = json_list(&r.try_get::<String, _>("selectors")?, "agent selectors")?;
    agent_fields(r, selectors)
}

/// An agent row's columns but its selectors, which are given.
fn agent_fields(
    r: &AnyRow,
    selectors: Vec<continuity_attestors::Selector>,
) -> Result<AgentRecord, StoreError> {
    let row = format!("agent {:?}", r.try_get::<String, _>("spiffe_id")?);
    Ok(AgentRecord {
        spiffe_id: id_column(r, "spiffe_id", &row)?,
        attestation_type: r.try_get("attestation_type")?,
        serial: r.try_get("serial")?,
        previous_serial: r.try_get("previous_serial")?,
        expires_at: r.try_get("expires_at")?,
        banned: r.try_get::<i64, _>("banned")? != 0,
        alias: optional_id_column(r, "alias", &row)?,
        created_at: r.try_get("created_at")?,
        last_seen: r.try_get("last_seen")?,
        revision: r.try_get("revision")?,
        serial_first_used: r.try_get("serial_first_used")?,
        forked: r.try_get::<i64, _>("forked")? != 0,
        forked_at: r.try_get("forked_at")?,
        selectors,
    })
}

impl SqlDataStore {
    pub(super) async fn insert_agent_on(
        &self,
        c: &mut AnyConnection,
        a: &AgentRecord,
    ) -> Result<AgentRecord, StoreError> {
        let mac = self.seal(&agent_canon(&AgentRecord {
            revision: 1,
            ..a.clone()
        }))?;
        let row = sqlx::query(
            "INSERT INTO agents (spiffe_id, attestation_type, serial, previous_serial, expires_at, banned, alias, created_at, last_seen,
             revision, serial_first_used, forked, forked_at, mac, selectors)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $10, $11, $12, $13, $14)
             ON CONFLICT (spiffe_id) DO NOTHING RETURNING spiffe_id, attestation_type, serial, previous_serial, expires_at, banned, alias, created_at, last_seen, revision, serial_first_used, forked, forked_at, selectors, mac",
        )
        .bind(a.spiffe_id.as_str())
        .bind(&a.attestation_type)
        .bind(&a.serial)
        .bind(&a.previous_serial)
        .bind(a.expires_at)
        .bind(a.banned as i64)
        .bind(a.alias.as_ref().map(|a| a.as_str().to_string()))
        .bind(a.created_at)
        .bind(a.last_seen)
        .bind(a.serial_first_used)
        .bind(a.forked as i64)
        .bind(a.forked_at)
        .bind(mac)
        .bind(to_json(&a.selectors))
        .fetch_optional(&mut *c)
        .await?
        .ok_or_else(|| StoreError::Conflict(format!("agent {}", a.spiffe_id)))?;
        agent_from_row(&row)
    }

    /// Compare-and-set: only the revision that was read may be replaced. Every column is
    /// written (from a record read intact), so the new MAC covers nothing unchecked.
    pub(super) async fn update_agent_on(
        &self,
        c: &mut AnyConnection,
        a: &AgentRecord,
    ) -> Result<AgentRecord, StoreError> {
        let next = AgentRecord {
            revision: a.revision + 1,
            ..a.clone()
        };
        let mac = self.seal(&agent_canon(&next))?;
        let row = sqlx::query(AGENT_WRITE)
            .bind(a.spiffe_id.as_str())
            .bind(&a.attestation_type)
            .bind(&a.serial)
            .bind(&a.previous_serial)
            .bind(a.expires_at)
            .bind(a.banned as i64)
            .bind(a.alias.as_ref().map(|a| a.as_str().to_string()))
            .bind(a.last_seen)
            .bind(a.serial_first_used)
            .bind(a.forked as i64)
            .bind(a.forked_at)
            .bind(a.created_at)
            .bind(next.revision)
            .bind(mac)
            .bind(a.revision)
            .bind(to_json(&a.selectors))
            .fetch_optional(&mut *c)
            .await?
            .ok_or_else(|| StoreError::Conflict(format!("agent {}", a.spiffe_id)))?;
        agent_from_row(&row)
    }

    /// Bans an agent unconditionally (wins over any write in flight). The row is read and
    /// checked first: a tampered row is reported, not re-sealed.
    pub(super) async fn ban_agent_on(
        &self,
        c: &mut AnyConnection,
        id: &str,
    ) -> Result<AgentRecord, StoreError> {
        // A concurrent write (PostgreSQL) between the read and the write: read again.
        let mut attempts = 0;
        loop {
            let row = sqlx::query("SELECT spiffe_id, attestation_type, serial, previous_serial, expires_at, banned, alias, created_at, last_seen, revision, serial_first_used, forked, forked_at, selectors, mac FROM agents WHERE spiffe_id = $1")
                .bind(id)
                .fetch_optional(&mut *c)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("agent {id}")))?;
            let current = self.checked(&row, agent_from_row, agent_canon)?;
            let banned = AgentRecord {
                banned: true,
                ..current
            };
            match self.update_agent_on(c, &banned).await {
                Err(StoreError::Conflict(_)) if attempts < 8 => attempts += 1,
                r => return r,
            }
        }
    }

    /// Deletes an agent unconditionally; not found if absent.
    pub(super) async fn delete_agent_on(c: &mut AnyConnection, id: &str) -> Result<(), StoreError> {
        let r = sqlx::query("DELETE FROM agents WHERE spiffe_id = $1")
            .bind(id)
            .execute(&mut *c)
            .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("agent {id}")));
        }
        sqlx::query("DELETE FROM agent_serving WHERE agent_id = $1")
            .bind(id)
            .execute(&mut *c)
            .await?;
        Ok(())
    }

    pub(super) async fn create_join_token_on(
        &self,
        c: &mut AnyConnection,
        t: &JoinToken,
    ) -> Result<(), StoreError> {
        let mac = self.seal(&join_token_canon(t))?;
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, id, alias, expires_at, mac) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&t.token_hash)
        .bind(&t.id)
        .bind(t.alias.as_ref().map(|a| a.as_str().to_string()))
        .bind(t.expires_at)
        .bind(mac)
        .execute(&mut *c)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl AgentStore for SqlDataStore {
    async fn get_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>, StoreError> {
        let row = sqlx::query("SELECT spiffe_id, attestation_type, serial, previous_serial, expires_at, banned, alias, created_at, last_seen, revision, serial_first_used, forked, forked_at, selectors, mac FROM agents WHERE spiffe_id = $1")
            .bind(spiffe_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref()
            .map(|r| self.checked(r, agent_from_row, agent_canon))
            .transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let rows = sqlx::query("SELECT spiffe_id, attestation_type, serial, previous_serial, expires_at, banned, alias, created_at, last_seen, revision, serial_first_used, forked, forked_at, selectors, mac FROM agents ORDER BY spiffe_id")
            .fetch_all(&self.pool)
            .await?;
        self.screen(&rows, agent_from_row, agent_canon)
    }
}

#[async_trait]
impl JoinTokenStore for SqlDataStore {
    async fn create_join_token(&self, t: JoinToken) -> Result<(), StoreError> {
        self.create_join_token_on(&mut *self.pool.acquire().await?, &t)
            .await
    }

    async fn take_join_token(&self, token_hash: &str) -> Result<Option<JoinToken>, StoreError> {
        // One statement: the database guarantees a single winner among concurrent callers. A
        // token whose MAC fails is refused and kept (the transaction is rolled back).
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("DELETE FROM join_tokens WHERE token_hash = $1 RETURNING token_hash, id, alias, expires_at, mac")
            .bind(token_hash)
            .fetch_optional(&mut *tx)
            .await?;
        let token = row
            .map(|r| self.checked(&r, join_token_from_row, join_token_canon))
            .transpose()?;
        tx.commit().await?;
        Ok(token)
    }

    async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM join_tokens WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}
