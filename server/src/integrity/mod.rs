//! Integrity at rest: the record-MAC key, the reporting of rows that fail their MAC (one
//! audit record `integrity.bad_row` each), the audit record of the one-time upgrade, and the
//! verifier that re-reads every MACed table (on a schedule and for `integrity verify`).
//!
//! The datastore checks every row it returns (see `datastore::seal`) and keeps the failures
//! in its [`BadRows`]; this module turns them into audit records and answers the question
//! "is everything intact?".

use std::sync::Arc;

mod admin;

pub use admin::IntegrityService;

use crate::audit::Audit;
use crate::datastore::{BadRows, DataStore, IntegrityReport, RecordSealer, StoreError};
use crate::keys::{KeyError, KeyManager};
use crate::scheduler::Job;

/// The key manager id of the record-MAC key.
pub const RECORD_MAC_KEY: &str = "record-mac";

/// Who the integrity audit records name as the actor.
const ACTOR: &str = "server:integrity";

/// The sealer of the server's datastore: HMAC-SHA256 under the key manager's record-MAC key.
pub async fn sealer(keys: &dyn KeyManager) -> Result<RecordSealer, KeyError> {
    Ok(RecordSealer::new(keys.mac_key(RECORD_MAC_KEY).await?))
}

/// Audits the upgrade to record MACs, if this start did it.
pub async fn audit_upgrade(store: &dyn DataStore, audit: &Audit) -> Result<(), StoreError> {
    let Some(rows) = store.upgraded_rows() else {
        return Ok(());
    };
    audit
        .record(
            ACTOR,
            "integrity.upgrade",
            "datastore",
            0,
            &format!("ok: sealed {rows} existing rows with record MACs"),
        )
        .await
}

/// Writes one audit record per newly reported bad row, until the process ends.
pub fn spawn_reporter(bad: Arc<BadRows>, audit: Arc<Audit>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let rows = bad.take_unaudited();
            let mut failed = Vec::new();
            for r in rows {
                let target = format!("{}/{}", r.table, r.key);
                let written = audit
                    .record(ACTOR, "integrity.bad_row", &target, 0, &r.reason)
                    .await;
                if let Err(e) = written {
                    tracing::error!(error = %e, table = %r.table, key = %r.key, "bad row not audited; will retry");
                    failed.push(r);
                }
            }
            if failed.is_empty() {
                bad.changed().await;
            } else {
                bad.requeue(failed);
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        }
    })
}

/// Re-reads every MACed table; logs the outcome. Bad rows become known (and are reported).
pub async fn verify(store: &dyn DataStore) -> Result<IntegrityReport, StoreError> {
    let report = store.verify_integrity().await?;
    if report.bad.is_empty() {
        tracing::info!(rows = report.rows, "integrity verify: all rows intact");
    } else {
        tracing::error!(
            rows = report.rows,
            bad = report.bad.len(),
            "integrity verify: rows failed their record MAC"
        );
    }
    Ok(report)
}

/// The scheduled verifier: every `period` (jittered), [`verify`].
pub fn job(store: Arc<dyn DataStore>, period: std::time::Duration) -> Job {
    Job::every(
        "integrity-verify",
        period,
        "integrity verify could not read the datastore; will retry",
        move || {
            let store = store.clone();
            async move { verify(&*store).await.map(drop).map_err(Into::into) }
        },
    )
}

/// The `/ready` answer while bad rows are known, or None when all are intact.
pub fn degraded(bad: &BadRows) -> Option<String> {
    match bad.count() {
        0 => None,
        n => Some(format!(
            "degraded: {n} datastore row(s) failed their integrity check (record MAC); see `continuity-server integrity verify`\n"
        )),
    }
}
