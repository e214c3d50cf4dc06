//! Socket, state and key directories a local user made or can change are refused at start
//! (issue 9, part 3): the real agent and server binaries exit non-zero with a message naming
//! the path, its owner and its mode, and a layout they create themselves has private modes and
//! survives a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::os::unix::fs::{MetadataExt, PermissionsExt, chown, symlink};
use std::path::Path;
use std::time::Duration;

use continuity_tests::agent::TestAgent;
use continuity_tests::server::{ServerOptions, TestServer};

/// The uid of "another local user".
const NOBODY: u32 = 65534;
/// Long enough for a start-up (attestation included) to fail; a binary that keeps running
/// past it accepted the directory.
const LIMIT: Duration = Duration::from_secs(20);

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn mkdir(p: &Path, mode: u32) {
    std::fs::create_dir_all(p).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Asserts the binary exited non-zero and its stderr names `path` and every part in `parts`.
fn assert_refused(result: Option<(bool, String)>, path: &Path, parts: &[&str]) {
    let (ok, err) = result.expect("started anyway: the directory was accepted");
    assert!(!ok, "exited successfully; stderr:\n{err}");
    let path = path.display().to_string();
    for p in std::iter::once(path.as_str()).chain(parts.iter().copied()) {
        assert!(err.contains(p), "stderr does not mention {p:?}:\n{err}");
    }
}

struct AgentEnv {
    _dir: tempfile::TempDir,
    server: TestServer,
    agent: TestAgent,
}

/// A running server and a configured (not started) agent in `<tmp>/agent`; its socket is
/// `<tmp>/agent/public/api.sock` and its data_dir `<tmp>/agent/data`.
fn agent_env() -> AgentEnv {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    let token = server.token(Some("spiffe://example.org/node/test"));
    let agent = TestAgent::configure(&dir.path().join("agent"), &server, &token, "");
    AgentEnv {
        _dir: dir,
        server,
        agent,
    }
}

#[test]
fn agent_refuses_a_socket_directory_owned_by_another_uid() {
    let e = agent_env();
    let public = e.agent.dir.join("public");
    mkdir(&public, 0o755);
    chown(&public, Some(NOBODY), Some(NOBODY)).unwrap();
    assert_refused(
        e.agent.run_until_exit(LIMIT),
        &public,
        &["owned by uid 65534 (expected 0)", "mode 0755"],
    );
    assert!(
        !e.agent.socket.exists(),
        "a socket was bound in their directory"
    );
}

#[test]
fn agent_refuses_a_world_writable_socket_directory() {
    let e = agent_env();
    let public = e.agent.dir.join("public");
    mkdir(&public, 0o777);
    assert_refused(
        e.agent.run_until_exit(LIMIT),
        &public,
        &["writable by group or others", "uid 0", "mode 0777"],
    );
    assert_eq!(mode(&public), 0o777, "the refused directory was modified");
}

#[test]
fn agent_refuses_a_symlinked_socket_directory_and_leaves_its_target_alone() {
    let e = agent_env();
    let real = e.agent.dir.join("real");
    mkdir(&real, 0o700);
    let public = e.agent.dir.join("public");
    symlink(&real, &public).unwrap();
    assert_refused(
        e.agent.run_until_exit(LIMIT),
        &public,
        &["symbolic link", "uid 0", "mode 0777"],
    );
    assert_eq!(mode(&real), 0o700);
    assert!(std::fs::read_dir(&real).unwrap().next().is_none());
}

#[test]
fn agent_refuses_a_parent_of_the_socket_directory_owned_by_another_uid() {
    // The /tmp/continuity-agent case: the user made the parent, the agent would make `public`.
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    let agent_dir = dir.path().join("agent");
    let theirs = agent_dir.join("theirs");
    mkdir(&theirs, 0o755);
    chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    let socket = theirs.join("public").join("api.sock");
    let extra = format!("socket_path = \"{}\"", socket.display());
    let agent = TestAgent::configure(&agent_dir, &server, &server.token(None), "");
    // configure wrote its own socket_path; point it at `theirs`.
    let cfg = std::fs::read_to_string(agent_dir.join("agent.toml")).unwrap();
    let cfg: String = cfg
        .lines()
        .map(|l| {
            if l.starts_with("socket_path") {
                extra.clone()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(agent_dir.join("agent.toml"), cfg).unwrap();
    assert_refused(
        agent.run_until_exit(LIMIT),
        &theirs,
        &["parent directory", "owned by uid 65534", "mode 0755"],
    );
    assert!(!theirs.join("public").exists());
}

#[test]
fn agent_refuses_a_stale_socket_path_that_is_not_a_socket() {
    let e = agent_env();
    let public = e.agent.dir.join("public");
    mkdir(&public, 0o755);
    std::fs::write(&e.agent.socket, b"precious").unwrap();
    assert_refused(
        e.agent.run_until_exit(LIMIT),
        &e.agent.socket,
        &["is not a socket"],
    );
    assert_eq!(std::fs::read(&e.agent.socket).unwrap(), b"precious");
}

#[test]
fn agent_refuses_a_data_dir_owned_by_another_uid() {
    let e = agent_env();
    let data = e.agent.dir.join("data");
    mkdir(&data, 0o700);
    chown(&data, Some(NOBODY), Some(NOBODY)).unwrap();
    assert_refused(
        e.agent.run_until_exit(LIMIT),
        &data,
        &["data_dir", "owned by uid 65534 (expected 0)", "mode 0700"],
    );
    assert!(!data.join("agent-state.json").exists());
}

#[test]
fn agent_creates_a_private_layout_and_restarts_over_it() {
    let mut e = agent_env();
    e.agent.spawn();
    let public = e.agent.dir.join("public");
    let data = e.agent.dir.join("data");
    assert_eq!(mode(&public), 0o755, "socket directory");
    assert_eq!(mode(&e.agent.socket) & 0o777, 0o777, "socket");
    assert_eq!(mode(&data), 0o700, "data_dir");
    assert_eq!(mode(&data.join("agent-state.json")), 0o600, "state file");
    // Only the state file: no temp file left behind.
    let names: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["agent-state.json"]);

    // Killed (stale socket left behind) and started again over its own directories.
    e.agent.restart();
    assert!(e.agent.cli(&["healthcheck"]).status.success());
    assert_eq!(mode(&public), 0o755);
    assert_eq!(mode(&data), 0o700);
    // A workload of another uid can still reach the socket.
    let out = e.agent.cli_as(NOBODY, &["healthcheck"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(e.server);
}

/// A configured (not started) server in `<tmp>/server`: data in `data/`, socket in `admin/`.
fn server_env() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::configure(&dir.path().join("server"), ServerOptions::default());
    (dir, server)
}

#[test]
fn server_refuses_an_admin_directory_owned_by_another_uid() {
    let (_d, s) = server_env();
    let admin = s.dir.join("admin");
    mkdir(&admin, 0o700);
    chown(&admin, Some(NOBODY), Some(NOBODY)).unwrap();
    assert_refused(
        s.run_until_exit(LIMIT),
        &admin,
        &[
            "admin_socket",
            "owned by uid 65534 (expected 0)",
            "mode 0700",
        ],
    );
    assert!(
        !s.socket.exists(),
        "the admin socket was bound in their directory"
    );
}

#[test]
fn server_refuses_a_world_writable_admin_directory() {
    let (_d, s) = server_env();
    let admin = s.dir.join("admin");
    mkdir(&admin, 0o777);
    assert_refused(
        s.run_until_exit(LIMIT),
        &admin,
        &["writable by group or others", "uid 0", "mode 0777"],
    );
    assert_eq!(mode(&admin), 0o777, "the refused directory was modified");
}

#[test]
fn server_refuses_a_symlinked_admin_directory_and_leaves_its_target_alone() {
    let (_d, s) = server_env();
    let real = s.dir.join("real");
    mkdir(&real, 0o755);
    let admin = s.dir.join("admin");
    symlink(&real, &admin).unwrap();
    assert_refused(
        s.run_until_exit(LIMIT),
        &admin,
        &["symbolic link", "uid 0", "mode 0777"],
    );
    assert_eq!(mode(&real), 0o755, "root chmodded the link's target");
}

#[test]
fn server_refuses_a_data_dir_owned_by_another_uid() {
    let (_d, s) = server_env();
    let data = s.dir.join("data");
    mkdir(&data, 0o700);
    chown(&data, Some(NOBODY), Some(NOBODY)).unwrap();
    assert_refused(
        s.run_until_exit(LIMIT),
        &data,
        &["data_dir", "owned by uid 65534 (expected 0)", "mode 0700"],
    );
    assert!(!data.join("datastore.sqlite3").exists());
}

#[test]
fn server_refuses_a_key_directory_owned_by_another_uid() {
    let (_d, s) = server_env();
    let data = s.dir.join("data");
    mkdir(&data, 0o700);
    let keys = data.join("keys");
    mkdir(&keys, 0o700);
    chown(&keys, Some(NOBODY), Some(NOBODY)).unwrap();
    assert_refused(
        s.run_until_exit(LIMIT),
        &keys,
        &[
            "key directory",
            "owned by uid 65534 (expected 0)",
            "mode 0700",
        ],
    );
}

#[test]
fn server_creates_a_private_layout_and_restarts_over_it() {
    let (_d, mut s) = server_env();
    s.spawn();
    let data = s.dir.join("data");
    let keys = data.join("keys");
    assert_eq!(mode(&s.dir.join("admin")), 0o700, "admin socket directory");
    assert_eq!(mode(&data), 0o700, "data_dir");
    assert_eq!(mode(&keys), 0o700, "key directory");
    let key_files: Vec<_> = std::fs::read_dir(&keys)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!key_files.is_empty());
    for f in &key_files {
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(!name.ends_with(".tmp"), "temp file left behind: {name}");
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    let bundle = s.cli_ok(&["bundle", "show"]);

    // Killed (stale socket left behind) and started again over its own directories.
    s.restart();
    assert_eq!(s.cli_ok(&["bundle", "show"]), bundle);
    assert_eq!(mode(&s.dir.join("admin")), 0o700);
    assert_eq!(mode(&keys), 0o700);
}
