//! Engines, Engine keys, key versions (and their encryption reservations), secrets and
//! incarnations.
//!
//! Every row is MACed (see `integrity`); writes store every column from a record that was
//! read intact, and a write that keeps stored columns (a key version's reservations, an
//! incarnation's first sighting) reads and checks the row first, so no tampered column is
//! ever re-sealed.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{SqlDataStore, Table, json_list, parse, to_json};
use crate::datastore::{Canon, EngineStore, StoreError};
use crate::model::engine::{Engine, EngineKey, Incarnation, KeyVersion, Secret};

/// The Engines table, MACed.
pub(super) const ENGINES: Table = Table {
    name: "engines",
    pk: &["name"],
    select: "SELECT name, spiffe_id, tier, custody, exposure_override, created_at, mac FROM engines",
    canon: |r| engine_from_row(r).map(|e| engine_canon(&e)),
};

/// The Engine keys, MACed (custody included).
pub(super) const ENGINE_KEYS: Table = Table {
    name: "engine_keys",
    pk: &["engine", "name"],
    select: "SELECT engine, name, algorithm, custody, primary_version, rotation_period, destroy_grace, next_rotation_at, created_at, mac FROM engine_keys",
    canon: |r| engine_key_from_row(r).map(|k| engine_key_canon(&k)),
};

/// The Engine secrets, MACed.
pub(super) const SECRETS: Table = Table {
    name: "engine_secrets",
    pk: &["engine", "name", "version"],
    select: "SELECT engine, name, version, sealed, mechanism, created_at, mac FROM engine_secrets",
    canon: |r| secret_from_row(r).map(|s| secret_canon(&s)),
};

/// The incarnations, MACed.
pub(super) const INCARNATIONS: Table = Table {
    name: "incarnations",
    pk: &["engine", "entry_id", "agent_id", "workload_id"],
    select: "SELECT engine, entry_id, agent_id, workload_id, pid, uid, selectors, first_seen, last_seen, mac FROM incarnations",
    canon: |r| incarnation_from_row(r).map(|i| incarnation_canon(&i)),
};

fn engine_canon(e: &Engine) -> Canon {
    Canon::new("engines")
        .key(&e.name)
        .text(&e.spiffe_id)
        .int(i64::from(e.tier))
        .text(e.custody.as_str())
        .int(i64::from(e.exposure_override))
        .int(e.created_at)
}

fn engine_key_canon(k: &EngineKey) -> Canon {
    Canon::new("engine_keys")
        .key(&k.engine)
        .key(&k.name)
        .text(k.algorithm.as_str())
        .text(k.custody.as_str())
        .int(i64::from(k.primary_version))
        .int(k.rotation_period)
        .int(k.destroy_grace)
        .int(k.next_rotation_at)
        .int(k.created_at)
}

fn secret_canon(s: &Secret) -> Canon {
    Canon::new("engine_secrets")
        .key(&s.engine)
        .key(&s.name)
        .key_int(i64::from(s.version))
        .bytes(&s.sealed)
        .text(&s.mechanism)
        .int(s.created_at)
}

fn incarnation_canon(i: &Incarnation) -> Canon {
    Canon::new("incarnations")
        .key(&i.engine)
        .key(&i.entry_id)
        .key(&i.agent_id)
        .key(&i.workload_id)
        .int(i64::from(i.pid))
        .int(i64::from(i.uid))
        .text(&to_json(&i.selectors))
        .int(i.first_seen)
        .int(i.last_seen)
}

fn engine_from_row(r: &AnyRow) -> Result<Engine, StoreError> {
    Ok(Engine {
        name: r.try_get("name")?,
        spiffe_id: r.try_get("spiffe_id")?,
        tier: r.try_get::<i64, _>("tier")? as i32,
        custody: parse(r.try_get::<String, _>("custody")?)?,
        exposure_override: r.try_get::<i64, _>("exposure_override")? != 0,
        created_at: r.try_get("created_at")?,
    })
}

fn engine_key_from_row(r: &AnyRow) -> Result<EngineKey, StoreError> {
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
}

fn secret_from_row(r: &AnyRow) -> Result<Secret, StoreError> {
    Ok(Secret {
        engine: r.try_get("engine")?,
        name: r.try_get("name")?,
        version: r.try_get::<i64, _>("version")? as u32,
        sealed: r.try_get("sealed")?,
        mechanism: r.try_get("mechanism")?,
        created_at: r.try_get("created_at")?,
    })
}

