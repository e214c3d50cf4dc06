//! The AES-GCM nonce budget end to end: a real server with a tiny budget, a real agent and
//! workload encrypting through the EngineAPI; versions rotate, counts are shown by
//! `engine key list`, every ciphertext decrypts, and the counts survive a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::process::Output;
use std::time::{Duration, Instant};

use continuity_tests::agent::TestAgent;
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::uid;

const ALIAS: &str = "spiffe://example.org/node/nonce";

fn ok(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "command failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// (version, encryptions) of every version of ledger/data, from `engine key list --output json`.
fn counts(s: &TestServer) -> Vec<(u64, u64)> {
    let list: serde_json::Value =
        serde_json::from_str(&s.cli_ok(&["engine", "key", "list", "ledger", "--output", "json"]))
            .unwrap();
    let key = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "data")
        .unwrap()
        .clone();
    key["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().unwrap(),
                v["encryptions"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn encryptions_past_the_budget_rotate_the_key_and_the_count_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(
        &dir.path().join("server"),
        ServerOptions {
            extra_toml: "[engines]\nmax_encryptions_per_key_version = 10\n".into(),
            ..Default::default()
        },
    );
    s.cli_ok(&["engine", "create", "ledger", "--tier", "1"]);
    s.cli_ok(&[
        "engine",
        "key",
        "create",
        "ledger",
        "data",
        "--purpose",
        "encrypt",
    ]);
    s.create_entry_with_engine(ALIAS, &format!("unix:uid:{}", uid()), "ledger");
    // 50 EngineAPI calls in a row: lift the agent's per-workload rate limit for this test.
    let agent = TestAgent::start_with(
        &dir.path().join("agent"),
        &s,
        &s.token(Some(ALIAS)),
        "[workload_api]\nserver_calls_per_second = 1000.0\nserver_calls_burst = 1000\n",
    );
    let a = agent.dir.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.cli(&["engine", "jwks"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "the workload never got its Engine"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut sealed = Vec::new();
    for i in 0..25 {
        let pt = a.join(format!("p{i}"));
        std::fs::write(&pt, format!("record {i}")).unwrap();
        let ct = a.join(format!("c{i}"));
        let out = ok(&agent.cli(&[
            "engine",
            "encrypt",
            "--key",
            "data",
            "--in",
            pt.to_str().unwrap(),
            "--out",
            ct.to_str().unwrap(),
            "--output",
            "json",
        ]));
        sealed.push((out["version"].as_u64().unwrap(), i, ct));
    }
    let versions: Vec<u64> = sealed.iter().map(|c| c.0).collect();
    let mut want = vec![1; 10];
    want.extend([2; 10]);
    want.extend([3; 5]);
    assert_eq!(versions, want, "10 encryptions per version, then rotation");
    assert_eq!(counts(&s), vec![(1, 10), (2, 10), (3, 5)]);

    // Every ciphertext decrypts, old versions included.
    for (v, i, ct) in &sealed {
        let out_path = a.join(format!("d{i}"));
        let out = ok(&agent.cli(&[
            "engine",
            "decrypt",
            "--key",
            "data",
            "--in",
            ct.to_str().unwrap(),
            "--out",
            out_path.to_str().unwrap(),
            "--output",
            "json",
        ]));
        assert_eq!(out["version"].as_u64().unwrap(), *v);
        assert_eq!(
            std::fs::read_to_string(&out_path).unwrap(),
            format!("record {i}")
        );
    }

    // The rotations are audited with their reason.
    let audit = s.cli_ok(&["audit", "show", "--output", "json"]);
    assert_eq!(
        audit.matches("nonce budget").count(),
        2,
        "two automatic rotations in the audit log: {audit}"
    );

    // After a restart (SIGKILL) the counts come back from the reserved blocks: never less.
    s.restart();
    let after = counts(&s);
    assert_eq!(after[..2], [(1, 10), (2, 10)]);
    assert_eq!(after.len(), 3);
    assert!(
        (5..=10).contains(&after[2].1),
        "v3 counts at least its 5 encryptions: {after:?}"
    );
}
