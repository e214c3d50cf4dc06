//! [`DataStore`] over sqlx's `Any` driver: SQLite (default) and PostgreSQL share every query.

use std::path::Path;

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Row};

use crate::engines::model::{Engine, EngineKey, Incarnation, KeyVersion, Secret};

use super::{
    AgentRecord, Applied, AuditRecord, CaKeyRecord, CaKeyState, DataStore, Entry, JoinToken,
    KeyPurpose, StoreError, Tombstone, Write,
};

/// Schema migrations, in order; `{BLOB}` becomes the dialect's binary type.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
    "CREATE TABLE entries (
        id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, parent_id TEXT NOT NULL,
        selectors TEXT NOT NULL, x509_svid_ttl BIGINT NOT NULL, jwt_svid_ttl BIGINT NOT NULL,
        dns_names TEXT NOT NULL, hint TEXT NOT NULL, admin BIGINT NOT NULL, engine TEXT,
        federates_with TEXT NOT NULL, revision BIGINT NOT NULL, created_at BIGINT NOT NULL);
    CREATE INDEX entries_parent ON entries (parent_id);
    CREATE TABLE entry_tombstones (entry_id TEXT NOT NULL, parent_id TEXT NOT NULL, revision BIGINT NOT NULL);
    CREATE TABLE join_tokens (token_hash TEXT PRIMARY KEY, id TEXT NOT NULL, alias TEXT, expires_at BIGINT NOT NULL);
    CREATE TABLE agents (
        spiffe_id TEXT PRIMARY KEY, attestation_type TEXT NOT NULL, serial TEXT NOT NULL,
        previous_serial TEXT NOT NULL, expires_at BIGINT NOT NULL, banned BIGINT NOT NULL,
        alias TEXT, created_at BIGINT NOT NULL, last_seen BIGINT NOT NULL);
    CREATE TABLE ca_keys (
        key_id TEXT PRIMARY KEY, purpose TEXT NOT NULL, state TEXT NOT NULL, key_type TEXT NOT NULL,
        cert_der {BLOB} NOT NULL, public_key {BLOB} NOT NULL, kid TEXT NOT NULL,
        not_before BIGINT NOT NULL, not_after BIGINT NOT NULL);
    CREATE TABLE meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO meta (name, value) VALUES ('entry_revision', 0);
    INSERT INTO meta (name, value) VALUES ('bundle_sequence', 0)",
    ),
    (
        2,
        "CREATE TABLE engines (
        name TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, tier BIGINT NOT NULL, custody TEXT NOT NULL,
        exposure_override BIGINT NOT NULL, created_at BIGINT NOT NULL);
    CREATE TABLE engine_keys (
        engine TEXT NOT NULL, name TEXT NOT NULL, algorithm TEXT NOT NULL, custody TEXT NOT NULL,
        primary_version BIGINT NOT NULL, rotation_period BIGINT NOT NULL, destroy_grace BIGINT NOT NULL,
        next_rotation_at BIGINT NOT NULL, created_at BIGINT NOT NULL, PRIMARY KEY (engine, name));
    CREATE TABLE engine_key_versions (
        engine TEXT NOT NULL, key_name TEXT NOT NULL, version BIGINT NOT NULL, state TEXT NOT NULL,
        kid TEXT NOT NULL, public_key {BLOB} NOT NULL, sealed {BLOB}, mechanism TEXT NOT NULL,
        hsm_id TEXT NOT NULL, created_at BIGINT NOT NULL, destroy_at BIGINT NOT NULL,
        PRIMARY KEY (engine, key_name, version));
    CREATE TABLE engine_secrets (
        engine TEXT NOT NULL, name TEXT NOT NULL, version BIGINT NOT NULL, sealed {BLOB} NOT NULL,
        mechanism TEXT NOT NULL, created_at BIGINT NOT NULL, PRIMARY KEY (engine, name, version));
    CREATE TABLE incarnations (
        engine TEXT NOT NULL, entry_id TEXT NOT NULL, agent_id TEXT NOT NULL, workload_id TEXT NOT NULL,
        pid BIGINT NOT NULL, uid BIGINT NOT NULL, selectors TEXT NOT NULL,
        first_seen BIGINT NOT NULL, last_seen BIGINT NOT NULL,
        PRIMARY KEY (engine, entry_id, agent_id, workload_id));
    CREATE TABLE audit_log (
        seq BIGINT PRIMARY KEY, time BIGINT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        target TEXT NOT NULL, key_version BIGINT NOT NULL, result TEXT NOT NULL,
        prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
    INSERT INTO meta (name, value) VALUES ('audit_head', 0)",
    ),
    (
        3,
        "ALTER TABLE agents ADD COLUMN revision BIGINT NOT NULL DEFAULT 1;
    ALTER TABLE agents ADD COLUMN serial_first_used BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN forked BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN forked_at BIGINT NOT NULL DEFAULT 0",
    ),
    (
        4,
        // Encryptions reserved per key version (AES-GCM nonce budget), in blocks, before use.
        "ALTER TABLE engine_key_versions ADD COLUMN encryptions_reserved BIGINT NOT NULL DEFAULT 0",
    ),
];

