//! Shared pieces of the Engine end-to-end tests: command results, polling, and a server
//! whose Engines may have hsm custody (a SoftHSM2 token as its key manager).

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::server::{ServerOptions, TestServer};
use crate::softhsm::{MODULE, SoftHsm};

/// The stdout of a command that must have succeeded (else a panic with its output).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The JSON stdout of a command that must have succeeded.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).unwrap()
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after `secs` seconds.
pub fn wait_for<F: FnMut() -> bool>(secs: u64, what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {secs}s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Options of a server whose key manager is the SoftHSM2 token `hsm`.
pub fn hsm_options(hsm: &SoftHsm) -> ServerOptions {
    ServerOptions {
        extra_toml: format!(
            "[key_manager]\nkind = \"pkcs11\"\nmodule = \"{MODULE}\"\ntoken_label = \"{}\"\npin_env = \"PIN\"\n",
            hsm.label
        ),
        env: vec![
            ("SOFTHSM2_CONF".into(), hsm.conf.display().to_string()),
            ("PIN".into(), hsm.pin.clone()),
        ],
        ..Default::default()
    }
}

/// A server in `dir` for Engines of `custody` ("hsm" makes a token under `dir`), and the
/// token (kept alive with the server).
pub fn server_for(dir: &Path, custody: &str) -> (TestServer, Option<SoftHsm>) {
    if custody == "hsm" {
        let hsm = SoftHsm::new(&dir.join("hsm"), "engines");
        let s = TestServer::start(&dir.join("server"), hsm_options(&hsm));
        (s, Some(hsm))
    } else {
        (
            TestServer::start(&dir.join("server"), ServerOptions::default()),
            None,
        )
    }
}

/// The tier whose default custody is `custody`.
pub fn tier_of(custody: &str) -> &'static str {
    match custody {
        "hsm" => "0",
        "transit" => "1",
        _ => "2",
    }
}

/// How many records the server's audit log holds.
pub fn audit_count(s: &TestServer) -> usize {
    s.cli_ok(&["audit", "show"]).lines().count()
}
