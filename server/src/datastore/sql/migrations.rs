//! The schema, as an ordered list of migrations applied once each.

use super::{SqlDataStore, StoreError};

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
    (
        5,
        // Record MACs (HMAC-SHA256 under the key manager's "record-mac" key) over each row's
        // table, primary key and content; NULL only until the upgrade seals existing rows.
        "ALTER TABLE entries ADD COLUMN mac {BLOB};
    ALTER TABLE entry_tombstones ADD COLUMN mac {BLOB};
    ALTER TABLE join_tokens ADD COLUMN mac {BLOB};
    ALTER TABLE agents ADD COLUMN mac {BLOB};
    ALTER TABLE ca_keys ADD COLUMN mac {BLOB};
    ALTER TABLE meta ADD COLUMN mac {BLOB};
    ALTER TABLE engines ADD COLUMN mac {BLOB};
    ALTER TABLE engine_keys ADD COLUMN mac {BLOB};
    ALTER TABLE engine_key_versions ADD COLUMN mac {BLOB};
    ALTER TABLE engine_secrets ADD COLUMN mac {BLOB};
    ALTER TABLE incarnations ADD COLUMN mac {BLOB}",
    ),
    (
        6,
        // The audit head (seq and hash of the last record) in a row of its own, read and locked
        // by every append in its transaction: sequence numbers come from the datastore, not
        // from a server's memory. It starts where meta.audit_head said (a tail deleted before
        // the upgrade still shows).
        "CREATE TABLE audit_head (id BIGINT PRIMARY KEY, seq BIGINT NOT NULL, hash TEXT NOT NULL);
    INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '');
    UPDATE audit_head SET seq = (SELECT value FROM meta WHERE name = 'audit_head'),
        hash = COALESCE((SELECT hash FROM audit_log WHERE seq = (SELECT value FROM meta WHERE name = 'audit_head')), '');
    DELETE FROM meta WHERE name = 'audit_head'",
    ),
    (
        7,
        // Several servers on one datastore: the change feed (every write appends a numbered
        // change in its transaction; `change_seq` is bumped there, so numbers commit in order
        // without gaps) and the leases of the clock-driven work.
        "CREATE TABLE changes (seq BIGINT PRIMARY KEY, kind TEXT NOT NULL, change_key TEXT NOT NULL,
        origin TEXT NOT NULL, at BIGINT NOT NULL);
    INSERT INTO meta (name, value) VALUES ('change_seq', 0);
    CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at BIGINT NOT NULL)",
    ),
    (
        8,
        // Node alias entries: each agent's node selectors from its last attestation (a JSON
        // list, record-MACed with the row when not empty).
        "ALTER TABLE agents ADD COLUMN selectors TEXT NOT NULL DEFAULT '[]'",
    ),
    (
        9,
        // Federation: the trust bundles of other trust domains (the SPIFFE bundle document,
        // record-MACed).
        "CREATE TABLE foreign_bundles (trust_domain TEXT PRIMARY KEY, document TEXT NOT NULL,
        updated_at BIGINT NOT NULL, mac {BLOB})",
    ),
    (
        10,
        // Continuity proofs: the endorsement (a compact JWS) of each new sign-key version by
        // the previous primary version, record-MACed, kept after the versions are destroyed.
        "CREATE TABLE engine_endorsements (
        engine TEXT NOT NULL, key_name TEXT NOT NULL, version BIGINT NOT NULL,
        previous_version BIGINT NOT NULL, jws TEXT NOT NULL, created_at BIGINT NOT NULL,
        mac {BLOB}, PRIMARY KEY (engine, key_name, version))",
    ),
    (
        11,
        // Authority revocation: what each agent last reported serving (the authorities that
        // signed its SVIDs, as of the bundle it held), record-MACed.
        "CREATE TABLE agent_serving (agent_id TEXT PRIMARY KEY, bundle_sequence BIGINT NOT NULL,
        x509_authorities TEXT NOT NULL, jwt_authorities TEXT NOT NULL,
        reported_at BIGINT NOT NULL, mac {BLOB})",
    ),
    (
        12,
        // Federation relationships: each foreign trust domain's bundle endpoint and how it is
        // authenticated (record-MACed); the refresher keeps its bundle in foreign_bundles.
        "CREATE TABLE federation_relationships (trust_domain TEXT PRIMARY KEY,
        bundle_endpoint_url TEXT NOT NULL, profile TEXT NOT NULL, endpoint_spiffe_id TEXT NOT NULL,
        updated_at BIGINT NOT NULL, mac {BLOB})",
    ),
    (
        13,
        // Engine key import jobs: the wrapping key an engine's key material is imported under
        // (its SPKI; the private half sealed under the KEK for transit custody, or the token
        // object's id for hsm custody), record-MACed; and which key versions were imported.
        "CREATE TABLE engine_import_jobs (id TEXT PRIMARY KEY, engine TEXT NOT NULL,
        method TEXT NOT NULL, custody TEXT NOT NULL, public_key {BLOB} NOT NULL,
        private_ref {BLOB} NOT NULL, state TEXT NOT NULL, created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL, mac {BLOB});
    ALTER TABLE engine_key_versions ADD COLUMN imported BIGINT NOT NULL DEFAULT 0",
    ),
];

