//! A real `continuity-agent` process on a temporary directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::server::TestServer;
use crate::{bin, run_until_exit};

/// A running agent; killed on drop. State survives in `dir` for restarts.
pub struct TestAgent {
    /// Working directory.
    pub dir: PathBuf,
    /// Workload API socket.
    pub socket: PathBuf,
    child: Option<Child>,
    /// Runs the agent without CAP_SYS_PTRACE (as an agent in a pod runs).
    no_ptrace: bool,
}

/// Makes `dir` and its parents up to the temp root traversable by other uids (tempfile makes
/// 0700 directories), so workloads running as other users can reach the socket.
pub fn open_up(dir: &Path) {
    let mut p = Some(dir);
    while let Some(d) = p {
        if d == std::env::temp_dir() || d == Path::new("/") {
            break;
        }
        let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755));
        p = d.parent();
    }
}

impl TestAgent {
    /// Writes agent.toml (bundle from the server, the given token) and starts the agent.
    pub fn start(dir: &Path, server: &TestServer, token: &str) -> Self {
        Self::start_with(dir, server, token, "")
    }

    /// Like [`TestAgent::start`], with extra TOML; `insecure_bootstrap = true` in it replaces
    /// the trust bundle.
    pub fn start_with(dir: &Path, server: &TestServer, token: &str, extra: &str) -> Self {
        let mut a = Self::configure(dir, server, token, extra);
        a.spawn();
        a
    }

    /// Like [`TestAgent::start_with`], the agent run through `setpriv` without CAP_SYS_PTRACE
    /// (dropped from its bounding set), as an agent in a pod runs: it cannot read
    /// `/proc/<pid>/exe` of another user's process.
    pub fn start_without_ptrace(dir: &Path, server: &TestServer, token: &str, extra: &str) -> Self {
        let mut a = Self::configure(dir, server, token, extra);
        a.no_ptrace = true;
        a.spawn();
        a
    }

    /// Writes agent.toml without starting the agent.
    pub fn configure(dir: &Path, server: &TestServer, token: &str, extra: &str) -> Self {
        Self::configure_servers(dir, server, &format!("\"{}\"", server.addr), token, extra)
    }

    /// Like [`TestAgent::configure`] with `server_address` set to `server_address` (a TOML
    /// value: a string or an array); the trust bundle comes from `server`.
    pub fn configure_servers(
        dir: &Path,
        server: &TestServer,
        server_address: &str,
        token: &str,
        extra: &str,
    ) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        open_up(dir);
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, server.cli_ok(&["bundle", "show"])).unwrap();
        let socket = dir.join("public").join("api.sock");
        let trust = if extra.contains("insecure_bootstrap") {
            String::new()
        } else {
            format!("trust_bundle_path = \"{}\"\n", bundle.display())
        };
        let mut defaults = String::new();
        if !extra.contains("sync_interval") {
            defaults.push_str("sync_interval = \"500ms\"\n");
        }
        if !extra.contains("log_level") {
            defaults.push_str("log_level = \"debug\"\n");
        }
        let cfg = format!(
            "trust_domain = \"example.org\"\nserver_address = {server_address}\ndata_dir = \"{}\"\nsocket_path = \"{}\"\n{trust}join_token = \"{token}\"\n{defaults}{extra}\n",
            dir.join("data").display(),
            socket.display(),
        );
        std::fs::write(dir.join("agent.toml"), cfg).unwrap();
        Self {
            dir: dir.to_path_buf(),
            socket,
            child: None,
            no_ptrace: false,
        }
    }

    /// Runs `continuity-agent run` to completion (for start-up failures); returns (success, stderr).
    pub fn run_to_exit(&self) -> (bool, String) {
        let out = Command::new(bin("continuity-agent"))
            .args(["run", "--config"])
            .arg(self.dir.join("agent.toml"))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// Runs `continuity-agent run` until it exits or `limit` passes (then kills it); returns
    /// `Some((success, stderr))` if it exited, `None` if it kept running.
    pub fn run_until_exit(&self, limit: Duration) -> Option<(bool, String)> {
        let mut cmd = Command::new(bin("continuity-agent"));
        cmd.args(["run", "--config"])
            .arg(self.dir.join("agent.toml"));
        run_until_exit(cmd, limit)
    }

    /// Starts the process and waits until it is ready.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let mut cmd = if self.no_ptrace {
            let mut c = Command::new("setpriv");
            c.args(["--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace"])
                .arg(bin("continuity-agent"));
            c
        } else {
            Command::new(bin("continuity-agent"))
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(self.dir.join("agent.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn continuity-agent");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until the agent answers its healthcheck.
    pub fn wait_ready(&mut self) {
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
                panic!("agent exited with {status}; log:\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "agent not ready; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The agent's resident set size in KiB (VmRSS of /proc/<pid>/status), while running.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Kills the agent (state kept).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills and starts the agent again with the same config and state.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The agent's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Runs a `continuity-agent` client command against this agent's socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        let (head, tail) = args.split_at(
            args.iter()
                .position(|a| a.starts_with("--"))
                .unwrap_or(args.len()),
        );
        Command::new(bin("continuity-agent"))
            .args(head)
            .arg("--socket-path")
            .arg(&self.socket)
            .args(tail)
            .output()
            .expect("run continuity-agent CLI")
    }

    /// Runs a `continuity-agent` client command as another uid/gid (a workload of that user).
    pub fn cli_as(&self, uid: u32, args: &[&str]) -> Output {
        use std::os::unix::process::CommandExt;
        Command::new(bin("continuity-agent"))
            .args(args)
            .arg("--socket-path")
            .arg(&self.socket)
            .uid(uid)
            .gid(uid)
            .current_dir("/")
            .output()
            .expect("run continuity-agent CLI")
    }

    /// The `SPIFFE_ENDPOINT_SOCKET` value for this agent.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.stop();
    }
}