fn incarnation_from_row(r: &AnyRow) -> Result<Incarnation, StoreError> {
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
}

impl SqlDataStore {
    pub(super) async fn put_engine_on(
        &self,
        c: &mut AnyConnection,
        e: &Engine,
    ) -> Result<(), StoreError> {
        let mac = self.seal(&engine_canon(e))?;
        sqlx::query(
            "INSERT INTO engines (name, spiffe_id, tier, custody, exposure_override, created_at, mac) VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (name) DO UPDATE SET spiffe_id = $2, tier = $3, custody = $4, exposure_override = $5,
             created_at = $6, mac = $7",
        )
        .bind(&e.name)
        .bind(&e.spiffe_id)
        .bind(e.tier as i64)
        .bind(e.custody.as_str())
        .bind(e.exposure_override as i64)
        .bind(e.created_at)
        .bind(mac)
        .execute(&mut *c)
        .await?;
        Ok(())
    }

    pub(super) async fn put_engine_key_on(
        &self,
        c: &mut AnyConnection,
        k: &EngineKey,
    ) -> Result<(), StoreError> {
        let mac = self.seal(&engine_key_canon(k))?;
        sqlx::query(
            "INSERT INTO engine_keys (engine, name, algorithm, custody, primary_version, rotation_period, destroy_grace, next_rotation_at, created_at, mac)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (engine, name) DO UPDATE SET algorithm = $3, custody = $4, primary_version = $5,
             rotation_period = $6, destroy_grace = $7, next_rotation_at = $8, created_at = $9, mac = $10",
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
        .bind(mac)
        .execute(&mut *c)
        .await?;
        Ok(())
    }

    pub(super) async fn put_secret_on(
        &self,
        c: &mut AnyConnection,
        sec: &Secret,
    ) -> Result<(), StoreError> {
        let mac = self.seal(&secret_canon(sec))?;
        sqlx::query(
            "INSERT INTO engine_secrets (engine, name, version, sealed, mechanism, created_at, mac) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&sec.engine)
        .bind(&sec.name)
        .bind(sec.version as i64)
        .bind(sec.sealed.clone())
        .bind(&sec.mechanism)
        .bind(sec.created_at)
        .bind(mac)
        .execute(&mut *c)
        .await?;
        Ok(())
    }

    /// Writes an incarnation (every column) and its MAC: over the stored row (`replace`), or
    /// as a new row unless one exists (false if one did: a concurrent first sighting).
    async fn write_incarnation(
        &self,
        c: &mut AnyConnection,
        i: &Incarnation,
        replace: bool,
    ) -> Result<bool, StoreError> {
        let mac = self.seal(&incarnation_canon(i))?;
        let sql = if replace {
            "INSERT INTO incarnations (engine, entry_id, agent_id, workload_id, pid, uid, selectors, first_seen, last_seen, mac)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (engine, entry_id, agent_id, workload_id) DO UPDATE SET pid = $5, uid = $6,
             selectors = $7, first_seen = $8, last_seen = $9, mac = $10"
        } else {
            "INSERT INTO incarnations (engine, entry_id, agent_id, workload_id, pid, uid, selectors, first_seen, last_seen, mac)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (engine, entry_id, agent_id, workload_id) DO NOTHING"
        };
        let done = sqlx::query(sql)
            .bind(&i.engine)
            .bind(&i.entry_id)
            .bind(&i.agent_id)
            .bind(&i.workload_id)
            .bind(i.pid as i64)
            .bind(i.uid as i64)
            .bind(to_json(&i.selectors))
            .bind(i.first_seen)
            .bind(i.last_seen)
            .bind(mac)
            .execute(&mut *c)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The stored incarnation `i` names, read (checked) and, on PostgreSQL, locked.
    async fn stored_incarnation(
        &self,
        c: &mut AnyConnection,
        i: &Incarnation,
    ) -> Result<Option<Incarnation>, StoreError> {
        let lock = if self.sqlite { "" } else { " FOR UPDATE" };
        let row = sqlx::query(&format!(
            "SELECT engine, entry_id, agent_id, workload_id, pid, uid, selectors, first_seen, last_seen, mac FROM incarnations WHERE engine = $1 AND entry_id = $2 AND agent_id = $3 AND workload_id = $4{lock}"
        ))
        .bind(&i.engine)
        .bind(&i.entry_id)
        .bind(&i.agent_id)
        .bind(&i.workload_id)
        .fetch_optional(&mut *c)
        .await?;
        row.map(|r| self.checked(&r, incarnation_from_row, incarnation_canon))
            .transpose()
    }
}

#[async_trait]
impl EngineStore for SqlDataStore {
    async fn put_engine(&self, e: &Engine) -> Result<(), StoreError> {
        self.put_engine_on(&mut *self.pool.acquire().await?, e)
            .await
    }

    async fn list_engines(&self) -> Result<Vec<Engine>, StoreError> {
        let rows = sqlx::query("SELECT name, spiffe_id, tier, custody, exposure_override, created_at, mac FROM engines ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        self.screen(&rows, engine_from_row, engine_canon)
    }

    async fn put_engine_key(&self, k: &EngineKey) -> Result<(), StoreError> {
        self.put_engine_key_on(&mut *self.pool.acquire().await?, k)
            .await
    }

    async fn list_engine_keys(&self) -> Result<Vec<EngineKey>, StoreError> {
        let rows = sqlx::query("SELECT engine, name, algorithm, custody, primary_version, rotation_period, destroy_grace, next_rotation_at, created_at, mac FROM engine_keys ORDER BY engine, name")
            .fetch_all(&self.pool)
            .await?;
        self.screen(&rows, engine_key_from_row, engine_key_canon)
    }

    async fn put_key_version(&self, v: &KeyVersion) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        self.put_key_version_on(&mut tx, v, false).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_endorsements(
        &self,
    ) -> Result<Vec<crate::model::engine::Endorsement>, StoreError> {
        self.list_endorsements_all().await
    }

    async fn get_import_job(
        &self,
        id: &str,
    ) -> Result<Option<crate::model::engine::ImportJob>, StoreError> {
        self.get_import_job_checked(id).await
    }

    async fn list_import_jobs(&self) -> Result<Vec<crate::model::engine::ImportJob>, StoreError> {
        self.list_import_jobs_all().await
    }

    async fn list_key_versions(&self) -> Result<Vec<KeyVersion>, StoreError> {
        self.list_key_versions_all().await
    }

    async fn reserve_encryptions(
        &self,
        engine: &str,
        key: &str,
        version: u32,
        block: u64,
    ) -> Result<u64, StoreError> {
        self.reserve_encryptions_on(engine, key, version, block)
            .await
    }

    async fn put_secret(&self, sec: &Secret) -> Result<(), StoreError> {
        self.put_secret_on(&mut *self.pool.acquire().await?, sec)
            .await
    }

    async fn list_secrets(&self) -> Result<Vec<Secret>, StoreError> {
        let rows = sqlx::query("SELECT engine, name, version, sealed, mechanism, created_at, mac FROM engine_secrets ORDER BY engine, name, version")
            .fetch_all(&self.pool)
            .await?;
        self.screen(&rows, secret_from_row, secret_canon)
    }

    async fn upsert_incarnation(&self, i: &Incarnation) -> Result<(), StoreError> {
        // Sightings merge: the earliest first_seen and the latest last_seen are kept, whatever
        // order concurrent sightings commit in. The stored row is read (checked) and locked
        // first; a first sighting racing another one finds its row and merges into it.
        let mut tx = self.pool.begin().await?;
        if self.sqlite {
            // Take SQLite's write lock before the read (see AuditStore::apply).
            sqlx::query("UPDATE meta SET value = value WHERE name = 'entry_revision'")
                .execute(&mut *tx)
                .await?;
        }
        for _ in 0..3 {
            if let Some(stored) = self.stored_incarnation(&mut tx, i).await? {
                let next = Incarnation {
                    first_seen: stored.first_seen.min(i.first_seen),
                    last_seen: stored.last_seen.max(i.last_seen),
                    ..stored
                };
                self.write_incarnation(&mut tx, &next, true).await?;
                tx.commit().await?;
                return Ok(());
            }
            if self.write_incarnation(&mut tx, i, false).await? {
                tx.commit().await?;
                return Ok(());
            }
        }
        Err(StoreError::Conflict(format!(
            "incarnation {}/{}/{}",
            i.engine, i.entry_id, i.workload_id
        )))
    }

    async fn list_incarnations(&self, engine: &str) -> Result<Vec<Incarnation>, StoreError> {
        let rows = sqlx::query(
            "SELECT engine, entry_id, agent_id, workload_id, pid, uid, selectors, first_seen, last_seen, mac FROM incarnations WHERE engine = $1 ORDER BY first_seen, workload_id",
        )
        .bind(engine)
        .fetch_all(&self.pool)
        .await?;
        self.screen(&rows, incarnation_from_row, incarnation_canon)
    }
}