/// SQL datastore (SQLite or PostgreSQL, chosen by the URL).
#[derive(Debug, Clone)]
pub struct SqlDataStore {
    pool: AnyPool,
    sqlite: bool,
}

impl SqlDataStore {
    /// Connects (creating the SQLite file and its directory as needed) and migrates the schema.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        // The directory of a SQLite file is private (0700) and refused if another user could
        // have made or changed it; a bare file name lives in the working directory.
        if sqlite
            && let Some(dir) = sqlite_path(url).as_deref().and_then(Path::parent)
            && !dir.as_os_str().is_empty()
        {
            continuity_common::fsperm::secure_dir(dir, 0o700, "datastore directory")
                .map_err(|e| StoreError::Io(e.to_string()))?;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 16 })
            .connect(url)
            .await?;
        if sqlite {
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
        }
        let store = Self { pool, sqlite };
        store.migrate(if sqlite { "BLOB" } else { "BYTEA" }).await?;
        Ok(store)
    }

    async fn migrate(&self, blob: &str) -> Result<(), StoreError> {
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)")
            .execute(&self.pool)
            .await?;
        for (version, sql) in MIGRATIONS {
            let done: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(*version)
                    .fetch_optional(&self.pool)
                    .await?;
            if done.is_some() {
                continue;
            }
            let wrap = |source| StoreError::Migration {
                version: *version,
                source,
            };
            let mut tx = self.pool.begin().await.map_err(wrap)?;
            for stmt in sql
                .replace("{BLOB}", blob)
                .split(';')
                .filter(|s| !s.trim().is_empty())
            {
                sqlx::query(stmt).execute(&mut *tx).await.map_err(wrap)?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(*version)
                .bind(continuity_common::clock::unix_seconds(
                    std::time::SystemTime::now(),
                ))
                .execute(&mut *tx)
                .await
                .map_err(wrap)?;
            tx.commit().await.map_err(wrap)?;
            tracing::info!(version, "datastore schema migrated");
        }
        Ok(())
    }
}

fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| path.into())
}

fn json_list<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<Vec<T>, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn entry_from_row(r: &AnyRow) -> Result<Entry, StoreError> {
    Ok(Entry {
        id: r.try_get("id")?,
        spiffe_id: r.try_get("spiffe_id")?,
        parent_id: r.try_get("parent_id")?,
        selectors: json_list(&r.try_get::<String, _>("selectors")?, "entry selectors")?,
        x509_svid_ttl: r.try_get::<i64, _>("x509_svid_ttl")? as i32,
        jwt_svid_ttl: r.try_get::<i64, _>("jwt_svid_ttl")? as i32,
        dns_names: json_list(&r.try_get::<String, _>("dns_names")?, "entry dns_names")?,
        hint: r.try_get("hint")?,
        admin: r.try_get::<i64, _>("admin")? != 0,
        engine: r.try_get("engine")?,
        federates_with: json_list(
            &r.try_get::<String, _>("federates_with")?,
            "entry federates_with",
        )?,
        revision: r.try_get("revision")?,
        created_at: r.try_get("created_at")?,
    })
}

fn agent_from_row(r: &AnyRow) -> Result<AgentRecord, StoreError> {
    Ok(AgentRecord {
        spiffe_id: r.try_get("spiffe_id")?,
        attestation_type: r.try_get("attestation_type")?,
        serial: r.try_get("serial")?,
        previous_serial: r.try_get("previous_serial")?,
        expires_at: r.try_get("expires_at")?,
        banned: r.try_get::<i64, _>("banned")? != 0,
        alias: r.try_get("alias")?,
        created_at: r.try_get("created_at")?,
        last_seen: r.try_get("last_seen")?,
        revision: r.try_get("revision")?,
        serial_first_used: r.try_get("serial_first_used")?,
        forked: r.try_get::<i64, _>("forked")? != 0,
        forked_at: r.try_get("forked_at")?,
    })
}

