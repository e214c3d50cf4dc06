//! A real `continuity-server` process on a temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{bin, free_port};

/// Options for a test server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Extra TOML appended to the config (e.g. a `[key_manager]` table).
    pub extra_toml: String,
    /// Environment for the process (e.g. SOFTHSM2_CONF, the PIN variable).
    pub env: Vec<(String, String)>,
    /// `ca_ttl`.
    pub ca_ttl: String,
    /// `default_x509_svid_ttl`.
    pub x509_ttl: String,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            extra_toml: String::new(),
            env: vec![],
            ca_ttl: "24h".into(),
            x509_ttl: "1h".into(),
        }
    }
}

/// A running server; killed on drop. Its state survives in `dir` for restarts.
pub struct TestServer {
    /// Working directory (config, data, socket, log).
    pub dir: PathBuf,
    /// Agent API address.
    pub addr: String,
    /// Admin socket.
    pub socket: PathBuf,
    opts: ServerOptions,
    child: Option<Child>,
}

/// The trust domain of test servers.
pub const TRUST_DOMAIN: &str = "example.org";

impl TestServer {
    /// Starts a server in `dir` and waits until it answers its healthcheck.
    pub fn start(dir: &Path, opts: ServerOptions) -> Self {
        let mut s = Self::configure(dir, opts);
        s.spawn();
        s
    }

    /// Runs `continuity-server run` until it exits or `limit` passes (then kills it); returns
    /// `Some((success, stderr))` if it exited (for start-up failures), `None` if it kept running.
    pub fn run_until_exit(&self, limit: Duration) -> Option<(bool, String)> {
        let mut cmd = Command::new(bin("continuity-server"));
        cmd.args(["run", "--config"])
            .arg(self.dir.join("server.toml"))
            .envs(self.opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        crate::run_until_exit(cmd, limit)
    }

    /// Writes server.toml in `dir` (data in `dir/data`, admin socket in `dir/admin`) without
    /// starting the server; [`TestServer::spawn`] starts it.
    pub fn configure(dir: &Path, opts: ServerOptions) -> Self {
        Self::configure_with_data_dir(dir, &dir.join("data"), opts)
    }

    /// Like [`TestServer::configure`] with `data_dir` elsewhere (several servers sharing one
    /// `data_dir` share its SQLite datastore and disk key directory).
    pub fn configure_with_data_dir(dir: &Path, data_dir: &Path, opts: ServerOptions) -> Self {
        let port = free_port();
        let socket = dir.join("admin").join("admin.sock");
        let config = format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{}\"\nbind_address = \"127.0.0.1:{port}\"\nadmin_socket = \"{}\"\nca_ttl = \"{}\"\ndefault_x509_svid_ttl = \"{}\"\n{}{}\n",
            data_dir.display(),
            socket.display(),
            opts.ca_ttl,
            opts.x509_ttl,
            if opts.extra_toml.contains("log_level") {
                ""
            } else {
                "log_level = \"debug\"\n"
            },
            opts.extra_toml
        );
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("server.toml"), config).unwrap();
        Self {
            dir: dir.to_path_buf(),
            addr: format!("127.0.0.1:{port}"),
            socket,
            opts,
            child: None,
        }
    }

    /// Starts the process and waits until it answers its healthcheck.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let child = Command::new(bin("continuity-server"))
            .args(["run", "--config"])
            .arg(self.dir.join("server.toml"))
            .envs(self.opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn continuity-server");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if self.socket.exists() && self.cli(&["healthcheck"]).status.success() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "server exited with {status} during start-up; log:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "server did not become healthy; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops the process (SIGKILL) but keeps its state.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again on the same config and state.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Runs a `continuity-server` admin command against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("continuity-server"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run continuity-server CLI")
    }

    /// Runs an admin command that must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "continuity-server {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Generates a join token (optionally with a node alias).
    pub fn token(&self, alias: Option<&str>) -> String {
        let mut args = vec!["token", "generate"];
        if let Some(a) = alias {
            args.extend(["--spiffe-id", a]);
        }
        let out = self.cli_ok(&args);
        out.trim()
            .strip_prefix("Token: ")
            .expect("Token: line")
            .to_string()
    }

    /// Creates an entry; returns its id.
    pub fn create_entry(&self, spiffe_id: &str, parent_id: &str, selectors: &[&str]) -> String {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            parent_id,
            "--output",
            "json",
        ];
        for s in selectors {
            args.extend(["--selector", s]);
        }
        let v: serde_json::Value = serde_json::from_str(&self.cli_ok(&args)).unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    /// Creates an entry bound to an Engine (SPIFFE ID spiffe://example.org/<engine>); returns its id.
    pub fn create_entry_with_engine(
        &self,
        parent_id: &str,
        selector: &str,
        engine: &str,
    ) -> String {
        let spiffe_id = format!("spiffe://example.org/{engine}");
        let out = self.cli_ok(&[
            "entry",
            "create",
            "--spiffe-id",
            &spiffe_id,
            "--parent-id",
            parent_id,
            "--selector",
            selector,
            "--engine",
            engine,
            "--output",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    /// The bundle's CA certificates, DER.
    pub fn bundle_der(&self) -> Vec<Vec<u8>> {
        continuity_common::x509::pem_decode_all("CERTIFICATE", &self.cli_ok(&["bundle", "show"]))
            .unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}
