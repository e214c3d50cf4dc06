//! Record MACs in the SQL store: the MACed tables, the check of rows as they are read, the
//! full re-check (`integrity verify`) and the one-time sealing of rows written before
//! migration 5.
//!
//! Invariant: after migration 5 every row of a MACed table carries the MAC of its canonical
//! encoding ([`Canon`]); a row that does not is never returned. Single-row reads fail with
//! [`StoreError::Integrity`]; list reads leave the row out. Both report it to [`BadRows`].

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{
    SqlDataStore, Table, agents, bundles, ca, endorsements, engines, entries, import_jobs,
    key_versions, relationships, serving,
};
use crate::datastore::seal::{Canon, KeyPart};
use crate::datastore::{BadRow, BadRows, IntegrityReport, IntegrityStore, StoreError};

/// Every MACed table that migration 5 (record MACs) seals.
pub(super) const TABLES: &[Table] = &[
    entries::ENTRIES,
    entries::TOMBSTONES,
    agents::JOIN_TOKENS,
    agents::AGENTS,
    ca::CA_KEYS,
    ca::BUNDLE_SEQUENCE,
    engines::ENGINES,
    engines::ENGINE_KEYS,
    key_versions::KEY_VERSIONS,
    engines::SECRETS,
    engines::INCARNATIONS,
];

/// The MACed tables made after migration 5: sealed from their first row, so the upgrade never
/// reads them.
const LATER_TABLES: &[Table] = &[
    bundles::FOREIGN_BUNDLES,
    endorsements::ENDORSEMENTS,
    serving::SERVING,
    relationships::RELATIONSHIPS,
    import_jobs::IMPORT_JOBS,
];

/// The stored MAC of a row.
pub(super) fn mac_column(r: &AnyRow) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(r.try_get::<Option<Vec<u8>>, _>("mac")?)
}

/// The primary key of a row that could not be decoded, from its raw columns.
fn raw_key(r: &AnyRow, pk: &[&str]) -> String {
    let parts: Vec<String> = pk
        .iter()
        .map(|c| {
            r.try_get::<String, _>(*c)
                .or_else(|_| r.try_get::<i64, _>(*c).map(|i| i.to_string()))
                .unwrap_or_else(|_| "?".into())
        })
        .collect();
    parts.join("/")
}

impl SqlDataStore {
    /// Whether a decoded row's MAC holds; a failure is reported.
    pub(super) fn row_intact(&self, row: &Canon, r: &AnyRow) -> Result<bool, StoreError> {
        let mac = mac_column(r)?;
        match self.sealer.check(row, mac.as_deref())? {
            Ok(()) => {
                self.bad.clear(row.table(), &row.key_string());
                Ok(true)
            }
            Err(f) => {
                self.bad.report(row.table(), &row.key_string(), f.reason());
                Ok(false)
            }
        }
    }

