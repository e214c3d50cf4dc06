//! Attested agents and join tokens.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{SqlDataStore, id_column, optional_id_column};
use crate::datastore::{AgentRecord, AgentStore, JoinToken, JoinTokenStore, StoreError};

pub(super) fn agent_from_row(r: &AnyRow) -> Result<AgentRecord, StoreError> {
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
    })
}

impl SqlDataStore {
    pub(super) async fn insert_agent_on(
        c: &mut AnyConnection,
        a: &AgentRecord,
    ) -> Result<AgentRecord, StoreError> {
        let row = sqlx::query(
            "INSERT INTO agents (spiffe_id, attestation_type, serial, previous_serial, expires_at, banned, alias, created_at, last_seen,
             revision, serial_first_used, forked, forked_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $10, $11, $12)
             ON CONFLICT (spiffe_id) DO NOTHING RETURNING *",
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
        .fetch_optional(&mut *c)
        .await?
        .ok_or_else(|| StoreError::Conflict(format!("agent {}", a.spiffe_id)))?;
        agent_from_row(&row)
    }

    /// Compare-and-set: only the revision that was read may be replaced.
    pub(super) async fn update_agent_on(
        c: &mut AnyConnection,
        a: &AgentRecord,
    ) -> Result<AgentRecord, StoreError> {
        let row = sqlx::query(
            "UPDATE agents SET attestation_type = $2, serial = $3, previous_serial = $4, expires_at = $5,
             banned = $6, alias = $7, last_seen = $8, serial_first_used = $9, forked = $10, forked_at = $11,
             revision = revision + 1
             WHERE spiffe_id = $1 AND revision = $12 RETURNING *",
        )
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
        .bind(a.revision)
        .fetch_optional(&mut *c)
        .await?
        .ok_or_else(|| StoreError::Conflict(format!("agent {}", a.spiffe_id)))?;
        agent_from_row(&row)
    }

    /// Bans an agent unconditionally.
    pub(super) async fn ban_agent_on(
        c: &mut AnyConnection,
        id: &str,
    ) -> Result<AgentRecord, StoreError> {
        let row = sqlx::query(
            "UPDATE agents SET banned = 1, revision = revision + 1 WHERE spiffe_id = $1 RETURNING *",
        )
        .bind(id)
        .fetch_optional(&mut *c)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("agent {id}")))?;
        agent_from_row(&row)
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
        Ok(())
    }

    pub(super) async fn create_join_token_on(
        c: &mut AnyConnection,
        t: &JoinToken,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, id, alias, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&t.token_hash)
        .bind(&t.id)
        .bind(t.alias.as_ref().map(|a| a.as_str().to_string()))
        .bind(t.expires_at)
        .execute(&mut *c)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl AgentStore for SqlDataStore {
    async fn get_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM agents WHERE spiffe_id = $1")
            .bind(spiffe_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM agents ORDER BY spiffe_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(agent_from_row).collect()
    }
}

#[async_trait]
impl JoinTokenStore for SqlDataStore {
    async fn create_join_token(&self, t: JoinToken) -> Result<(), StoreError> {
        Self::create_join_token_on(&mut *self.pool.acquire().await?, &t).await
    }

    async fn take_join_token(&self, token_hash: &str) -> Result<Option<JoinToken>, StoreError> {
        // One statement: the database guarantees a single winner among concurrent callers.
        let row = sqlx::query("DELETE FROM join_tokens WHERE token_hash = $1 RETURNING token_hash, id, alias, expires_at")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let id: String = r.try_get("id")?;
            Ok(JoinToken {
                token_hash: r.try_get("token_hash")?,
                alias: optional_id_column(&r, "alias", &format!("join token {id}"))?,
                id,
                expires_at: r.try_get("expires_at")?,
            })
        })
        .transpose()
    }

    async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM join_tokens WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}
