//! `[datastore] url`: a SQLite file (the default, under `data_dir`) or a PostgreSQL database.
//!
//! A PostgreSQL URL is parsed here, once, as the datastore will read it, so a malformed one
//! stops the server naming the key. A query parameter the driver does not know is refused
//! rather than ignored: a misspelt `sslmod=verify-full` would otherwise leave the connection
//! without the TLS it asked for. The password in a URL is never echoed in a message.

use std::path::Path;

use continuity_common::config::{ConfigError, invalid};

use super::FileDatastore;

/// The key, as messages name it.
const KEY: &str = "datastore.url";

/// The connection parameters the PostgreSQL driver reads from a URL's query string.
const POSTGRES_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// The datastore URL: as given (checked), or a SQLite file in `data_dir`.
pub fn url(d: Option<FileDatastore>, data_dir: &Path) -> Result<String, ConfigError> {
    match d.and_then(|d| d.url) {
        Some(u) if u.starts_with("sqlite://") => Ok(u),
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            check_postgres(&u)?;
            Ok(u)
        }
        Some(u) => Err(invalid(
            KEY,
            format!(
                "{:?} is neither sqlite://... nor postgres://...",
                u.split_once('@').map_or(u.as_str(), |(_, host)| host)
            ),
        )),
        None => Ok(format!(
            "sqlite://{}?mode=rwc",
            data_dir.join("datastore.sqlite3").display()
        )),
    }
}

/// A PostgreSQL URL the driver accepts, with no parameter it would ignore.
fn check_postgres(u: &str) -> Result<(), ConfigError> {
    if let Some((_, query)) = u.split_once('?') {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let name = pair.split_once('=').map_or(pair, |(k, _)| k);
            if !POSTGRES_PARAMETERS.contains(&name) && !name.starts_with("options[") {
                return Err(invalid(
                    KEY,
                    format!(
                        "the PostgreSQL parameter {name:?} is not one this server reads (known: {})",
                        POSTGRES_PARAMETERS.join(", ")
                    ),
                ));
            }
        }
    }
    u.parse::<sqlx::postgres::PgConnectOptions>()
        .map(|_| ())
        .map_err(|e| {
            invalid(
                KEY,
                format!("is not a PostgreSQL URL this server can use: {e}"),
            )
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(u: &str) -> Result<String, String> {
        url(
            Some(FileDatastore {
                url: Some(u.into()),
            }),
            Path::new("/d"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn good_urls_pass_unchanged() {
        for u in [
            "sqlite:///var/lib/continuity/ds.sqlite3?mode=rwc",
            "postgres://continuity@db.internal:5432/continuity",
            "postgresql://u:p%40ss@10.0.0.5/continuity?sslmode=verify-full&sslrootcert=/etc/ca.pem",
            "postgres://u@db/c?sslmode=require&application_name=continuity&options[statement_timeout]=5s",
        ] {
            assert_eq!(parse(u).unwrap(), u);
        }
        assert_eq!(
            url(None, Path::new("/d")).unwrap(),
            "sqlite:///d/datastore.sqlite3?mode=rwc"
        );
    }

    #[test]
    fn bad_urls_name_the_key_and_never_the_password() {
        for (u, want) in [
            ("postgres://u:hunter2@db/c?sslmod=verify-full", "\"sslmod\""),
            (
                "postgres://u:hunter2@db/c?connect_timeout=5",
                "\"connect_timeout\"",
            ),
            ("postgres://u:hunter2@db/c?sslmode=always", "ssl_mode"),
            ("postgres://u:hunter2@db:notaport/c", "PostgreSQL URL"),
            ("mysql://u:hunter2@db/c", "neither"),
        ] {
            let e = parse(u).unwrap_err();
            assert!(e.contains("`datastore.url`"), "{u}: {e}");
            assert!(e.contains(want), "{u}: {e}");
            assert!(!e.contains("hunter2"), "{u}: the password is echoed: {e}");
        }
    }
}
