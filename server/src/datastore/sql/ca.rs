//! CA key metadata and the bundle sequence number.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{SqlDataStore, Table};
use crate::datastore::{
    CaKeyRecord, CaKeyState, CaStore, Canon, ChangeKind, KeyPurpose, StoreError,
};

/// The CA journal, MACed: the bundle is built from these rows.
pub(super) const CA_KEYS: Table = Table {
    name: "ca_keys",
    pk: &["key_id"],
    select: "SELECT key_id, purpose, state, key_type, cert_der, public_key, kid, not_before, not_after, mac FROM ca_keys",
    canon: |r| ca_key_from_row(r).map(|k| ca_key_canon(&k)),
};

/// The bundle sequence number's meta row, MACed.
pub(super) const BUNDLE_SEQUENCE: Table = Table {
    name: "meta",
    pk: &["name"],
    select: "SELECT name, value, mac FROM meta WHERE name = 'bundle_sequence'",
    canon: |r| Ok(sequence_canon(r.try_get("value")?)),
};

fn purpose_str(p: KeyPurpose) -> &'static str {
    match p {
        KeyPurpose::X509 => "x509",
        KeyPurpose::Jwt => "jwt",
    }
}

fn state_str(s: CaKeyState) -> &'static str {
    match s {
        CaKeyState::Prepared => "prepared",
        CaKeyState::Active => "active",
        CaKeyState::Retired => "retired",
        CaKeyState::Tainted => "tainted",
    }
}

/// The canonical encoding of a CA journal row (every column).
fn ca_key_canon(k: &CaKeyRecord) -> Canon {
    Canon::new("ca_keys")
        .key(&k.key_id)
        .text(purpose_str(k.purpose))
        .text(state_str(k.state))
        .text(&k.key_type)
        .bytes(&k.cert_der)
        .bytes(&k.public_key)
        .text(&k.kid)
        .int(k.not_before)
        .int(k.not_after)
}

/// The canonical encoding of the bundle sequence row.
fn sequence_canon(value: i64) -> Canon {
    Canon::new("meta").key("bundle_sequence").int(value)
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
        "tainted" => CaKeyState::Tainted,
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

#[async_trait]
impl CaStore for SqlDataStore {
    async fn put_ca_key(&self, k: &CaKeyRecord) -> Result<(), StoreError> {
        // Every column is written, so the MAC covers exactly what is stored.
        let mac = self.seal(&ca_key_canon(k))?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO ca_keys (key_id, purpose, state, key_type, cert_der, public_key, kid, not_before, not_after, mac)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (key_id) DO UPDATE SET purpose = $2, state = $3, key_type = $4, cert_der = $5,
             public_key = $6, kid = $7, not_before = $8, not_after = $9, mac = $10",
        )
        .bind(&k.key_id)
        .bind(purpose_str(k.purpose))
        .bind(state_str(k.state))
        .bind(&k.key_type)
        .bind(k.cert_der.clone())
        .bind(k.public_key.clone())
        .bind(&k.kid)
        .bind(k.not_before)
        .bind(k.not_after)
        .bind(mac)
        .execute(&mut *tx)
        .await?;
        self.note_change(&mut tx, ChangeKind::Ca, &k.key_id).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_ca_key(&self, key_id: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM ca_keys WHERE key_id = $1")
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
        self.note_change(&mut tx, ChangeKind::Ca, key_id).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError> {
        let rows = sqlx::query("SELECT key_id, purpose, state, key_type, cert_der, public_key, kid, not_before, not_after, mac FROM ca_keys ORDER BY not_before")
            .fetch_all(&self.pool)
            .await?;
        self.screen(&rows, ca_key_from_row, ca_key_canon)
    }

    async fn next_bundle_sequence(&self) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let v = Self::bump(&mut tx, "bundle_sequence").await?;
        // The value it was raised from must have been sealed; then seal the new one.
        let old = sqlx::query(
            "SELECT name, value - 1 AS value, mac FROM meta WHERE name = 'bundle_sequence'",
        )
        .fetch_one(&mut *tx)
        .await?;
        self.checked(
            &old,
            |r| Ok(r.try_get::<i64, _>("value")?),
            |v| sequence_canon(*v),
        )?;
        sqlx::query("UPDATE meta SET mac = $1 WHERE name = 'bundle_sequence'")
            .bind(self.seal(&sequence_canon(v))?)
            .execute(&mut *tx)
            .await?;
        self.note_change(&mut tx, ChangeKind::Ca, "bundle").await?;
        tx.commit().await?;
        Ok(v as u64)
    }

    async fn bundle_sequence(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT name, value, mac FROM meta WHERE name = 'bundle_sequence'")
            .fetch_one(&self.pool)
            .await?;
        let v = self.checked(
            &row,
            |r| Ok(r.try_get::<i64, _>("value")?),
            |v| sequence_canon(*v),
        )?;
        Ok(v as u64)
    }
}
