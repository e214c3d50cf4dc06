//! The audit log nobody can rewrite: the real server's SQLite file is tampered with while the
//! server is stopped (the way a datastore writer would, with `sqlite3`), the server is started
//! again, and `audit verify` must name each kind of tampering and exit non-zero. The chain is
//! keyed (HMAC-SHA256 with the key manager's `audit-mac` key), so every hash an attacker can
//! compute — plain SHA-256 of the old chain's fields included — is detected; signed checkpoints
//! outside the datastore catch a tail cut back together with the stored head.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use continuity_tests::server::{ServerOptions, TestServer};
use serde_json::Value;

/// Python run against the server's SQLite file: `db` is an open connection, `plain(r)` the
/// plain SHA-256 an attacker recomputes (the old chain's JSON of the fields, as the server
/// wrote it before the keyed chain), and the script commits at the end.
fn tamper(db: &Path, script: &str) {
    let prelude = r#"
import hashlib, json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
def rows():
    return db.execute("SELECT seq, time, actor, action, target, key_version, result, prev_hash, hash FROM audit_log ORDER BY seq").fetchall()
def plain(seq, time, actor, action, target, kv, result, prev):
    fields = json.dumps([seq, time, actor, action, target, kv, result, prev], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(fields.encode()).hexdigest()
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!("{prelude}\n{script}\ndb.commit()\n"))
        .arg(db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tampering failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A stopped server whose log holds `engine.create` and `token.generate` records, 1..=10.
struct Fixture {
    _dir: tempfile::TempDir,
    s: TestServer,
    db: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
        for i in 0..5 {
            s.cli_ok(&["engine", "create", &format!("e{i}"), "--tier", "1"]);
            s.token(None);
        }
        let db = dir.path().join("server/data/datastore.sqlite3");
        let f = Self { _dir: dir, s, db };
        assert_eq!(f.records().len(), 10);
        f
    }

    fn records(&self) -> Vec<Value> {
        let out = self.s.cli_ok(&["audit", "show", "--output", "json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["records"].as_array().unwrap().clone()
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.s.dir.join("data/audit/checkpoints")
    }

    /// Stops the server, runs `script` on its datastore, starts it again.
    fn tamper(&mut self, script: &str) {
        self.s.stop();
        tamper(&self.db, script);
        self.s.spawn();
    }

    fn verify(&self, extra: &[&str]) -> (Output, Value) {
        let mut args = vec!["audit", "verify", "--output", "json"];
        args.extend(extra);
        let out = self.s.cli(&args);
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "audit verify printed no JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out, v)
    }

    /// `audit verify` must fail; returns its findings as (seq, kind, detail).
    fn findings(&self, extra: &[&str]) -> Vec<(i64, String, String)> {
        let (out, v) = self.verify(extra);
        assert!(!out.status.success(), "audit verify passed: {v}");
        assert_eq!(v["ok"], false, "{v}");
        v["findings"]
            .as_array()
            .unwrap_or_else(|| panic!("no findings listed: {v}"))
            .iter()
            .map(|f| {
                (
                    f["seq"].as_i64().unwrap(),
                    f["kind"].as_str().unwrap().to_string(),
                    f["detail"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

fn has(findings: &[(i64, String, String)], seq: i64, kind: &str) -> bool {
    findings.iter().any(|(s, k, _)| *s == seq && k == kind)
}

#[test]
fn an_untouched_log_verifies_and_checkpoints_export() {
    let f = Fixture::new();
    let out = f.s.cli(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Audit log intact: 10 records"));
    let records = f.records();

    let cp: Value =
        serde_json::from_str(&f.s.cli_ok(&["audit", "checkpoint", "--output", "json"])).unwrap();
    assert_eq!(cp["seq"], 10);
    assert_eq!(cp["head"], records[9]["hash"]);
    assert_eq!(cp["key_id"], "audit-checkpoint");
    assert_eq!(cp["format"], "continuity-audit-checkpoint-v1");
    for k in ["time", "signature", "public_key"] {
        assert!(cp.get(k).is_some(), "{k} missing: {cp}");
    }
    let file = PathBuf::from(cp["file"].as_str().unwrap());
    assert!(file.starts_with(f.checkpoint_dir()), "{}", file.display());
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(written["signature"], cp["signature"]);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o644, "a checkpoint holds no secret");
    // No temp file is left behind.
    for e in std::fs::read_dir(f.checkpoint_dir()).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(name.ends_with(".json") && !name.starts_with('.'), "{name}");
    }
    let text = f.s.cli_ok(&["audit", "checkpoint"]);
    assert!(text.starts_with("Checkpoint of record 10 "), "{text}");
    let (out, v) = f.verify(&[]);
    assert!(out.status.success(), "{v}");
    assert!(v["checkpoints"].as_i64().unwrap() >= 2, "{v}");
}

#[test]
fn an_edited_record_is_named() {
    let mut f = Fixture::new();
    f.tamper("db.execute(\"UPDATE audit_log SET actor = 'mallory' WHERE seq = 3\")");
    let found = f.findings(&[]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(has(&found, 3, "edited"), "{found:?}");
    assert!(found[0].2.contains("record 3 was modified"), "{found:?}");
    let out = f.s.cli(&["audit", "verify"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HMAC mismatch at seq 3"));
}

#[test]
fn an_edited_record_with_its_hash_recomputed_in_plain_sha256_is_named() {
    let mut f = Fixture::new();
    f.tamper(
        "r = list(rows()[4])\nr[2] = 'mallory'\nh = plain(*r[:8])\n\
         db.execute('UPDATE audit_log SET actor = ?, hash = ? WHERE seq = 5', (r[2], h))\n\
         db.execute('UPDATE audit_log SET prev_hash = ? WHERE seq = 6', (h,))",
    );
    let found = f.findings(&[]);
    assert!(
        found
            .iter()
            .any(|(s, _, d)| *s == 5 && d.contains("plain SHA-256")),
        "{found:?}"
    );
}

#[test]
fn a_deleted_record_is_named() {
    let mut f = Fixture::new();
    f.tamper("db.execute('DELETE FROM audit_log WHERE seq = 4')");
    let found = f.findings(&[]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(has(&found, 4, "deleted"), "{found:?}");
    assert!(found[0].2.contains("record 4 is missing"), "{found:?}");
}

#[test]
fn a_forged_record_appended_with_plain_sha256_is_named() {
    let mut f = Fixture::new();
    // The attacker appends a record chained onto the last one, hashes it the way the old chain
    // did, and moves the stored head along with it.
    f.tamper(
        "last = rows()[-1]\n\
         r = [11, last[1], 'admin uid 0', 'agent.ban', 'spiffe://example.org/x', 0, 'ok', last[8]]\n\
         h = plain(*r)\n\
         db.execute('INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)', (*r, h))\n\
         db.execute('UPDATE audit_head SET seq = 11, hash = ? WHERE id = 1', (h,))",
    );
    let found = f.findings(&[]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(has(&found, 11, "inserted"), "{found:?}");
    assert!(found[0].2.contains("plain SHA-256"), "{found:?}");
}

#[test]
fn a_forged_record_inserted_in_the_middle_is_named() {
    let mut f = Fixture::new();
    // Records 3.. move up one place to make room; the forged record 3 carries a hash made up
    // by the attacker (any value: the key is not in the datastore); the head follows.
    f.tamper(
        "db.execute('UPDATE audit_log SET seq = -(seq + 1) WHERE seq >= 3')\n\
         db.execute('UPDATE audit_log SET seq = -seq WHERE seq < 0')\n\
         two = [r for r in rows() if r[0] == 2][0]\n\
         r = [3, two[1], 'admin uid 0', 'entry.delete', 'x', 0, 'ok', two[8]]\n\
         db.execute('INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)', (*r, hashlib.sha256(b'anything').hexdigest()))\n\
         db.execute('UPDATE audit_head SET seq = seq + 1 WHERE id = 1')",
    );
    let found = f.findings(&[]);
    assert!(has(&found, 3, "inserted"), "{found:?}");
    assert!(
        found
            .iter()
            .any(|(s, k, d)| *s == 4 && k == "reordered" && d.contains("written as record 3")),
        "the shifted records are named as moved: {found:?}"
    );
}

#[test]
fn swapped_records_are_named() {
    let mut f = Fixture::new();
    f.tamper(
        "a = rows()[2]\nb = rows()[5]\n\
         db.execute('DELETE FROM audit_log WHERE seq IN (3, 6)')\n\
         db.execute('INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)', (3, *b[1:]))\n\
         db.execute('INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)', (6, *a[1:]))",
    );
    let found = f.findings(&[]);
    assert!(
        found
            .iter()
            .any(|(s, k, d)| *s == 3 && k == "reordered" && d.contains("written as record 6")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|(s, k, d)| *s == 6 && k == "reordered" && d.contains("written as record 3")),
        "{found:?}"
    );
}

/// Cuts records 8.. and sets the stored head to record 7, as a careful attacker would.
const TRUNCATE_WITH_HEAD: &str = "db.execute('DELETE FROM audit_log WHERE seq > 7')\n\
     seven = rows()[-1]\n\
     db.execute('UPDATE audit_head SET seq = 7, hash = ? WHERE id = 1', (seven[8],))";

#[test]
fn a_tail_cut_with_the_stored_head_is_caught_by_the_checkpoint() {
    let mut f = Fixture::new();
    f.s.cli_ok(&["audit", "checkpoint"]);
    f.tamper(TRUNCATE_WITH_HEAD);
    let found = f.findings(&[]);
    assert!(has(&found, 10, "truncated"), "{found:?}");
    assert!(
        found
            .iter()
            .any(|(_, _, d)| d.contains("the log ends at record 7") && d.contains("record 10")),
        "{found:?}"
    );
    // The log grows again past the checkpoint: the record at its seq is another one.
    for i in 0..4 {
        f.s.cli_ok(&["engine", "create", &format!("later{i}"), "--tier", "1"]);
    }
    let found = f.findings(&[]);
    assert!(
        found.iter().any(|(s, k, d)| *s == 10
            && k == "truncated"
            && d.contains("record 10 is not the one")),
        "{found:?}"
    );
}

#[test]
fn an_exported_checkpoint_catches_a_cut_tail_when_the_data_dir_copy_is_gone() {
    let mut f = Fixture::new();
    let exported = f.s.dir.join("exported-checkpoint.json");
    std::fs::write(
        &exported,
        f.s.cli_ok(&["audit", "checkpoint", "--output", "json"]),
    )
    .unwrap();
    f.s.stop();
    for e in std::fs::read_dir(f.checkpoint_dir()).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    tamper(&f.db, TRUNCATE_WITH_HEAD);
    f.s.spawn();
    let (out, v) = f.verify(&[]);
    assert!(
        out.status.success(),
        "without the export nothing shows the cut: {v}"
    );
    let found = f.findings(&["--checkpoint", exported.to_str().unwrap()]);
    assert!(has(&found, 10, "truncated"), "{found:?}");
    assert!(
        found
            .iter()
            .any(|(_, _, d)| d.contains(exported.to_str().unwrap())),
        "names the checkpoint file: {found:?}"
    );
    // An exported checkpoint edited to vouch for less is not trusted.
    let mut cp: Value = serde_json::from_str(&std::fs::read_to_string(&exported).unwrap()).unwrap();
    cp["seq"] = 7.into();
    let forged = f.s.dir.join("forged-checkpoint.json");
    std::fs::write(&forged, cp.to_string()).unwrap();
    let found = f.findings(&["--checkpoint", forged.to_str().unwrap()]);
    assert!(
        found
            .iter()
            .any(|(_, k, d)| k == "checkpoint" && d.contains("signature does not verify")),
        "{found:?}"
    );
    let out =
        f.s.cli(&["audit", "verify", "--checkpoint", "/nonexistent/cp.json"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--checkpoint /nonexistent/cp.json"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_chain_recomputed_completely_with_plain_sha256_is_detected() {
    let mut f = Fixture::new();
    // The attacker rewrites record 2 and recomputes the whole chain and the head the way the
    // old server hashed it, so every link and the head are consistent.
    f.tamper(
        "prev = ''\n\
         for r in rows():\n    r = list(r)\n    r[2] = 'mallory' if r[0] == 2 else r[2]\n    r[7] = prev\n    h = plain(*r[:8])\n    db.execute('UPDATE audit_log SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?', (r[2], prev, h, r[0]))\n    prev = h\n\
         db.execute('UPDATE audit_head SET hash = ? WHERE id = 1', (prev,))",
    );
    let found = f.findings(&[]);
    assert!(
        found
            .iter()
            .any(|(s, _, d)| *s == 1 && d.contains("plain SHA-256")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|(s, _, _)| *s == 2),
        "the edited record is among them: {found:?}"
    );
    // The server did not take the rewritten log for an old plain chain and anchor it.
    assert!(
        !f.records().iter().any(|r| r["action"] == "audit.keyed"),
        "a rewritten log was anchored"
    );
}