fn ca_key_from_row(r: &AnyRow) -> Result<CaKeyRecord, StoreError> {
    let purpose = match r.try_get::<String, _>("purpose")?.as_str() {
        "x509" => KeyPurpose::X509,
        "jwt" => KeyPurpose::Jwt,
        other => return Err(StoreError::Corrupt(format!("CA key purpose {other:?}"))),
    };
    let state = match r.try_get::<String, _>("state")?.as_str() {
        "prepared" => CaKeyState::Prepared,
        "active" => CaKeyState::Active,
        "retired" => CaKeyState::Retired,
        other => return Err(StoreError::Corrupt(format!("CA key state {other:?}"))),
    };
    Ok(CaKeyRecord {
        key_id: r.try_get("key_id")?,
        purpose,
        state,
        key_type: r.try_get("key_type")?,
        cert_der: r.try_get("cert_der")?,
        public_key: r.try_get("public_key")?,
        kid: r.try_get("kid")?,
        not_before: r.try_get("not_before")?,
        not_after: r.try_get("not_after")?,
    })
}

const ENTRY_UPSERT: &str = "INSERT INTO entries (id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl,
    dns_names, hint, admin, engine, federates_with, revision, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
    ON CONFLICT (id) DO UPDATE SET spiffe_id = $2, parent_id = $3, selectors = $4, x509_svid_ttl = $5,
    jwt_svid_ttl = $6, dns_names = $7, hint = $8, admin = $9, engine = $10, federates_with = $11, revision = $12";

impl SqlDataStore {
    async fn bump(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        name: &str,
    ) -> Result<i64, StoreError> {
        let v: i64 =
            sqlx::query_scalar("UPDATE meta SET value = value + 1 WHERE name = $1 RETURNING value")
                .bind(name)
                .fetch_one(&mut **tx)
                .await?;
        Ok(v)
    }