    /// The rows of a list read whose MAC holds, decoded; the others are left out and reported.
    pub(super) fn screen<T>(
        &self,
        rows: &[AnyRow],
        decode: impl Fn(&AnyRow) -> Result<T, StoreError>,
        canon: impl Fn(&T) -> Canon,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let v = decode(r)?;
            if self.row_intact(&canon(&v), r)? {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// A single-row read: the decoded row, or [`StoreError::Integrity`] (reported).
    pub(super) fn checked<T>(
        &self,
        r: &AnyRow,
        decode: impl Fn(&AnyRow) -> Result<T, StoreError>,
        canon: impl Fn(&T) -> Canon,
    ) -> Result<T, StoreError> {
        let v = decode(r)?;
        let row = canon(&v);
        if self.row_intact(&row, r)? {
            Ok(v)
        } else {
            Err(StoreError::Integrity {
                table: row.table().into(),
                key: row.key_string(),
            })
        }
    }

    /// The MAC to store with `row`.
    pub(super) fn seal(&self, row: &Canon) -> Result<Option<Vec<u8>>, StoreError> {
        self.sealer.seal(row)
    }

    /// Seals every row without a MAC, inside migration 5's transaction (so the upgrade happens
    /// exactly once, and a NULL MAC after it is a bad row); returns how many were sealed.
    pub(super) async fn seal_unsealed_rows(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    ) -> Result<u64, sqlx::Error> {
        let mut sealed = 0u64;
        // This runs in migration 5: tables read as they were then (later tables, sealed
        // from their first row, did not exist yet).
        for t in TABLES {
            let t = if t.name == agents::AGENTS.name {
                &agents::AGENTS_AT_RECORD_MACS
            } else if t.name == key_versions::KEY_VERSIONS.name {
                &key_versions::KEY_VERSIONS_AT_RECORD_MACS
            } else {
                t
            };
            let rows = sqlx::query(t.select).fetch_all(&mut **tx).await?;
            for r in &rows {
                if mac_column(r).map_err(to_sqlx)?.is_some() {
                    continue;
                }
                let row = (t.canon)(r).map_err(to_sqlx)?;
                let mac = self.seal(&row).map_err(to_sqlx)?;
                set_mac(tx, t, &row, mac).await?;
                sealed += 1;
            }
        }
        sqlx::query("INSERT INTO meta (name, value) VALUES ('record_macs_sealed', $1)")
            .bind(i64::try_from(sealed).unwrap_or(i64::MAX))
            .execute(&mut **tx)
            .await?;
        Ok(sealed)
    }

    /// Checks every row of one table.
    async fn verify_table(&self, t: &Table, bad: &mut Vec<BadRow>) -> Result<u64, StoreError> {
        let rows = sqlx::query(t.select).fetch_all(&self.pool).await?;
        for r in &rows {
            let row = match (t.canon)(r) {
                Ok(row) => row,
                Err(e) => {
                    bad.push(BadRow {
                        table: t.name.into(),
                        key: raw_key(r, t.pk),
                        reason: format!("undecodable: {e}"),
                    });
                    continue;
                }
            };
            if let Err(f) = self.sealer.check(&row, mac_column(r)?.as_deref())? {
                bad.push(BadRow {
                    table: t.name.into(),
                    key: row.key_string(),
                    reason: f.reason().into(),
                });
            }
        }
        Ok(rows.len() as u64)
    }
}

/// A conversion for errors raised inside a migration transaction.
fn to_sqlx(e: StoreError) -> sqlx::Error {
    sqlx::Error::Protocol(e.to_string())
}

/// Stores `mac` on the row `row` names.
async fn set_mac(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    t: &Table,
    row: &Canon,
    mac: Option<Vec<u8>>,
) -> Result<(), sqlx::Error> {
    let cond: Vec<String> =
        t.pk.iter()
            .enumerate()
            .map(|(i, c)| format!("{c} = ${}", i + 2))
            .collect();
    let sql = format!(
        "UPDATE {} SET mac = $1 WHERE {}",
        t.name,
        cond.join(" AND ")
    );
    let mut q = sqlx::query(&sql).bind(mac);
    for part in row.key_parts() {
        q = match part {
            KeyPart::Text(s) => q.bind(s.clone()),
            KeyPart::Int(i) => q.bind(*i),
        };
    }
    q.execute(&mut **tx).await?;
    Ok(())
}

#[async_trait]
impl IntegrityStore for SqlDataStore {
    fn bad_rows(&self) -> std::sync::Arc<BadRows> {
        self.bad.clone()
    }

    async fn verify_integrity(&self) -> Result<IntegrityReport, StoreError> {
        let mut report = IntegrityReport::default();
        for t in TABLES.iter().chain(LATER_TABLES) {
            report.rows += self.verify_table(t, &mut report.bad).await?;
        }
        report.bad.sort();
        self.bad.replace(&report.bad);
        Ok(report)
    }

    fn upgraded_rows(&self) -> Option<u64> {
        self.upgraded
    }
}
