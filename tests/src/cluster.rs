//! Several real `continuity-server` processes on ONE datastore and one disk key directory (the
//! CA keys, KEK and MAC keys they share), each with its own data_dir, admin socket, port and
//! log: the multi-server and fail-over tests.
//!
//! The datastore is a URL parameter: a PostgreSQL database from [`crate::postgres`] (what
//! several servers are deployed on), or [`sqlite_url`], a shared SQLite file (several
//! processes on one WAL file).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::agent::TestAgent;
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

/// Servers `0..n` sharing one datastore and key directory; killed on drop.
pub struct Cluster {
    /// The servers (A, B, C, ...).
    pub servers: Vec<TestServer>,
    /// The shared key directory.
    pub keys: PathBuf,
}

impl Cluster {
    /// Configures `n` servers in `dir/server-<i>` (none started).
    pub fn configure(dir: &Path, n: usize, opts: &ClusterOptions) -> Self {
        let keys = dir.join("shared-keys");
        let toml = format!(
            "{}\n[datastore]\nurl = \"{}\"\n\n[key_manager]\nkind = \"disk\"\ndirectory = \"{}\"\n\n[cluster]\nlease_ttl = \"10s\"\n",
            opts.extra_toml,
            opts.datastore_url,
            keys.display()
        );
        let servers = (0..n)
            .map(|i| {
                TestServer::configure(
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

    /// Configures and starts `n` servers under `dir`: the first alone (it creates the CA,
    /// KEK and MAC keys), then the others.
    pub fn launch(dir: &Path, n: usize, opts: &ClusterOptions) -> Self {
        let mut c = Self::configure(dir, n, opts);
        for i in 0..n {
            c.start(i);
        }
        c
    }

    /// Starts server `i` and waits until it is healthy.
    pub fn start(&mut self, i: usize) {
        self.servers[i].spawn();
    }

    /// Kills server `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        self.servers[i].stop();
    }

    /// Server `i`.
    pub fn server(&self, i: usize) -> &TestServer {
        &self.servers[i]
    }

    /// `server_address` listing every server, as a TOML array.
    pub fn server_address_toml(&self) -> String {
        let list: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("\"{}\"", s.addr))
            .collect();
        format!("[{}]", list.join(", "))
    }

    /// The server listening on `addr`.
    pub fn index_of(&self, addr: &str) -> Option<usize> {
        self.servers.iter().position(|s| s.addr == addr)
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

/// What an agent's `/metrics` says about its server link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLink {
    /// `continuity_agent_server{address}`: the server in use.
    pub server: Option<String>,
    /// `continuity_agent_server_connected`: the last sync round succeeded.
    pub connected: bool,
    /// `continuity_agent_server_switches_total`.
    pub switches: u64,
}

/// Reads the agent's server link from its metrics listener on `port`.
pub fn server_link(port: u16) -> ServerLink {
    let (status, body) = crate::http_get(port, "/metrics");
    assert_eq!(status, 200, "agent /metrics: {body}");
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map(|v| v.trim().to_string())
    };
    ServerLink {
        server: body.lines().find_map(|l| {
            let rest = l.strip_prefix("continuity_agent_server{address=\"")?;
            Some(rest.split_once('"')?.0.to_string())
        }),
        connected: value("continuity_agent_server_connected").as_deref() == Some("1"),
        switches: value("continuity_agent_server_switches_total")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    }
}

/// Polls `f` every 100 ms until it returns Some, for at most `limit`; panics with `what`
/// (and the agent's log) otherwise.
pub fn wait_for<T>(
    agent: &TestAgent,
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The state the agent persists in `data_dir` (agent-state.json, inside its version wrapper).
pub fn agent_state(agent: &TestAgent) -> serde_json::Value {
    let path = agent.dir.join("data").join("agent-state.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["state"].clone()
}

/// The agent's SPIFFE ID, from its state file.
pub fn agent_id(agent: &TestAgent) -> String {
    agent_state(agent)["agent_id"]
        .as_str()
        .expect("an agent ID in the state file")
        .to_string()
}

/// The serial (lowercase hex, as `agent show` prints it) of the agent SVID the agent holds
/// in its state file.
pub fn agent_svid_serial(agent: &TestAgent) -> String {
    use base64::Engine;
    let state = agent_state(agent);
    let leaf = state["agent_svid"]["chain"][0]
        .as_str()
        .expect("an agent SVID in the state file");
    let der = base64::engine::general_purpose::STANDARD
        .decode(leaf)
        .unwrap();
    continuity_common::x509::serial_hex(&der).unwrap()
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
