//! The README's run command (`scripts/run`), as a new user would use it: it starts server and
//! agent, prints the socket, and `continuity-agent api fetch x509` then prints an SVID.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn readme_run_command_serves_an_svid_to_the_current_user() {
    let home = tempfile::tempdir().unwrap();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut child = Command::new("bash")
        .arg(format!("{root}/scripts/run"))
        .env("CONTINUITY_HOME", home.path())
        .env(
            "CONTINUITY_SERVER_PORT",
            continuity_tests::free_port().to_string(),
        )
        .env("CONTINUITY_BIN_DIR", continuity_tests::bin_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let endpoint = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("scripts/run printed no socket");
        if let Some(e) = line.strip_prefix("SPIFFE_ENDPOINT_SOCKET=") {
            break e.to_string();
        }
    };
    let out = Command::new(continuity_tests::bin("continuity-agent"))
        .args(["api", "fetch", "x509"])
        .env("SPIFFE_ENDPOINT_SOCKET", &endpoint)
        .output()
        .unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", "--", &format!("-{pgid}")])
        .status();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/demo"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
