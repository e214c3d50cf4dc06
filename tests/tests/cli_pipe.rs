//! The CLIs write to a closed pipe (`continuity-server entry show | head -1`) and exit quietly:
//! status 0, no panic message, no "Broken pipe" on stderr. Rust ignores SIGPIPE, so a bare
//! `println!` into a pipe whose reader has gone panics with status 101.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::{bin, uid};

const ALIAS: &str = "spiffe://example.org/node/pipe";

/// Runs `cmd` with stdout a pipe whose read end is already closed; returns (status, stderr).
fn into_closed_pipe(mut cmd: Command) -> (std::process::ExitStatus, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd`, reads one byte of its stdout, closes the pipe (`| head -c1`); returns (status, stderr).
fn into_head_c1(mut cmd: Command) -> (std::process::ExitStatus, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut one = [0u8; 1];
    stdout.read_exact(&mut one).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_quiet(what: &str, (status, stderr): (std::process::ExitStatus, String)) {
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{what}: stderr {stderr:?}"
    );
    assert!(status.success(), "{what}: {status:?}, stderr {stderr:?}");
}

fn server_cmd(s: &TestServer, args: &[&str]) -> Command {
    let mut c = Command::new(bin("continuity-server"));
    c.arg("--socket").arg(&s.socket).args(args);
    c
}

#[test]
fn server_commands_exit_quietly_on_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    // 100 entries with 8 long DNS names each: more than a pipe buffer (64 KiB) of output.
    for i in 0..100 {
        let (id, sel) = (
            format!("spiffe://example.org/pipe/{i}"),
            format!("unix:uid:{i}"),
        );
        let names: Vec<String> = (0..8)
            .map(|k| format!("host-{i}-{k}.a-rather-long-name-to-fill-the-pipe.example.org"))
            .collect();
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            &id,
            "--parent-id",
            ALIAS,
            "--selector",
            &sel,
        ];
        for n in &names {
            args.extend(["--dns-name", n]);
        }
        s.cli_ok(&args);
    }
    assert!(s.cli_ok(&["entry", "show"]).len() > 64 * 1024);
    for args in [
        &["entry", "show"][..],
        &["entry", "show", "--output", "json"],
        &["agent", "list"],
        &["bundle", "show"],
        &["bundle", "show", "--format", "spiffe"],
        &["audit", "show"],
        &["audit", "verify", "--output", "json"],
        &["token", "generate"],
        &["healthcheck"],
    ] {
        assert_quiet(&format!("{args:?}"), into_closed_pipe(server_cmd(&s, args)));
    }
    // Large output, reader leaves after one byte (`| head -c1`).
    for args in [
        &["entry", "show"][..],
        &["entry", "show", "--output", "json"],
    ] {
        assert_quiet(
            &format!("{args:?} | head -c1"),
            into_head_c1(server_cmd(&s, args)),
        );
    }
}

#[test]
fn agent_commands_exit_quietly_on_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    s.create_entry(
        "spiffe://example.org/pipe/agent",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    let agent = continuity_tests::agent::TestAgent::start(
        &dir.path().join("agent"),
        &s,
        &s.token(Some(ALIAS)),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.cli(&["api", "fetch", "x509"]).status.success() {
        assert!(Instant::now() < deadline, "no SVID within 20s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let agent_cmd = |args: &[&str]| {
        let mut c = Command::new(bin("continuity-agent"));
        c.args(args).arg("--socket-path").arg(&agent.socket);
        c
    };
    for args in [
        &["api", "fetch", "x509"][..],
        &["api", "fetch", "x509", "--output", "json"],
        &["api", "fetch", "jwt", "--audience", "a"],
        &["healthcheck"],
    ] {
        assert_quiet(&format!("{args:?}"), into_closed_pipe(agent_cmd(args)));
    }
    // `api watch` streams until the reader has gone, then exits quietly too.
    assert_quiet("api watch", into_closed_pipe(agent_cmd(&["api", "watch"])));
}
