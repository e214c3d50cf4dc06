//! Adversarial suite, secrets at rest: a PKCS#11 `pin_file` another user could read, own or
//! swap for a symlink stops the real server at start, naming `pin_file` and the path.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::softhsm::{MODULE, SoftHsm};
use continuity_tests::uid;

fn opts(hsm: &SoftHsm, pin_file: &Path) -> ServerOptions {
    ServerOptions {
        extra_toml: format!(
            "[key_manager]\nkind = \"pkcs11\"\nmodule = \"{MODULE}\"\ntoken_label = \"{}\"\npin_file = \"{}\"\n",
            hsm.label,
            pin_file.display()
        ),
        env: vec![("SOFTHSM2_CONF".into(), hsm.conf.display().to_string())],
        ..Default::default()
    }
}

/// Starts the server with this pin_file and expects it to exit non-zero naming it.
fn refused(dir: &Path, hsm: &SoftHsm, pin_file: &Path, why: &str) {
    let s = TestServer::configure(dir, opts(hsm, pin_file));
    let (ok, stderr) = s
        .run_until_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("server kept running with a {why} pin_file"));
    assert!(!ok, "server started with a {why} pin_file");
    assert!(stderr.contains("pin_file"), "{why}: {stderr}");
    assert!(
        stderr.contains(&pin_file.display().to_string()),
        "{why}: {stderr}"
    );
}

#[test]
fn a_pin_file_others_can_read_or_own_stops_the_server() {
    assert_eq!(uid(), 0, "chowns files to another uid: needs root");
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::new(&dir.path().join("hsm"), "pin-test");
    let pin = dir.path().join("pin");
    std::fs::write(&pin, format!("{}\n", hsm.pin)).unwrap();

    // World-readable.
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(&dir.path().join("s1"), &hsm, &pin, "0644");
    // Group-readable is refused too.
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o640)).unwrap();
    refused(&dir.path().join("s2"), &hsm, &pin, "0640");

    // 0600 but owned by another user (nobody).
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&pin, Some(65534), Some(65534)).unwrap();
    refused(&dir.path().join("s3"), &hsm, &pin, "foreign-owned");
    std::os::unix::fs::chown(&pin, Some(0), Some(0)).unwrap();

    // A symlink to a good file (another user could repoint it): refused, not followed.
    let link = dir.path().join("pin-link");
    std::os::unix::fs::symlink(&pin, &link).unwrap();
    refused(&dir.path().join("s4"), &hsm, &link, "symlinked");

    // The same file, 0600 and ours: the server starts and logs in.
    let s = TestServer::start(&dir.path().join("s5"), opts(&hsm, &pin));
    assert_eq!(s.bundle_der().len(), 1);
}
