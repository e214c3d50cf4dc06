//! Generic logical dump and load of every table, for `backup create` and `backup restore`:
//! tables and columns are read from the schema (SQLite's `pragma_table_info`, PostgreSQL's
//! `information_schema`), so a column added by a later migration is carried without code
//! here. The dump is one read transaction (a consistent snapshot); the load is one write
//! transaction.

use serde_json::Value;
use sqlx::any::AnyTypeInfoKind;
use sqlx::{Row, ValueRef};

use super::{SqlDataStore, StoreError};

/// The migration bookkeeping table: rebuilt by the restoring server's own migrations.
const MIGRATIONS_TABLE: &str = "schema_migrations";

/// One table of a dump: its columns (name, declared type) and rows (one JSON value per
/// column: null, an integer, a float, a string, or `{"b64": …}` for bytes).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TableDump {
    /// Table name.
    pub name: String,
    /// (column, declared type), in schema order.
    pub columns: Vec<(String, String)>,
    /// Rows, each with one value per column.
    pub rows: Vec<Vec<Value>>,
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn bad_name(s: &str) -> StoreError {
    StoreError::Corrupt(format!(
        "{s:?} is not a table or column name this server writes"
    ))
}

/// One value of `row` at `i` as JSON.
fn value(row: &sqlx::any::AnyRow, i: usize) -> Result<Value, StoreError> {
    use base64::Engine as _;
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    Ok(match raw.type_info().kind() {
        AnyTypeInfoKind::Bool => Value::from(i64::from(row.try_get::<bool, _>(i)?)),
        AnyTypeInfoKind::SmallInt | AnyTypeInfoKind::Integer | AnyTypeInfoKind::BigInt => {
            Value::from(row.try_get::<i64, _>(i)?)
        }
        AnyTypeInfoKind::Real | AnyTypeInfoKind::Double => Value::from(row.try_get::<f64, _>(i)?),
        AnyTypeInfoKind::Text => Value::from(row.try_get::<String, _>(i)?),
        AnyTypeInfoKind::Blob => serde_json::json!({
            "b64": base64::engine::general_purpose::STANDARD.encode(row.try_get::<Vec<u8>, _>(i)?)
        }),
        AnyTypeInfoKind::Null => Value::Null,
    })
}

impl SqlDataStore {
    /// Every table but the migration bookkeeping, with its columns, as seen by `c`.
    async fn tables_on(
        &self,
        c: &mut sqlx::AnyConnection,
    ) -> Result<Vec<(String, Vec<(String, String)>)>, StoreError> {
        let names: Vec<String> = if self.sqlite {
            sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
                .fetch_all(&mut *c).await?
        } else {
            sqlx::query_scalar("SELECT CAST(table_name AS TEXT) FROM information_schema.tables WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY table_name")
                .fetch_all(&mut *c).await?
        };
        let mut out = Vec::new();
        for name in names.into_iter().filter(|n| n != MIGRATIONS_TABLE) {
            let cols: Vec<(String, String)> = if self.sqlite {
                sqlx::query("SELECT name, type FROM pragma_table_info($1) ORDER BY cid")
            } else {
                sqlx::query("SELECT CAST(column_name AS TEXT), CAST(data_type AS TEXT) FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position")
            }
            .bind(&name)
            .fetch_all(&mut *c)
            .await?
            .iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)))
            .collect::<Result<_, sqlx::Error>>()?;
            out.push((name, cols));
        }
        Ok(out)
    }

    /// The latest schema migration applied.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Every row of every table, read in one transaction (a consistent snapshot).
    pub async fn dump(&self) -> Result<Vec<TableDump>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !self.sqlite {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        let mut out = Vec::new();
        for (name, columns) in self.tables_on(&mut tx).await? {
            if !is_ident(&name) || columns.iter().any(|(c, _)| !is_ident(c)) {
                return Err(bad_name(&name));
            }
            let list: Vec<&str> = columns.iter().map(|(c, _)| c.as_str()).collect();
            let sql = format!("SELECT {} FROM {name} ORDER BY 1", list.join(", "));
            let rows = sqlx::query(&sql).fetch_all(&mut *tx).await?;
            let rows = rows
                .iter()
                .map(|r| (0..columns.len()).map(|i| value(r, i)).collect())
                .collect::<Result<_, StoreError>>()?;
            out.push(TableDump {
                name,
                columns,
                rows,
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    /// The tables holding rows a fresh schema does not (`meta` starts with its counters,
    /// `audit_head` with its one row; a log that moved it shows in `audit_log`).
    pub async fn non_empty_tables(&self) -> Result<Vec<String>, StoreError> {
        let mut c = self.pool.acquire().await?;
        let mut out = Vec::new();
        for (name, _) in self.tables_on(&mut c).await? {
            if !is_ident(&name) || name == "meta" || name == "audit_head" {
                continue;
            }
            let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {name}"))
                .fetch_one(&mut *c)
                .await?;
            if n > 0 {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// Replaces the content of every table in `tables` with its rows, in one transaction.
    /// A table or column this schema lacks is refused, naming it.
    pub async fn load(&self, tables: &[TableDump]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let schema = self.tables_on(&mut tx).await?;
        for t in tables {
            let Some((_, have)) = schema.iter().find(|(n, _)| *n == t.name) else {
                return Err(StoreError::Corrupt(format!(
                    "the backup has a table {:?} this server's schema does not",
                    t.name
                )));
            };
            if let Some((c, _)) = t
                .columns
                .iter()
                .find(|(c, _)| !have.iter().any(|(h, _)| h == c))
            {
                return Err(StoreError::Corrupt(format!(
                    "the backup has a column {}.{c} this server's schema does not",
                    t.name
                )));
            }
            sqlx::query(&format!("DELETE FROM {}", t.name))
                .execute(&mut *tx)
                .await?;
            let cols: Vec<&str> = t.columns.iter().map(|(c, _)| c.as_str()).collect();
            let params: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "INSERT INTO {} ({}) VALUES ({})",
                t.name,
                cols.join(", "),
                params.join(", ")
            );
            for row in &t.rows {
                let mut q = sqlx::query(&sql);
                for (v, (_, ty)) in row.iter().zip(&t.columns) {
                    q = bind(q, v, ty)?;
                }
                q.execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds one dumped value; a null is bound with the column's declared type.
fn bind<'q>(q: Query<'q>, v: &Value, ty: &str) -> Result<Query<'q>, StoreError> {
    use base64::Engine as _;
    let ty = ty.to_ascii_uppercase();
    let binary = ty.contains("BLOB") || ty.contains("BYTEA");
    Ok(match v {
        Value::Null if binary => q.bind(None::<Vec<u8>>),
        Value::Null if ty.contains("INT") => q.bind(None::<i64>),
        Value::Null => q.bind(None::<String>),
        Value::Number(n) if n.is_i64() => q.bind(n.as_i64()),
        Value::Number(n) => q.bind(n.as_f64()),
        Value::String(s) => q.bind(s.clone()),
        Value::Object(o) if o.len() == 1 && o.get("b64").is_some_and(Value::is_string) => {
            let b64 = o.get("b64").and_then(Value::as_str).unwrap_or_default();
            q.bind(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| StoreError::Corrupt(format!("bytes in the backup: {e}")))?,
            )
        }
        other => {
            return Err(StoreError::Corrupt(format!(
                "unexpected value {other} in the backup"
            )));
        }
    })
}
