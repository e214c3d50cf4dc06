//! Engines, Engine keys, key versions (and their encryption reservations), secrets and
//! incarnations.

use async_trait::async_trait;
use sqlx::{AnyConnection, Row};

use super::{SqlDataStore, json_list, parse, to_json};
use crate::datastore::{EngineStore, StoreError};
use crate::model::engine::{Engine, EngineKey, Incarnation, KeyVersion, Secret};

impl SqlDataStore {
    pub(super) async fn put_engine_on(c: &mut AnyConnection, e: &Engine) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO engines (name, spiffe_id, tier, custody, exposure_override, created_at) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (name) DO UPDATE SET spiffe_id = $2, tier = $3, custody = $4, exposure_override = $5",
        )
        .bind(&e.name)
        .bind(&e.spiffe_id)
        .bind(e.tier as i64)
        .bind(e.custody.as_str())
        .bind(e.exposure_override as i64)
        .bind(e.created_at)
        .execute(&mut *c)
        .await?;
        Ok(())
    }

    pub(super) async fn put_engine_key_on(
        c: &mut AnyConnection,
        k: &EngineKey,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO engine_keys (engine, name, algorithm, custody, primary_version, rotation_period, destroy_grace, next_rotation_at, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (engine, name) DO UPDATE SET primary_version = $5, rotation_period = $6, destroy_grace = $7, next_rotation_at = $8",
        )
        .bind(&k.engine)
        .bind(&k.name)
        .bind(k.algorithm.as_str())
        .bind(k.custody.as_str())
        .bind(k.primary_version as i64)
        .bind(k.rotation_period)
        .bind(k.destroy_grace)
        .bind(k.next_rotation_at)
        .bind(k.created_at)
        .execute(&mut *c)
        .await?;
        Ok(())
    }

    pub(super) async fn put_key_version_on(
        c: &mut AnyConnection,
        v: &KeyVersion,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO engine_key_versions (engine, key_name, version, state, kid, public_key, sealed, mechanism, hsm_id, created_at, destroy_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (engine, key_name, version) DO UPDATE SET state = $4, sealed = $7, destroy_at = $11",
        )
        .bind(&v.engine)
        .bind(&v.key)
        .bind(v.version as i64)
        .bind(v.state.as_str())
        .bind(&v.kid)
        .bind(v.public_key.clone())
        .bind(v.sealed.clone())
        .bind(&v.mechanism)
        .bind(&v.hsm_id)
        .bind(v.created_at)
        .bind(v.destroy_at)
        .execute(&mut *c)
        .await?;
        Ok(())
    }

    pub(super) async fn put_secret_on(
        c: &mut AnyConnection,
        sec: &Secret,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO engine_secrets (engine, name, version, sealed, mechanism, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&sec.engine)
        .bind(&sec.name)
        .bind(sec.version as i64)
        .bind(sec.sealed.clone())
        .bind(&sec.mechanism)
        .bind(sec.created_at)
        .execute(&mut *c)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl EngineStore for SqlDataStore {
    async fn put_engine(&self, e: &Engine) -> Result<(), StoreError> {
        Self::put_engine_on(&mut *self.pool.acquire().await?, e).await
    }

    async fn list_engines(&self) -> Result<Vec<Engine>, StoreError> {
        let rows = sqlx::query("SELECT * FROM engines ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Engine {
                    name: r.try_get("name")?,
                    spiffe_id: r.try_get("spiffe_id")?,
                    tier: r.try_get::<i64, _>("tier")? as i32,
                    custody: parse(r.try_get::<String, _>("custody")?)?,
                    exposure_override: r.try_get::<i64, _>("exposure_override")? != 0,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    async fn put_engine_key(&self, k: &EngineKey) -> Result<(), StoreError> {
        Self::put_engine_key_on(&mut *self.pool.acquire().await?, k).await
    }

    async fn list_engine_keys(&self) -> Result<Vec<EngineKey>, StoreError> {
        let rows = sqlx::query("SELECT * FROM engine_keys ORDER BY engine, name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(EngineKey {
                    engine: r.try_get("engine")?,
                    name: r.try_get("name")?,
                    algorithm: parse(r.try_get::<String, _>("algorithm")?)?,
                    custody: parse(r.try_get::<String, _>("custody")?)?,
                    primary_version: r.try_get::<i64, _>("primary_version")? as u32,
                    rotation_period: r.try_get("rotation_period")?,
                    destroy_grace: r.try_get("destroy_grace")?,
                    next_rotation_at: r.try_get("next_rotation_at")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    async fn put_key_version(&self, v: &KeyVersion) -> Result<(), StoreError> {
        Self::put_key_version_on(&mut *self.pool.acquire().await?, v).await
    }

    async fn list_key_versions(&self) -> Result<Vec<KeyVersion>, StoreError> {
        let rows =
            sqlx::query("SELECT * FROM engine_key_versions ORDER BY engine, key_name, version")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(KeyVersion {
                    engine: r.try_get("engine")?,
                    key: r.try_get("key_name")?,
                    version: r.try_get::<i64, _>("version")? as u32,
                    state: parse(r.try_get::<String, _>("state")?)?,
                    kid: r.try_get("kid")?,
                    public_key: r.try_get("public_key")?,
                    sealed: r.try_get("sealed")?,
                    mechanism: r.try_get("mechanism")?,
                    hsm_id: r.try_get("hsm_id")?,
                    created_at: r.try_get("created_at")?,
                    destroy_at: r.try_get("destroy_at")?,
                    encryptions: r.try_get::<i64, _>("encryptions_reserved")?.max(0) as u64,
                })
            })
            .collect()
    }

    async fn reserve_encryptions(
        &self,
        engine: &str,
        key: &str,
        version: u32,
        block: u64,
    ) -> Result<u64, StoreError> {
        let block = i64::try_from(block)
            .map_err(|_| StoreError::Corrupt(format!("encryption block {block} too large")))?;
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE engine_key_versions SET encryptions_reserved = encryptions_reserved + $1
             WHERE engine = $2 AND key_name = $3 AND version = $4",
        )
        .bind(block)
        .bind(engine)
        .bind(key)
        .bind(version as i64)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(StoreError::NotFound(format!(
                "version {version} of {engine}/{key}"
            )));
        }
        let total: i64 = sqlx::query_scalar(
            "SELECT encryptions_reserved FROM engine_key_versions
             WHERE engine = $1 AND key_name = $2 AND version = $3",
        )
        .bind(engine)
        .bind(key)
        .bind(version as i64)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(total.max(0) as u64)
    }

    async fn put_secret(&self, sec: &Secret) -> Result<(), StoreError> {
        Self::put_secret_on(&mut *self.pool.acquire().await?, sec).await
    }

    async fn list_secrets(&self) -> Result<Vec<Secret>, StoreError> {
        let rows = sqlx::query("SELECT * FROM engine_secrets ORDER BY engine, name, version")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Secret {
                    engine: r.try_get("engine")?,
                    name: r.try_get("name")?,
                    version: r.try_get::<i64, _>("version")? as u32,
                    sealed: r.try_get("sealed")?,
                    mechanism: r.try_get("mechanism")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    async fn upsert_incarnation(&self, i: &Incarnation) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO incarnations (engine, entry_id, agent_id, workload_id, pid, uid, selectors, first_seen, last_seen)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (engine, entry_id, agent_id, workload_id) DO UPDATE SET last_seen = $9",
        )
        .bind(&i.engine)
        .bind(&i.entry_id)
        .bind(&i.agent_id)
        .bind(&i.workload_id)
        .bind(i.pid as i64)
        .bind(i.uid as i64)
        .bind(to_json(&i.selectors))
        .bind(i.first_seen)
        .bind(i.last_seen)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_incarnations(&self, engine: &str) -> Result<Vec<Incarnation>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM incarnations WHERE engine = $1 ORDER BY first_seen, workload_id",
        )
        .bind(engine)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Incarnation {
                    engine: r.try_get("engine")?,
                    entry_id: r.try_get("entry_id")?,
                    agent_id: r.try_get("agent_id")?,
                    workload_id: r.try_get("workload_id")?,
                    pid: r.try_get::<i64, _>("pid")? as u32,
                    uid: r.try_get::<i64, _>("uid")? as u32,
                    selectors: json_list(
                        &r.try_get::<String, _>("selectors")?,
                        "incarnation selectors",
                    )?,
                    first_seen: r.try_get("first_seen")?,
                    last_seen: r.try_get("last_seen")?,
                })
            })
            .collect()
    }
}
