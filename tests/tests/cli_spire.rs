//! Runbooks written for SPIRE's CLI carry over: its single-dash flag spellings, `count`
//! commands, `-data` batch files and `-output json|pretty`, against a real server and agent.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::process::Command;
use std::time::{Duration, Instant};

use continuity_tests::{bin, uid};
use serde_json::Value;

const ALIAS: &str = "spiffe://example.org/node/test";

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `continuity-server ARGS` with SPIRE's `-socketPath` for the admin socket.
fn spire_style(e: &continuity_tests::Env, args: &[&str]) -> std::process::Output {
    Command::new(bin("continuity-server"))
        .args(args)
        .arg("-socketPath")
        .arg(&e.server.socket)
        .output()
        .unwrap()
}

#[test]
fn entry_create_with_spire_flags_is_the_long_form() {
    let e = continuity_tests::env(ALIAS);
    let me = format!("unix:uid:{}", uid());
    let out = spire_style(
        &e,
        &[
            "entry",
            "create",
            "-spiffeID",
            "spiffe://example.org/short",
            "-parentID",
            ALIAS,
            "-selector",
            &me,
            "-selector",
            "unix:gid:0",
            "-dns",
            "short.example.org",
            "-ttl",
            "600",
            "-jwtSVIDTTL=120",
            "-hint",
            "h",
            "-admin",
            "-output",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let short = json(&String::from_utf8(out.stdout).unwrap());
    let long = json(&e.server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/long",
        "--parent-id",
        ALIAS,
        "--selector",
        &me,
        "--selector",
        "unix:gid:0",
        "--dns-name",
        "short.example.org",
        "--x509-svid-ttl",
        "600",
        "--jwt-svid-ttl",
        "120",
        "--hint",
        "h",
        "--admin",
        "--output",
        "json",
    ]));
    for field in [
        "parent_id",
        "selectors",
        "dns_names",
        "x509_svid_ttl",
        "jwt_svid_ttl",
        "hint",
        "admin",
    ] {
        assert_eq!(short[field], long[field], "{field}");
    }
    assert_eq!(short["x509_svid_ttl"], 600);
    assert_eq!(short["admin"], true);

    // show, count and delete by SPIRE's names.
    let id = short["id"].as_str().unwrap();
    let out = spire_style(&e, &["entry", "show", "-entryID", id, "-output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = json(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(
        shown["entries"][0]["spiffe_id"],
        "spiffe://example.org/short"
    );
    let out = spire_style(&e, &["entry", "count", "-selector", "unix:gid:0"]);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "2 registration entries\n"
    );
    let out = spire_style(
        &e,
        &[
            "entry",
            "count",
            "-spiffeID",
            "spiffe://example.org/long",
            "-output",
            "json",
        ],
    );
    assert_eq!(json(&String::from_utf8(out.stdout).unwrap())["count"], 1);
    let out = spire_style(&e, &["entry", "delete", "-entryID", id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        e.server.cli_ok(&["entry", "count"]),
        "1 registration entry\n"
    );

    // A node alias the SPIRE way.
    let out = spire_style(
        &e,
        &[
            "entry",
            "create",
            "-node",
            "-spiffeID",
            "spiffe://example.org/nodes",
            "-selector",
            "k8s_psat:cluster:demo",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `pretty` is the text form.
    let pretty = spire_style(
        &e,
        &[
            "entry",
            "show",
            "-spiffeID",
            "spiffe://example.org/nodes",
            "-output",
            "pretty",
        ],
    );
    let pretty = String::from_utf8(pretty.stdout).unwrap();
    assert!(
        pretty.contains("Parent ID        : spiffe://example.org/continuity/server"),
        "{pretty}"
    );

    // agent count.
    assert_eq!(e.server.cli_ok(&["agent", "count"]), "1 attested agent\n");
    let out = spire_style(&e, &["agent", "count", "-output", "json"]);
    assert_eq!(json(&String::from_utf8(out.stdout).unwrap())["count"], 1);
}

#[test]
fn entry_create_data_takes_spire_batch_json_and_reports_each_entry() {
    let e = continuity_tests::env(ALIAS);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("entries.json");
    let me = format!("uid:{}", uid());
    std::fs::write(
        &file,
        serde_json::json!({"entries": [
            {"selectors": [{"type": "unix", "value": me}], "spiffe_id": "spiffe://example.org/Blog",
             "parent_id": ALIAS, "x509_svid_ttl": 200, "jwt_svid_ttl": 30, "admin": true},
            {"selectors": [], "spiffe_id": "spiffe://example.org/none", "parent_id": ALIAS},
            {"selectors": [{"type": "unix", "value": "uid:1111"}], "spiffe_id": "spiffe://example.org/Db",
             "parent_id": ALIAS, "ttl": 300, "dns_names": ["db.example.org"]},
            {"selectors": [{"type": "k8s_psat", "value": "cluster:demo"}], "spiffe_id": "spiffe://example.org/k8s-nodes",
             "parent_id": "spiffe://example.org/spire/server"},
            {"selectors": [{"type": "unix", "value": "uid:1"}], "spiffe_id": "not-an-id", "parent_id": ALIAS},
        ]})
        .to_string(),
    )
    .unwrap();
    let out = e.server.cli(&[
        "entry",
        "create",
        "--data",
        file.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert!(
        !out.status.success(),
        "two entries are refused: the command fails"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("2 of 5 entries could not be created"),
        "{stderr}"
    );
    let r = json(&String::from_utf8(out.stdout).unwrap());
    let codes: Vec<_> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"]["code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [0, 3, 0, 0, 3], "{r}");
    assert_eq!(r["results"][0]["entry"]["x509_svid_ttl"], 200);
    assert_eq!(
        r["results"][2]["entry"]["x509_svid_ttl"], 300,
        "SPIRE's ttl is the X509-SVID TTL"
    );
    assert_eq!(
        r["results"][3]["entry"]["parent_id"], "spiffe://example.org/continuity/server",
        "SPIRE's server parent is our node alias parent"
    );
    assert!(
        r["results"][1]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("selector")
    );
    assert_eq!(
        e.server.cli_ok(&["entry", "count"]),
        "3 registration entries\n"
    );

    // The created entry is live: the agent serves it.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = e.agent.cli(&["api", "fetch", "x509", "--output", "json"]);
        if out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/Blog")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never served the batch entry"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And the agent CLI takes SPIRE's spellings too.
    let write = dir.path().join("out");
    std::fs::create_dir(&write).unwrap();
    let out = Command::new(bin("continuity-agent"))
        .args(["api", "fetch", "x509", "-socketPath"])
        .arg(&e.agent.socket)
        .arg("-write")
        .arg(&write)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(write.join("svid.0.pem").exists());

    // Hostile files: a clear error naming the file, nothing created.
    for (name, body) in [
        ("bad.json", "{\"entries\": [{\"spiffe_id\": 5}]}"),
        (
            "typo.json",
            "{\"entries\": [{\"spiffe_id\": \"spiffe://example.org/x\", \"selector\": []}]}",
        ),
        ("not.json", "entries:"),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        let out = e
            .server
            .cli(&["entry", "create", "--data", p.to_str().unwrap()]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name), "{err}");
    }
    let out = e.server.cli(&[
        "entry",
        "create",
        "--data",
        file.to_str().unwrap(),
        "--spiffe-id",
        "spiffe://example.org/x",
    ]);
    assert!(!out.status.success(), "--data and entry flags conflict");
    assert_eq!(
        e.server.cli_ok(&["entry", "count"]),
        "3 registration entries\n"
    );
}
