//! Foreign trust bundles (federation): one row per trust domain, the bundle kept as the SPIFFE
//! bundle document and parsed again, as hostile input, on every read.

use async_trait::async_trait;
use continuity_common::TrustDomain;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{SqlDataStore, Table};
use crate::datastore::{Canon, ForeignBundleStore, StoreError};
use crate::trust_bundle::Bundle;
use crate::trust_bundle::{BundleFormat, parse_bundle};

/// The foreign bundles, MACed (created by migration 9, after record MACs).
pub(super) const FOREIGN_BUNDLES: Table = Table {
    name: "foreign_bundles",
    pk: &["trust_domain"],
    select: "SELECT trust_domain, document, updated_at, mac FROM foreign_bundles",
    canon: |r| raw_from_row(r).map(|(td, doc, at)| bundle_canon(&td, &doc, at)),
};

/// The canonical encoding of a foreign bundle row (every column).
fn bundle_canon(trust_domain: &str, document: &str, updated_at: i64) -> Canon {
    Canon::new("foreign_bundles")
        .key(trust_domain)
        .text(document)
        .int(updated_at)
}

fn raw_from_row(r: &AnyRow) -> Result<(String, String, i64), StoreError> {
    Ok((
        r.try_get("trust_domain")?,
        r.try_get("document")?,
        r.try_get("updated_at")?,
    ))
}

/// A stored document parsed back into a bundle; a row that no longer parses is corrupt.
fn bundle_from_raw(td: &str, document: &str) -> Result<Bundle, StoreError> {
    let corrupt = |e: String| StoreError::Corrupt(format!("foreign bundle {td}: {e}"));
    let trust_domain = TrustDomain::new(td).map_err(|e| corrupt(e.to_string()))?;
    parse_bundle(&trust_domain, document.as_bytes(), BundleFormat::Spiffe)
        .map_err(|e| corrupt(e.to_string()))
}

/// The SPIFFE bundle document a bundle is stored as.
fn document_of(b: &Bundle) -> Result<String, StoreError> {
    b.to_spiffe_json()
        .map(|v| v.to_string())
        .map_err(|e| StoreError::Corrupt(format!("foreign bundle {}: {e}", b.trust_domain)))
}

impl SqlDataStore {
    /// Inserts or replaces the bundle of its trust domain, in `tx`.
    pub(super) async fn put_foreign_bundle_on(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        b: &Bundle,
        updated_at: i64,
    ) -> Result<(), StoreError> {
        let td = b.trust_domain.name();
        let document = document_of(b)?;
        let mac = self.seal(&bundle_canon(td, &document, updated_at))?;
        sqlx::query(
            "INSERT INTO foreign_bundles (trust_domain, document, updated_at, mac) VALUES ($1, $2, $3, $4)
             ON CONFLICT (trust_domain) DO UPDATE SET document = $2, updated_at = $3, mac = $4",
        )
        .bind(td)
        .bind(document)
        .bind(updated_at)
        .bind(mac)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Deletes the bundle of `trust_domain`, in `tx`; NotFound if there is none.
    pub(super) async fn delete_foreign_bundle_on(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        trust_domain: &str,
    ) -> Result<(), StoreError> {
        let done = sqlx::query("DELETE FROM foreign_bundles WHERE trust_domain = $1")
            .bind(trust_domain)
            .execute(&mut **tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("bundle of {trust_domain}")));
        }
        Ok(())
    }
}

#[async_trait]
impl ForeignBundleStore for SqlDataStore {
    async fn list_foreign_bundles(&self) -> Result<Vec<Bundle>, StoreError> {
        let rows = sqlx::query(
            "SELECT trust_domain, document, updated_at, mac FROM foreign_bundles ORDER BY trust_domain",
        )
        .fetch_all(&self.pool)
        .await?;
        let raw = self.screen(&rows, raw_from_row, |(td, doc, at)| {
            bundle_canon(td, doc, *at)
        })?;
        raw.iter()
            .map(|(td, doc, _)| bundle_from_raw(td, doc))
            .collect()
    }
}
