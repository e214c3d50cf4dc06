//! Several real `continuity-server` processes on ONE datastore and one disk key directory (the
//! CA keys, KEK and MAC keys they share), each with its own data_dir, admin socket and port.
//!
//! The datastore is a URL parameter: [`sqlite_url`] gives a shared SQLite file (several
//! processes on one WAL file); a PostgreSQL URL works the same way.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::server::{ServerOptions, TestServer};

/// A shared SQLite datastore under `dir`.
pub fn sqlite_url(dir: &Path) -> String {
    format!(
        "sqlite://{}?mode=rwc",
        dir.join("shared-datastore").join("ds.sqlite3").display()
    )
}

/// What every server of a cluster shares.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The one datastore.
    pub datastore_url: String,
    /// `ca_ttl` of every server.
    pub ca_ttl: String,
    /// `default_x509_svid_ttl` of every server.
    pub x509_ttl: String,
    /// More TOML for every server (top-level keys first, then tables).
    pub extra_toml: String,
}

impl ClusterOptions {
    /// Defaults on the datastore `url`.
    pub fn on(url: &str) -> Self {
        Self {
            datastore_url: url.into(),
            ca_ttl: "24h".into(),
            x509_ttl: "1h".into(),
            extra_toml: String::new(),
        }
    }
}

/// Servers `0..n` sharing one datastore and key directory.
pub struct Cluster {
    /// The servers (A, B, C, ...).
    pub servers: Vec<TestServer>,
    /// The shared key directory.
    pub keys: PathBuf,
}

impl Cluster {
    /// Starts `n` servers under `dir`: the first alone (it creates the CA, KEK and MAC keys),
    /// then the others.
    pub fn start(dir: &Path, n: usize, opts: &ClusterOptions) -> Self {
        let keys = dir.join("shared-keys");
        let toml = format!(
            "{}\n[datastore]\nurl = \"{}\"\n\n[key_manager]\nkind = \"disk\"\ndirectory = \"{}\"\n\n[cluster]\nlease_ttl = \"10s\"\n",
            opts.extra_toml,
            opts.datastore_url,
            keys.display()
        );
        let servers = (0..n)
            .map(|i| {
                TestServer::start(
                    &dir.join(format!("server-{i}")),
                    ServerOptions {
                        extra_toml: toml.clone(),
                        env: vec![],
                        ca_ttl: opts.ca_ttl.clone(),
                        x509_ttl: opts.x509_ttl.clone(),
                    },
                )
            })
            .collect();
        Self { servers, keys }
    }

    /// Server `i`.
    pub fn server(&self, i: usize) -> &TestServer {
        &self.servers[i]
    }

    /// The bundle (PEM) of every server, in order.
    pub fn bundles(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| s.cli_ok(&["bundle", "show"]))
            .collect()
    }

    /// Every server's log, labelled.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .enumerate()
            .map(|(i, s)| format!("--- server {i} ---\n{}", s.log()))
            .collect()
    }
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `limit`; panics naming `what`.
pub fn within<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`within`] for async checks.
pub async fn within_async<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
