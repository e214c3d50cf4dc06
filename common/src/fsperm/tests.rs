use super::*;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fsperm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn creates_missing_components_with_exact_modes() {
    let d = tmp("create");
    let target = d.join("a/b/private");
    let dir = secure_dir(&target, 0o700, "test dir").unwrap();
    assert_eq!(mode(&d.join("a")), 0o755);
    assert_eq!(mode(&d.join("a/b")), 0o755);
    assert_eq!(mode(&target), 0o700);
    dir.write_atomic("state", 0o600, |f| std::io::Write::write_all(f, b"x"))
        .unwrap();
    assert_eq!(mode(&target.join("state")), 0o600);
    assert_eq!(
        dir.read(OsStr::new("state")).unwrap().as_deref(),
        Some(&b"x"[..])
    );
    // Reopening its own directory works and narrows a widened-but-safe mode.
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    secure_dir(&target, 0o700, "test dir").unwrap();
    assert_eq!(mode(&target), 0o700);
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn refuses_writable_symlinked_and_foreign_directories() {
    let d = tmp("refuse");
    let open = d.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = secure_dir(&open, 0o755, "test dir")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mode 0777") && e.contains(&*open.to_string_lossy()),
        "{e}"
    );
    // Also as a parent on the way.
    let e = secure_dir(&open.join("sub"), 0o755, "test dir")
        .unwrap_err()
        .to_string();
    assert!(e.contains("parent directory") && e.contains("0777"), "{e}");
    assert!(!open.join("sub").exists());

    let real = d.join("real");
    std::fs::create_dir(&real).unwrap();
    let link = d.join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let e = secure_dir(&link, 0o755, "test dir")
        .unwrap_err()
        .to_string();
    assert!(e.contains("symbolic link"), "{e}");

    if rustix::process::geteuid().is_root() {
        let theirs = d.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let e = secure_dir(&theirs, 0o755, "test dir")
            .unwrap_err()
            .to_string();
        assert!(e.contains("owned by uid 65534 (expected 0)"), "{e}");
    }
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn removes_only_sockets() {
    let d = tmp("sock");
    let dir = secure_dir(&d.join("s"), 0o755, "test dir").unwrap();
    std::fs::write(d.join("s/file"), b"").unwrap();
    assert!(dir.remove_socket(OsStr::new("file")).is_err());
    assert!(d.join("s/file").exists());
    let sock = std::os::unix::net::UnixListener::bind(d.join("s/api.sock")).unwrap();
    drop(sock);
    assert!(dir.socket_exists(OsStr::new("api.sock")).unwrap());
    dir.remove_socket(OsStr::new("api.sock")).unwrap();
    assert!(!d.join("s/api.sock").exists());
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn atomic_writes_keep_the_old_file_until_the_new_one_is_whole() {
    let d = tmp("atomic");
    let dir = secure_dir(&d.join("s"), 0o700, "test dir").unwrap();
    dir.write_atomic("state", 0o600, |f| f.write_all(b"old"))
        .unwrap();
    // A writer that fails half way (a full disk) leaves the old file and no temp file.
    let err = dir
        .write_atomic("state", 0o600, |f| {
            f.write_all(b"ne")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    assert_eq!(dir.read(OsStr::new("state")).unwrap().unwrap(), b"old");
    let names = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d.join("s"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(), ["state"]);
    // A temp file a killed writer left behind is neither read nor in the way.
    std::fs::write(d.join("s/.state.1.0.tmp"), b"torn").unwrap();
    dir.write_atomic("state", 0o600, |f| f.write_all(b"new"))
        .unwrap();
    assert_eq!(dir.read(OsStr::new("state")).unwrap().unwrap(), b"new");
    assert_eq!(mode(&d.join("s/state")), 0o600);
    // Removal is durable and idempotent, and removes a link, never its target.
    dir.remove_file(OsStr::new("state")).unwrap();
    dir.remove_file(OsStr::new("state")).unwrap();
    std::os::unix::fs::symlink(d.join("s/.state.1.0.tmp"), d.join("s/link")).unwrap();
    dir.remove_file(OsStr::new("link")).unwrap();
    assert_eq!(names(), [".state.1.0.tmp"]);
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn write_new_creates_once_and_never_replaces() {
    let d = tmp("write-new");
    let dir = secure_dir(&d.join("keys"), 0o700, "test dir").unwrap();
    assert!(
        dir.write_new("k", 0o600, |f| f.write_all(b"first"))
            .unwrap()
    );
    assert!(
        !dir.write_new("k", 0o600, |f| f.write_all(b"second"))
            .unwrap()
    );
    assert_eq!(
        dir.read(OsStr::new("k")).unwrap().as_deref(),
        Some(&b"first"[..])
    );
    assert_eq!(mode(&d.join("keys/k")), 0o600);
    // No temp file is left behind either way.
    let names: Vec<_> = std::fs::read_dir(d.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [OsStr::new("k")]);
    let _ = std::fs::remove_dir_all(d);
}