    async fn write_entry(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        e: &Entry,
    ) -> Result<(), StoreError> {
        sqlx::query(ENTRY_UPSERT)
            .bind(&e.id)
            .bind(&e.spiffe_id)
            .bind(&e.parent_id)
            .bind(to_json(&e.selectors))
            .bind(e.x509_svid_ttl as i64)
            .bind(e.jwt_svid_ttl as i64)
            .bind(to_json(&e.dns_names))
            .bind(&e.hint)
            .bind(e.admin as i64)
            .bind(e.engine.clone())
            .bind(to_json(&e.federates_with))
            .bind(e.revision)
            .bind(e.created_at)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn tombstone(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        t: &Tombstone,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO entry_tombstones (entry_id, parent_id, revision) VALUES ($1, $2, $3)",
        )
        .bind(&t.entry_id)
        .bind(&t.parent_id)
        .bind(t.revision)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn get_entry_tx(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        id: &str,
    ) -> Result<Entry, StoreError> {
        let row = sqlx::query("SELECT * FROM entries WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("entry {id}")))?;
        entry_from_row(&row)
    }

    async fn create_entry_tx(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        mut entry: Entry,
    ) -> Result<Entry, StoreError> {
        entry.revision = Self::bump(tx, "entry_revision").await?;
        Self::write_entry(tx, &entry).await?;
        Ok(entry)
    }

    async fn update_entry_tx(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        mut entry: Entry,
    ) -> Result<(Entry, Option<Tombstone>), StoreError> {
        let old = Self::get_entry_tx(tx, &entry.id).await?;
        entry.revision = Self::bump(tx, "entry_revision").await?;
        entry.created_at = old.created_at;
        let moved = (old.parent_id != entry.parent_id).then(|| Tombstone {
            entry_id: old.id.clone(),
            parent_id: old.parent_id.clone(),
            revision: entry.revision,
        });
        if let Some(t) = &moved {
            Self::tombstone(tx, t).await?;
        }
        Self::write_entry(tx, &entry).await?;
        Ok((entry, moved))
    }

    async fn delete_entry_tx(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        id: &str,
    ) -> Result<(Entry, Tombstone), StoreError> {
        let old = Self::get_entry_tx(tx, id).await?;
        let revision = Self::bump(tx, "entry_revision").await?;
        sqlx::query("DELETE FROM entries WHERE id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?;
        let t = Tombstone {
            entry_id: old.id.clone(),
            parent_id: old.parent_id.clone(),
            revision,
        };
        Self::tombstone(tx, &t).await?;
        Ok((old, t))
    }

    async fn insert_agent_on(
        c: &mut AnyConnection,
        a: &AgentRecord,
    ) -> Result<AgentRecord, StoreError> {
        let row = sqlx::query(
            "INSERT INTO agents (spiffe_id, attestation_type, serial, previous_serial, expires_at, banned, alias, created_at, last_seen,
             revision, serial_first_used, forked, forked_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $10, $11, $12)
             ON CONFLICT (spiffe_id) DO NOTHING RETURNING *",
        )
        .bind(&a.spiffe_id)
        .bind(&a.attestation_type)
        .bind(&a.serial)
        .bind(&a.previous_serial)
        .bind(a.expires_at)
        .bind(a.banned as i64)
        .bind(a.alias.clone())
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
    async fn update_agent_on(
        c: &mut AnyConnection,
        a: &AgentRecord,
    ) -> Result<AgentRecord, StoreError> {
        let row = sqlx::query(
            "UPDATE agents SET attestation_type = $2, serial = $3, previous_serial = $4, expires_at = $5,
             banned = $6, alias = $7, last_seen = $8, serial_first_used = $9, forked = $10, forked_at = $11,
             revision = revision + 1
             WHERE spiffe_id = $1 AND revision = $12 RETURNING *",
        )
        .bind(&a.spiffe_id)
        .bind(&a.attestation_type)
        .bind(&a.serial)
        .bind(&a.previous_serial)
        .bind(a.expires_at)
        .bind(a.banned as i64)
        .bind(a.alias.clone())
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

    async fn apply_tx(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        w: &Write,
    ) -> Result<Applied, StoreError> {
        Ok(match w {
            Write::CreateEntry(e) => {
                Applied::Entry(Self::create_entry_tx(tx, e.clone()).await?, None)
            }
            Write::UpdateEntry(e) => {
                let (e, t) = Self::update_entry_tx(tx, e.clone()).await?;
                Applied::Entry(e, t)
            }
            Write::DeleteEntry(id) => {
                let (e, t) = Self::delete_entry_tx(tx, id).await?;
                Applied::Entry(e, Some(t))
            }
            Write::CreateJoinToken(t) => {
                Self::create_join_token_on(tx, t).await?;
                Applied::Done
            }
            Write::InsertAgent(a) => Applied::Agent(Self::insert_agent_on(tx, a).await?),
            Write::UpdateAgent(a) => Applied::Agent(Self::update_agent_on(tx, a).await?),
            Write::BanAgent(id) => {
                let row = sqlx::query(
                    "UPDATE agents SET banned = 1, revision = revision + 1 WHERE spiffe_id = $1 RETURNING *",
                )
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("agent {id}")))?;
                Applied::Agent(agent_from_row(&row)?)
            }
            Write::DeleteAgent(id) => {
                let r = sqlx::query("DELETE FROM agents WHERE spiffe_id = $1")
                    .bind(id)
                    .execute(&mut **tx)
                    .await?;
                if r.rows_affected() == 0 {
                    return Err(StoreError::NotFound(format!("agent {id}")));
                }
                Applied::Done
            }
            Write::PutEngine(e) => {
                Self::put_engine_on(tx, e).await?;
                Applied::Done
            }
            Write::PutEngineKey(k) => {
                Self::put_engine_key_on(tx, k).await?;
                Applied::Done
            }
            Write::PutKeyVersion(v) => {
                Self::put_key_version_on(tx, v).await?;
                Applied::Done
            }
            Write::PutSecret(sec) => {
                Self::put_secret_on(tx, sec).await?;
                Applied::Done
            }
        })
    }

    async fn append_audit_on(
        c: &mut AnyConnection,
        records: &[AuditRecord],
    ) -> Result<(), StoreError> {
        let Some(last) = records.last() else {
            return Ok(());
        };
        for a in records {
            sqlx::query(
                "INSERT INTO audit_log (seq, time, actor, action, target, key_version, result, prev_hash, hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(a.seq)
            .bind(a.time)
            .bind(&a.actor)
            .bind(&a.action)
            .bind(&a.target)
            .bind(a.key_version as i64)
            .bind(&a.result)
            .bind(&a.prev_hash)
            .bind(&a.hash)
            .execute(&mut *c)
            .await?;
        }
        sqlx::query("UPDATE meta SET value = $1 WHERE name = 'audit_head'")
            .bind(last.seq)
            .execute(&mut *c)
            .await?;
        Ok(())
    }

    async fn put_engine_on(c: &mut AnyConnection, e: &Engine) -> Result<(), StoreError> {
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

    async fn put_engine_key_on(c: &mut AnyConnection, k: &EngineKey) -> Result<(), StoreError> {
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

    async fn put_key_version_on(c: &mut AnyConnection, v: &KeyVersion) -> Result<(), StoreError> {
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

    async fn put_secret_on(c: &mut AnyConnection, sec: &Secret) -> Result<(), StoreError> {
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

    async fn create_join_token_on(c: &mut AnyConnection, t: &JoinToken) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, id, alias, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&t.token_hash)
        .bind(&t.id)
        .bind(t.alias.clone())
        .bind(t.expires_at)
        .execute(&mut *c)
        .await?;
        Ok(())
    }

    async fn meta(&self, name: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT value FROM meta WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?)
    }
}

#[async_trait]
impl DataStore for SqlDataStore {
    async fn create_entry(&self, entry: Entry) -> Result<Entry, StoreError> {
        let mut tx = self.pool.begin().await?;
        let entry = Self::create_entry_tx(&mut tx, entry).await?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn update_entry(&self, entry: Entry) -> Result<(Entry, Option<Tombstone>), StoreError> {
        let mut tx = self.pool.begin().await?;
        let r = Self::update_entry_tx(&mut tx, entry).await?;
        tx.commit().await?;
        Ok(r)
    }

    async fn delete_entry(&self, id: &str) -> Result<(Entry, Tombstone), StoreError> {
        let mut tx = self.pool.begin().await?;
        let r = Self::delete_entry_tx(&mut tx, id).await?;
        tx.commit().await?;
        Ok(r)
    }

    async fn list_entries(&self) -> Result<Vec<Entry>, StoreError> {
        let rows = sqlx::query("SELECT * FROM entries ORDER BY revision")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn list_tombstones(&self) -> Result<Vec<Tombstone>, StoreError> {
        let rows = sqlx::query(
            "SELECT entry_id, parent_id, revision FROM entry_tombstones ORDER BY revision",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Tombstone {
                    entry_id: r.try_get("entry_id")?,
                    parent_id: r.try_get("parent_id")?,
                    revision: r.try_get("revision")?,
                })
            })
            .collect()
    }

    async fn entry_revision(&self) -> Result<i64, StoreError> {
        self.meta("entry_revision").await
    }

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
            Ok(JoinToken {
                token_hash: r.try_get("token_hash")?,
                id: r.try_get("id")?,
                alias: r.try_get("alias")?,
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

    async fn put_ca_key(&self, k: &CaKeyRecord) -> Result<(), StoreError> {
        let purpose = match k.purpose {
            KeyPurpose::X509 => "x509",
            KeyPurpose::Jwt => "jwt",
        };
        let state = match k.state {
            CaKeyState::Prepared => "prepared",
            CaKeyState::Active => "active",
            CaKeyState::Retired => "retired",
        };
        sqlx::query(
            "INSERT INTO ca_keys (key_id, purpose, state, key_type, cert_der, public_key, kid, not_before, not_after)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (key_id) DO UPDATE SET state = $3",
        )
        .bind(&k.key_id)
        .bind(purpose)
        .bind(state)
        .bind(&k.key_type)
        .bind(k.cert_der.clone())
        .bind(k.public_key.clone())
        .bind(&k.kid)
        .bind(k.not_before)
        .bind(k.not_after)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_ca_key(&self, key_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM ca_keys WHERE key_id = $1")
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list_ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM ca_keys ORDER BY not_before")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(ca_key_from_row).collect()
    }

    async fn next_bundle_sequence(&self) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let v = Self::bump(&mut tx, "bundle_sequence").await?;
        tx.commit().await?;
        Ok(v as u64)
    }

    async fn bundle_sequence(&self) -> Result<u64, StoreError> {
        Ok(self.meta("bundle_sequence").await? as u64)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

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

    async fn apply(
        &self,
        writes: &[Write],
        audit: &[AuditRecord],
    ) -> Result<Vec<Applied>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if self.sqlite {
            // Take SQLite's write lock first (waiting on busy_timeout) so a transaction that
            // reads before it writes cannot fail at once with SQLITE_BUSY on the upgrade.
            sqlx::query("UPDATE meta SET value = value WHERE name = 'audit_head'")
                .execute(&mut *tx)
                .await?;
        }
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            out.push(Self::apply_tx(&mut tx, w).await?);
        }
        Self::append_audit_on(&mut tx, audit)
            .await
            .map_err(|e| StoreError::Audit(e.to_string()))?;
        tx.commit().await?;
        Ok(out)
    }

    async fn append_audit_batch(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        Self::append_audit_on(&mut tx, records).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit_head(&self) -> Result<i64, StoreError> {
        self.meta("audit_head").await
    }

    async fn list_audit(&self) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM audit_log ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditRecord {
                    seq: r.try_get("seq")?,
                    time: r.try_get("time")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    key_version: r.try_get::<i64, _>("key_version")? as u32,
                    result: r.try_get("result")?,
                    prev_hash: r.try_get("prev_hash")?,
                    hash: r.try_get("hash")?,
                })
            })
            .collect()
    }
}

fn parse<T: std::str::FromStr<Err = String>>(s: String) -> Result<T, StoreError> {
    s.parse().map_err(StoreError::Corrupt)
}

/// A throwaway SQLite datastore for unit tests: a fresh directory under the system temp dir
/// named after `what` (remove it when done), the store's URL, and the store.
#[cfg(test)]
pub(crate) async fn scratch_sqlite(what: &str) -> (std::path::PathBuf, String, SqlDataStore) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "continuity-{what}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let url = format!("sqlite://{}?mode=rwc", dir.join("ds.sqlite3").display());
    let store = SqlDataStore::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("scratch datastore {url}: {e}"));
    (dir, url, store)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (SqlDataStore, std::path::PathBuf) {
        let (dir, _, store) = scratch_sqlite("ds").await;
        (store, dir)
    }

