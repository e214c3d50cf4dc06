//! What each agent last reported serving (the authorities that signed its SVIDs), record-MACed:
//! a revoke reads it to know that nothing a tainted key signed is still served. One row per
//! agent, replaced when the report changes.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{SqlDataStore, Table};
use crate::datastore::{Canon, ServingReport, ServingStore, StoreError};

const SELECT: &str = "SELECT agent_id, bundle_sequence, x509_authorities, jwt_authorities, reported_at, mac FROM agent_serving";

/// The serving reports, MACed (created by migration 11).
pub(super) const SERVING: Table = Table {
    name: "agent_serving",
    pk: &["agent_id"],
    select: SELECT,
    canon: |r| report_from_row(r).map(|s| serving_canon(&s)),
};

/// The canonical encoding of a report row (every column).
fn serving_canon(s: &ServingReport) -> Canon {
    Canon::new("agent_serving")
        .key(&s.agent_id)
        .int(s.bundle_sequence)
        .text(&s.x509_authorities.join(","))
        .text(&s.jwt_authorities.join(","))
        .int(s.reported_at)
}

/// A comma-joined list column back into its items (empty: none).
fn split(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

fn report_from_row(r: &AnyRow) -> Result<ServingReport, StoreError> {
    Ok(ServingReport {
        agent_id: r.try_get("agent_id")?,
        bundle_sequence: r.try_get("bundle_sequence")?,
        x509_authorities: split(&r.try_get::<String, _>("x509_authorities")?),
        jwt_authorities: split(&r.try_get::<String, _>("jwt_authorities")?),
        reported_at: r.try_get("reported_at")?,
    })
}

#[async_trait]
impl ServingStore for SqlDataStore {
    async fn put_serving_report(&self, s: &ServingReport) -> Result<(), StoreError> {
        if s.x509_authorities
            .iter()
            .chain(&s.jwt_authorities)
            .any(|id| id.is_empty() || id.contains(','))
        {
            return Err(StoreError::Corrupt(format!(
                "serving report of {}: an authority ID is empty or holds a comma",
                s.agent_id
            )));
        }
        let mac = self.seal(&serving_canon(s))?;
        sqlx::query(
            "INSERT INTO agent_serving (agent_id, bundle_sequence, x509_authorities, jwt_authorities, reported_at, mac)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (agent_id) DO UPDATE SET bundle_sequence = $2, x509_authorities = $3,
             jwt_authorities = $4, reported_at = $5, mac = $6",
        )
        .bind(&s.agent_id)
        .bind(s.bundle_sequence)
        .bind(s.x509_authorities.join(","))
        .bind(s.jwt_authorities.join(","))
        .bind(s.reported_at)
        .bind(mac)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_serving_reports(&self) -> Result<Vec<ServingReport>, StoreError> {
        let rows = sqlx::query(&format!("{SELECT} ORDER BY agent_id"))
            .fetch_all(&self.pool)
            .await?;
        self.screen(&rows, report_from_row, serving_canon)
    }
}
