//! Federation relationships: one row per foreign trust domain, record-MACed, each field
//! validated again (as hostile input) on every read.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{SqlDataStore, Table};
use crate::datastore::{Canon, RelationshipStore, StoreError, Write};
use crate::trust_bundle::Relationship;

/// The relationships, MACed (created by migration 11).
pub(super) const RELATIONSHIPS: Table = Table {
    name: "federation_relationships",
    pk: &["trust_domain"],
    select: "SELECT trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id, updated_at, mac FROM federation_relationships",
    canon: |r| raw_from_row(r).map(|raw| raw.canon()),
};

/// A row as stored.
struct Raw {
    trust_domain: String,
    url: String,
    profile: String,
    endpoint_id: String,
    updated_at: i64,
}

impl Raw {
    /// The canonical encoding of the row (every column).
    fn canon(&self) -> Canon {
        Canon::new("federation_relationships")
            .key(&self.trust_domain)
            .text(&self.url)
            .text(&self.profile)
            .text(&self.endpoint_id)
            .int(self.updated_at)
    }

    fn of(r: &Relationship, updated_at: i64) -> Self {
        Self {
            trust_domain: r.trust_domain.name().to_string(),
            url: r.bundle_endpoint_url.clone(),
            profile: r.auth.profile().to_string(),
            endpoint_id: r.auth.endpoint_spiffe_id(),
            updated_at,
        }
    }
}

fn raw_from_row(r: &AnyRow) -> Result<Raw, StoreError> {
    Ok(Raw {
        trust_domain: r.try_get("trust_domain")?,
        url: r.try_get("bundle_endpoint_url")?,
        profile: r.try_get("profile")?,
        endpoint_id: r.try_get("endpoint_spiffe_id")?,
        updated_at: r.try_get("updated_at")?,
    })
}

impl SqlDataStore {
    /// Applies a foreign-bundle or relationship write in `tx` (others are not federation's).
    pub(super) async fn apply_federation_on(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        w: &Write,
    ) -> Result<(), StoreError> {
        match w {
            Write::PutForeignBundle(b, at) => self.put_foreign_bundle_on(tx, b, *at).await,
            Write::DeleteForeignBundle(td) => Self::delete_foreign_bundle_on(tx, td).await,
            Write::PutRelationship(r, at) => self.put_relationship_on(tx, r, *at).await,
            Write::DeleteRelationship(td) => Self::delete_relationship_on(tx, td).await,
            _ => Ok(()),
        }
    }

    /// Inserts or replaces the relationship of its trust domain, in `tx`.
    pub(super) async fn put_relationship_on(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        r: &Relationship,
        updated_at: i64,
    ) -> Result<(), StoreError> {
        let raw = Raw::of(r, updated_at);
        let mac = self.seal(&raw.canon())?;
        sqlx::query(
            "INSERT INTO federation_relationships (trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id, updated_at, mac)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (trust_domain) DO UPDATE SET bundle_endpoint_url = $2, profile = $3, endpoint_spiffe_id = $4, updated_at = $5, mac = $6",
        )
        .bind(raw.trust_domain)
        .bind(raw.url)
        .bind(raw.profile)
        .bind(raw.endpoint_id)
        .bind(updated_at)
        .bind(mac)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Deletes the relationship of `trust_domain`, in `tx`; NotFound if there is none.
    pub(super) async fn delete_relationship_on(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        trust_domain: &str,
    ) -> Result<(), StoreError> {
        let done = sqlx::query("DELETE FROM federation_relationships WHERE trust_domain = $1")
            .bind(trust_domain)
            .execute(&mut **tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "federation relationship with {trust_domain}"
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl RelationshipStore for SqlDataStore {
    async fn list_relationships(&self) -> Result<Vec<Relationship>, StoreError> {
        let rows = sqlx::query(&format!("{} ORDER BY trust_domain", RELATIONSHIPS.select))
            .fetch_all(&self.pool)
            .await?;
        let raw = self.screen(&rows, raw_from_row, Raw::canon)?;
        raw.iter()
            .map(|r| {
                Relationship::new(&r.trust_domain, &r.url, &r.profile, &r.endpoint_id).map_err(
                    |e| {
                        StoreError::Corrupt(format!(
                            "federation relationship {}: {e}",
                            r.trust_domain
                        ))
                    },
                )
            })
            .collect()
    }
}
