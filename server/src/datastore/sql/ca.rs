//! CA key metadata and the bundle sequence number.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::SqlDataStore;
use crate::datastore::{CaKeyRecord, CaKeyState, CaStore, KeyPurpose, StoreError};

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

#[async_trait]
impl CaStore for SqlDataStore {
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
}
