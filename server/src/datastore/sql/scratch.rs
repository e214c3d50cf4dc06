//! Unit-test fixtures: a throwaway datastore on either backend, and [`on_both_backends!`],
//! which runs one test body on SQLite and on PostgreSQL.
//!
//! [`on_both_backends!`]: crate::datastore::on_both_backends

use std::path::{Path, PathBuf};

use super::{SqlDataStore, scratch_sqlite, test_sealer};

/// The backend a scratch datastore runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// A SQLite file in a fresh directory.
    Sqlite,
    /// A fresh database on the test process's throwaway PostgreSQL cluster.
    Postgres,
}

/// A throwaway datastore: its URL, an open store, and a private directory for the test's
/// other files (removed on drop).
#[derive(Debug)]
pub(crate) struct Scratch {
    /// Which backend.
    pub(crate) backend: Backend,
    /// The datastore URL (open it again for a second handle).
    pub(crate) url: String,
    /// The store, opened with [`test_sealer`].
    pub(crate) store: SqlDataStore,
    dir: PathBuf,
}

impl Scratch {
    /// A fresh datastore on `backend`; `what` names the test (in the directory name).
    ///
    /// # Panics
    /// If the datastore cannot be made (for PostgreSQL: not installed, naming `scripts/setup`).
    pub(crate) async fn new(backend: Backend, what: &str) -> Self {
        let (dir, url, store) = match backend {
            Backend::Sqlite => scratch_sqlite(what).await,
            Backend::Postgres => {
                let url = continuity_common::testing::postgres::database();
                let store = SqlDataStore::connect(&url, test_sealer())
                    .await
                    .unwrap_or_else(|e| panic!("scratch datastore {url}: {e}"));
                let dir = tempfile_dir(what);
                std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
                (dir, url, store)
            }
        };
        Self {
            backend,
            url,
            store,
            dir,
        }
    }

    /// A second, independent handle on the same datastore (its own pool), as a second server
    /// sharing the datastore would hold.
    pub(crate) async fn open_again(&self) -> SqlDataStore {
        SqlDataStore::connect(&self.url, test_sealer())
            .await
            .unwrap_or_else(|e| panic!("reopening {}: {e}", self.url))
    }

    /// A raw pool on the datastore, for what only an attacker (or an old server) writes.
    pub(crate) async fn raw(&self) -> sqlx::AnyPool {
        sqlx::AnyPool::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("raw pool on {}: {e}", self.url))
    }

    /// The test's private directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tempfile_dir(what: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "continuity-{what}-pg-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ))
}

/// Defines a module named after the test holding two tests, `sqlite` and `postgres`, that run
/// the same async body with `$s` bound to a fresh [`Scratch`] on each backend.
macro_rules! on_both_backends {
    ($(#[doc = $doc:expr])* async fn $name:ident($s:ident) $body:block) => {
        $(#[doc = $doc])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[allow(unused_mut)]
            async fn body(mut $s: $crate::datastore::Scratch) $body
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let s = $crate::datastore::Scratch::new(
                    $crate::datastore::Backend::Sqlite,
                    stringify!($name),
                )
                .await;
                body(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let s = $crate::datastore::Scratch::new(
                    $crate::datastore::Backend::Postgres,
                    stringify!($name),
                )
                .await;
                body(s).await;
            }
        }
    };
}
pub(crate) use on_both_backends;
