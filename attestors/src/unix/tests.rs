use super::exe::same_mount_ns;
use super::*;

fn me() -> ExeIdentity {
    ExeIdentity::read(std::process::id()).unwrap()
}

/// The defaults with `unix:path` and `unix:sha256` turned on (off by default).
fn with_path() -> UnixConfig {
    UnixConfig {
        discover_workload_path: true,
        ..UnixConfig::default()
    }
}

#[test]
fn by_default_no_executable_is_read() {
    let a = UnixAttestor::new(UnixConfig::default());
    let sel = a.attest(std::process::id(), 4242, 4343, None).unwrap();
    let s: Vec<String> = sel.iter().map(|s| s.to_string()).collect();
    assert!(s.contains(&"unix:uid:4242".to_string()));
    assert!(
        !s.iter()
            .any(|s| s.starts_with("unix:path:") || s.starts_with("unix:sha256:")),
        "{s:?}"
    );
    assert_eq!(a.files_read(), 0);
}

#[test]
fn attests_this_process() {
    let a = UnixAttestor::new(with_path());
    let pid = std::process::id();
    let exe = me();
    let sel = a.attest(pid, 4242, 4343, Some(&exe)).unwrap();
    let s: Vec<String> = sel.iter().map(|s| s.to_string()).collect();
    assert!(s.contains(&"unix:uid:4242".to_string()));
    assert!(s.contains(&"unix:gid:4343".to_string()));
    let path = std::env::current_exe().unwrap();
    assert!(
        s.contains(&format!("unix:path:{}", path.display())),
        "{s:?}"
    );
    let sha = s.iter().find(|x| x.starts_with("unix:sha256:")).unwrap();
    assert_eq!(sha.len(), "unix:sha256:".len() + 64);
    // Second call is served from the cache and agrees.
    let again = a.attest(pid, 4242, 4343, Some(&exe)).unwrap();
    assert_eq!(sel, again);
    assert_eq!(lock(&a.hashes).len(), 1);
    assert_eq!(a.files_read(), 1);
}

