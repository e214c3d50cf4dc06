//! Several real servers on one datastore and one disk key directory (so one CA), for
//! fail-over tests: each server has its own config, admin socket, port and log, and all
//! share one `data_dir` (the SQLite file and `keys/` in it). The datastore URL is a
//! parameter: with a PostgreSQL URL the servers share that database instead of the file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::agent::TestAgent;
use crate::server::{ServerOptions, TestServer};

/// Servers sharing one datastore and key directory; killed on drop.
pub struct Cluster {
    /// The shared `data_dir`.
    pub data_dir: PathBuf,
    /// The servers, configured (started by [`Cluster::start`]).
    pub servers: Vec<TestServer>,
}

impl Cluster {
    /// Configures `n` servers in `dir/server-<i>`, all on `data_dir` `dir/shared` and on
    /// `datastore_url` (None: the SQLite file in the shared `data_dir`). None is started.
    pub fn configure(
        dir: &Path,
        n: usize,
        datastore_url: Option<&str>,
        opts: &ServerOptions,
    ) -> Self {
        let data_dir = dir.join("shared");
        let mut opts = opts.clone();
        if let Some(url) = datastore_url {
            opts.extra_toml
                .push_str(&format!("\n[datastore]\nurl = \"{url}\"\n"));
        }
        let servers = (0..n)
            .map(|i| {
                TestServer::configure_with_data_dir(
                    &dir.join(format!("server-{i}")),
                    &data_dir,
                    opts.clone(),
                )
            })
            .collect();
        Self { data_dir, servers }
    }

    /// Starts server `i` and waits until it is healthy.
    pub fn start(&mut self, i: usize) {
        self.servers[i].spawn();
    }

    /// Kills server `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        self.servers[i].stop();
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