/// The migration that adds record MACs; existing rows are sealed in its transaction.
const RECORD_MACS: i64 = 5;

/// The PostgreSQL advisory lock servers take turns on while migrating (an arbitrary constant:
/// "continuity" in ASCII, truncated to 8 bytes).
const MIGRATION_LOCK: i64 = 0x636f_6e74_696e_7569;

impl SqlDataStore {
    /// Applies every migration not yet applied. Returns how many existing rows the record-MAC
    /// upgrade sealed, when it ran now on a datastore made before it (None otherwise).
    ///
    /// Servers starting together on one datastore take turns: on PostgreSQL a session-level
    /// advisory lock is held on one connection for the whole run (closed afterwards, so the
    /// lock cannot outlive it); on SQLite each migration's check and application happen in
    /// one transaction that takes the write lock first.
    pub(super) async fn migrate(&self, blob: &str) -> Result<Option<u64>, StoreError> {
        let mut c = self.pool.acquire().await?.detach();
        if !self.sqlite {
            sqlx::query("SELECT 1 FROM pg_advisory_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut c)
                .await?;
        }
        let result = self.migrate_on(&mut c, blob).await;
        let _ = sqlx::Connection::close(c).await;
        result
    }

    async fn migrate_on(
        &self,
        c: &mut sqlx::AnyConnection,
        blob: &str,
    ) -> Result<Option<u64>, StoreError> {
        let mut fresh = false;
        let mut upgraded = None;
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)")
            .execute(&mut *c)
            .await?;
        for (version, sql) in MIGRATIONS {
            let wrap = |source| StoreError::Migration {
                version: *version,
                source,
            };
            let mut tx = sqlx::Connection::begin(&mut *c).await.map_err(wrap)?;
            if self.sqlite {
                // A write first: the transaction holds SQLite's write lock before it checks.
                sqlx::query(
                    "UPDATE schema_migrations SET applied_at = applied_at WHERE version = $1",
                )
                .bind(*version)
                .execute(&mut *tx)
                .await
                .map_err(wrap)?;
            }
            let done: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(*version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(wrap)?;
            if done.is_some() {
                continue;
            }
            fresh |= *version == 1;
            if let Some(rows) = self
                .apply_migration(&mut tx, *version, sql, blob)
                .await
                .map_err(wrap)?
            {
                upgraded = Some(rows);
            }
            tx.commit().await.map_err(wrap)?;
            tracing::info!(version, "datastore schema migrated");
        }
        if let Some(rows) = upgraded.filter(|_| !fresh) {
            tracing::warn!(
                rows,
                "datastore upgraded to record MACs: existing rows sealed once"
            );
        }
        Ok(upgraded.filter(|_| !fresh))
    }

    /// Applies one migration in `tx` and records it; the rows the record-MAC upgrade sealed,
    /// if it was that one.
    async fn apply_migration(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        version: i64,
        sql: &str,
        blob: &str,
    ) -> Result<Option<u64>, sqlx::Error> {
        for stmt in sql
            .replace("{BLOB}", blob)
            .split(';')
            .filter(|s| !s.trim().is_empty())
        {
            sqlx::query(stmt).execute(&mut **tx).await?;
        }
        let sealed = if version == RECORD_MACS {
            Some(self.seal_unsealed_rows(tx).await?)
        } else {
            None
        };
        sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
            .bind(version)
            .bind(continuity_common::clock::unix_seconds(
                std::time::SystemTime::now(),
            ))
            .execute(&mut **tx)
            .await?;
        Ok(sealed)
    }
}