    fn entry(id: &str, parent: &str) -> Entry {
        Entry {
            id: id.into(),
            spiffe_id: "spiffe://example.org/w".into(),
            parent_id: parent.into(),
            selectors: vec![continuity_attestors::Selector::raw("unix", "uid:1000")],
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            dns_names: vec![],
            hint: String::new(),
            admin: false,
            engine: None,
            federates_with: vec![],
            revision: 0,
            created_at: 1,
        }
    }

    #[tokio::test]
    async fn entries_revisions_and_tombstones() {
        let (s, dir) = store().await;
        let a = s
            .create_entry(entry("a", "spiffe://example.org/p1"))
            .await
            .unwrap();
        let b = s
            .create_entry(entry("b", "spiffe://example.org/p1"))
            .await
            .unwrap();
        assert!(b.revision > a.revision);
        let mut moved = b.clone();
        moved.parent_id = "spiffe://example.org/p2".into();
        let (_, t) = s.update_entry(moved).await.unwrap();
        assert_eq!(t.unwrap().parent_id, "spiffe://example.org/p1");
        let (_, t) = s.delete_entry("a").await.unwrap();
        assert_eq!(t.entry_id, "a");
        assert_eq!(s.list_entries().await.unwrap().len(), 1);
        assert_eq!(s.list_tombstones().await.unwrap().len(), 2);
        assert!(matches!(
            s.delete_entry("a").await,
            Err(StoreError::NotFound(_))
        ));
        // Reopening migrates nothing twice and keeps the data.
        let url = format!("sqlite://{}?mode=rwc", dir.join("ds.sqlite3").display());
        let s2 = SqlDataStore::connect(&url).await.unwrap();
        assert_eq!(s2.entry_revision().await.unwrap(), 4);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn join_token_taken_once() {
        let (s, dir) = store().await;
        let t = JoinToken {
            token_hash: "h".into(),
            id: "i".into(),
            alias: None,
            expires_at: 10,
        };
        s.create_join_token(t.clone()).await.unwrap();
        assert_eq!(s.take_join_token("h").await.unwrap(), Some(t));
        assert_eq!(s.take_join_token("h").await.unwrap(), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
