//! Test harness: starts the real binaries on temporary directories and ports, makes throwaway
//! SoftHSM2 tokens, and speaks the agent protocol as a hand-built client.
#![forbid(unsafe_code)]
// A unit test reads as one scenario, however long; functions outside tests stay under
// clippy.toml's line limit.
#![cfg_attr(test, allow(clippy::too_many_lines))]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod agent;
pub mod agent_client;
pub mod cluster;
pub mod engines;
pub mod federation;
pub mod floods;
pub mod import_wrap;
pub mod k8s_standin;
pub mod kube_api;
pub mod pod_cgroup;
pub mod prom;
pub mod psat_api;
pub mod server;
pub mod softhsm;

/// The throwaway PostgreSQL cluster of this test process (one implementation, shared with the
/// server's unit tests).
pub use continuity_common::testing::postgres;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the workspace's built binaries (target/debug or target/release).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CONTINUITY_BIN_DIR") {
        return d.into();
    }
    // Tests live in target/<profile>/deps/, binaries (continuity-bench) in target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary; panics with the command to build it if missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (scripts/test does this)",
        p.display()
    );
    p
}

/// A server and an agent on one temporary directory, the agent attested with a join token
/// aliased to `alias` (so entries whose parent is `alias` reach it).
pub struct Env {
    /// The temporary directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// The server.
    pub server: server::TestServer,
    /// The agent.
    pub agent: agent::TestAgent,
}

/// Starts an [`Env`] with the default server options.
pub fn env(alias: &str) -> Env {
    env_with(alias, "")
}

/// Starts an [`Env`] with the default server options and `agent_toml` added to agent.toml.
pub fn env_with(alias: &str, agent_toml: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let server =
        server::TestServer::start(&dir.path().join("server"), server::ServerOptions::default());
    let token = server.token(Some(alias));
    let agent =
        agent::TestAgent::start_with(&dir.path().join("agent"), &server, &token, agent_toml);
    Env { dir, server, agent }
}

/// The uid this test process runs as.
pub fn uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// A Workload API request carrying the security header `workload.spiffe.io: true`.
pub fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// The first X509SVIDResponse of a FetchX509SVID stream on a fresh connection, or the error.
pub async fn fetch_x509(
    agent: &agent::TestAgent,
) -> Result<continuity_proto::workload::X509svidResponse, tonic::Status> {
    use continuity_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let channel = continuity_common::grpc::uds_channel(&agent.socket)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut s = SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(with_header(continuity_proto::workload::X509svidRequest {}))
        .await?
        .into_inner();
    s.message()
        .await?
        .ok_or_else(|| tonic::Status::internal("empty stream"))
}

/// A TCP port on 127.0.0.1 reserved for this test process (see
/// [`continuity_common::testing::ports`]: a port from port 0 races other tests' connections).
pub fn free_port() -> u16 {
    continuity_common::testing::ports::reserve()
}

/// Runs `cmd` (stdout discarded, stderr captured) until it exits or `limit` passes (then kills
/// it); `Some((success, stderr))` if it exited by itself.
pub fn run_until_exit(mut cmd: Command, limit: Duration) -> Option<(bool, String)> {
    use std::io::Read;
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = reader.join().unwrap();
    status.map(|st| (st.success(), err))
}

/// GET `path` on a local HTTP listener (127.0.0.1:`port`): (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = String::new();
    c.read_to_string(&mut r).unwrap();
    let status = r.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = r
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}