#[test]
fn withholds_a_path_that_names_another_file_for_the_agent() {
    let a = UnixAttestor::new(with_path());
    let pid = std::process::id();
    let proc = Path::new("/proc");
    let genuine = me();
    assert!(path_names_exe(proc, pid, &genuine).is_ok());
    let strs = |exe: &ExeIdentity| -> Vec<String> {
        let sel = a.attest(pid, 7, 8, Some(exe)).unwrap();
        sel.iter().map(|s| s.to_string()).collect()
    };
    let sha = |s: &[String]| s.iter().find(|x| x.starts_with("unix:sha256:")).cloned();
    let good = strs(&genuine);
    // The link text names a path at which the agent finds another file (what a bind mount
    // in the caller's own mount namespace looks like from the agent).
    let d = tmp();
    let (_, _, other) = file(&d, "victim", 10);
    let forged = ExeIdentity {
        path: other.clone(),
        ..genuine.clone()
    };
    let e = path_names_exe(proc, pid, &forged).unwrap_err();
    assert!(matches!(e, PathWithheld::OtherFile { .. }), "{e}");
    assert!(e.to_string().contains("same mount namespace"), "{e}");
    let s = strs(&forged);
    assert!(!s.iter().any(|x| x.starts_with("unix:path:")), "{s:?}");
    assert_eq!(sha(&s), sha(&good));
    assert!(sha(&s).is_some() && s.contains(&"unix:uid:7".to_string()));
    // Deleted, relative, or not there for the agent: withheld too.
    let with_path = |p: &str| ExeIdentity {
        path: p.into(),
        ..genuine.clone()
    };
    let deleted = format!("{} (deleted)", genuine.path.display());
    let e = path_names_exe(proc, pid, &with_path(&deleted)).unwrap_err();
    assert!(matches!(e, PathWithheld::Deleted), "{e}");
    let e = path_names_exe(proc, pid, &with_path("bin/srv")).unwrap_err();
    assert!(matches!(e, PathWithheld::NotAbsolute), "{e}");
    let gone = d.join("gone");
    let e = path_names_exe(proc, pid, &with_path(gone.to_str().unwrap())).unwrap_err();
    assert!(matches!(e, PathWithheld::Unresolvable(_)), "{e}");
    assert!(
        !strs(&with_path(&deleted))
            .iter()
            .any(|x| x.starts_with("unix:path:"))
    );
    // A symlink in the agent's view to the genuine file is followed.
    let link = d.join("link");
    std::os::unix::fs::symlink(&genuine.path, &link).unwrap();
    assert!(path_names_exe(proc, pid, &with_path(link.to_str().unwrap())).is_ok());
    assert_eq!(same_mount_ns(proc, pid), Some(true));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn refuses_a_recorded_executable_that_is_not_the_running_one() {
    let a = UnixAttestor::new(with_path());
    let pid = std::process::id();
    let mut exe = me();
    exe.file.ino ^= 1;
    let e = a.attest(pid, 0, 0, Some(&exe)).unwrap_err();
    assert!(matches!(e, UnixError::ExeChanged { .. }), "{e}");
    assert!(exe_unchanged(pid, &exe).is_err());
    assert!(exe_unchanged(pid, &me()).is_ok());
    let e = a.attest(pid, 0, 0, None).unwrap_err();
    assert!(matches!(e, UnixError::NoExe { .. }), "{e}");
    // Without path discovery no executable is needed.
    let a = UnixAttestor::new(UnixConfig {
        discover_workload_path: false,
        ..UnixConfig::default()
    });
    assert!(a.attest(pid, 0, 0, None).is_ok());
}

/// A file of `len` bytes and its identity.
fn file(dir: &Path, name: &str, len: usize) -> (File, FileId, PathBuf) {
    let p = dir.join(name);
    std::fs::write(&p, vec![b'x'; len]).unwrap();
    let f = File::open(&p).unwrap();
    let id = FileId::of(&f.metadata().unwrap());
    (f, id, p)
}

fn tmp() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "continuity-unix-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn size_limit_refuses_large_files_and_names_the_key() {
    let d = tmp();
    let a = UnixAttestor::new(UnixConfig {
        workload_size_limit: 1000,
        ..UnixConfig::default()
    });
    let (f, id, p) = file(&d, "big", 1001);
    let e = a.hash(&f, &id, &p).unwrap_err();
    assert!(matches!(e, UnixError::TooLarge { size: 1001, .. }), "{e}");
    assert!(e.to_string().contains("workload_size_limit"), "{e}");
    assert_eq!(a.files_read(), 0);
    let (f, id, p) = file(&d, "small", 1000);
    assert!(a.hash(&f, &id, &p).is_ok());
    // 0, set explicitly, means no limit.
    let a = UnixAttestor::new(UnixConfig {
        workload_size_limit: 0,
        ..UnixConfig::default()
    });
    let (f, id, p) = file(&d, "big", 1001);
    assert!(a.hash(&f, &id, &p).is_ok());
    assert_eq!(UnixConfig::default().workload_size_limit, 256 << 20);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn cache_is_bounded_and_evicts_the_least_recently_used() {
    let d = tmp();
    let a = UnixAttestor::new(UnixConfig {
        hash_cache_size: 3,
        ..UnixConfig::default()
    });
    let files: Vec<_> = (0..5).map(|i| file(&d, &format!("f{i}"), i + 1)).collect();
    for (f, id, p) in &files[..3] {
        a.hash(f, id, p).unwrap();
    }
    // f0 used again: f1 is now the least recently used and goes first.
    a.hash(&files[0].0, &files[0].1, &files[0].2).unwrap();
    assert_eq!(a.files_read(), 3);
    for (f, id, p) in &files[3..] {
        a.hash(f, id, p).unwrap();
    }
    assert_eq!(lock(&a.hashes).len(), 3);
    assert_eq!(a.files_read(), 5);
    a.hash(&files[0].0, &files[0].1, &files[0].2).unwrap();
    assert_eq!(a.files_read(), 5, "f0 stayed cached");
    a.hash(&files[1].0, &files[1].1, &files[1].2).unwrap();
    assert_eq!(a.files_read(), 6, "f1 was evicted");
    assert_eq!(lock(&a.hashes).len(), 3);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn cache_key_changes_with_ctime_when_mtime_is_restored() {
    let d = tmp();
    let a = UnixAttestor::new(with_path());
    let (f, id, p) = file(&d, "bin", 100);
    let before = a.hash(&f, &id, &p).unwrap();
    let m = std::fs::metadata(&p).unwrap();
    // Same inode, same size, mtime restored: only ctime tells.
    std::thread::sleep(Duration::from_millis(20));
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        w.seek(SeekFrom::Start(10)).unwrap();
        w.write_all(b"y").unwrap();
        w.set_times(
            std::fs::FileTimes::new()
                .set_accessed(m.accessed().unwrap())
                .set_modified(m.modified().unwrap()),
        )
        .unwrap();
    }
    let f = File::open(&p).unwrap();
    let id2 = FileId::of(&f.metadata().unwrap());
    assert!(id2.same_inode(&id) && id2.size == id.size && id2.mtime_nsec == id.mtime_nsec);
    assert_ne!(id2, id);
    assert_ne!(a.hash(&f, &id2, &p).unwrap(), before);
    // The old identity no longer describes the file: hashing under it is refused.
    assert!(matches!(
        a.read_and_hash(&f, &id, &p),
        Err(UnixError::Modified { .. })
    ));
    std::fs::remove_dir_all(d).unwrap();
}

/// Holds the first reader until every other caller waits for its result.
fn until_seven_wait(a: &UnixAttestor) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.coalesced_waits() < 7 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn concurrent_misses_for_one_file_read_it_once() {
    let d = tmp();
    let mut a = UnixAttestor::new(with_path());
    a.before_read = Some(until_seven_wait);
    let (_, id, p) = file(&d, "shared", 300_000);
    let results: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let (a, p) = (&a, &p);
                s.spawn(move || a.hash(&File::open(p).unwrap(), &id, p).unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(a.files_read(), 1);
    assert_eq!(a.coalesced_waits(), 7);
    assert!(results.iter().all(|r| r == &results[0]));
    assert!(lock(&a.in_flight).is_empty());
    std::fs::remove_dir_all(d).unwrap();
}

/// Set once two callers were seen waiting for a slot.
static SEEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Holds the first readers until two more callers wait for a slot (once).
fn until_two_wait_for_a_slot(a: &UnixAttestor) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !SEEN.load(Ordering::SeqCst) && Instant::now() < deadline {
        let s = lock(&a.slots);
        assert!(s.reading <= 2, "more readers than max_concurrent_hashes");
        if s.waiting == 2 {
            SEEN.store(true, Ordering::SeqCst);
        }
        drop(s);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(lock(&a.slots).reading <= 2);
}

#[test]
fn reads_at_most_max_concurrent_hashes_files_at_once() {
    let d = tmp();
    let mut a = UnixAttestor::new(with_path());
    a.before_read = Some(until_two_wait_for_a_slot);
    let files: Vec<_> = (0..4)
        .map(|i| file(&d, &format!("d{i}"), 1000 + i))
        .collect();
    std::thread::scope(|s| {
        for (_, id, p) in &files {
            let a = &a;
            s.spawn(move || a.hash(&File::open(p).unwrap(), id, p).unwrap());
        }
    });
    assert_eq!(a.files_read(), 4);
    assert!(SEEN.load(Ordering::SeqCst), "two callers waited for a slot");
    let s = lock(&a.slots);
    assert_eq!((s.reading, s.waiting), (0, 0));
    drop(s);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn parses_groups_and_names() {
    assert_eq!(
        supplementary_gids("Name:\tx\nGroups:\t4 24 27 \n"),
        vec![4, 24, 27]
    );
    assert_eq!(supplementary_gids("Name:\tx\n"), Vec::<u32>::new());
    assert_eq!(
        lookup_name(Path::new("/etc/passwd"), 0).as_deref(),
        Some("root")
    );
    assert!(start_time(std::process::id()).is_some());
}
