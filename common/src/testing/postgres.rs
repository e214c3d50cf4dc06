//! Throwaway PostgreSQL for tests: one cluster per test process, started on first use and
//! stopped when the process exits, and one fresh database per test.
//!
//! The cluster lives in a private temporary directory and listens on 127.0.0.1 only, with
//! `trust` authentication (no password crosses the test). `initdb` refuses to run as root, so
//! a test running as root creates (once, idempotently) the unprivileged system user [`USER`]
//! and runs `initdb` and `pg_ctl` as that user.
//!
//! Stopping: a static is never dropped, so the cluster is not stopped by a destructor. Instead
//! a small reaper process (`sh`) is started with a pipe as its stdin whose writing end only
//! this process holds (close-on-exec, so no other child inherits it). However this process
//! ends (normal exit, panic, abort, SIGKILL), the kernel closes that end; the reaper reads EOF
//! and runs `pg_ctl stop -m immediate` and removes the directory. No postgres process
//! outlives the test process.
//!
//! A missing PostgreSQL is a failure naming `scripts/setup`, never a skipped test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The unprivileged system user that owns the clusters of tests run as root.
pub const USER: &str = "continuity-pg";

/// Where Debian's `postgresql` package installs the server binaries.
const DEBIAN_BIN_GLOB: &str = "/usr/lib/postgresql";

/// A running throwaway cluster.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    base: PathBuf,
    port: u16,
    /// The reaper; its stdin is the pipe whose closing stops the cluster.
    _reaper: Mutex<Child>,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// The test process's cluster, started on first use (blocking, about a second).
///
/// # Panics
/// If PostgreSQL is not installed (the message names `scripts/setup`) or the cluster does not
/// start (the message carries its log).
pub fn cluster() -> &'static Cluster {
    match CLUSTER.get_or_init(Cluster::start) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

/// A fresh, empty database on this process's cluster: its `postgres://` URL (blocking).
///
/// # Panics
/// As [`cluster`], or if `createdb` fails.
pub fn database() -> String {
    cluster().create_database()
}

impl Cluster {
    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new empty database `t_<pid>_<n>` and returns its URL.
    ///
    /// # Panics
    /// If `createdb` fails.
    pub fn create_database(&self) -> String {
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-w", &name])
            .env_remove("PGPASSWORD")
            .output();
        match out {
            Ok(o) if o.status.success() => self.url(&name),
            Ok(o) => panic!(
                "createdb {name} on the test cluster failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("createdb {name}: {e}"),
        }
    }

    /// Runs `sql` with `psql` on the database at `url` (one of this cluster's); returns its
    /// unaligned, tuples-only output.
    ///
    /// # Panics
    /// If `psql` fails (the message carries its error).
    pub fn psql(&self, url: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            Ok(o) => panic!("psql {sql:?}: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => panic!("psql: {e}"),
        }
    }

    /// Turns TLS on (certificate and key in PEM), for connections that ask for it
    /// (`sslmode=require` or stricter); returns once the cluster accepts them.
    ///
    /// # Panics
    /// If the files cannot be written or the cluster does not start serving TLS.
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) {
        use std::os::unix::fs::PermissionsExt;
        let (cert, key) = (self.base.join("server.crt"), self.base.join("server.key"));
        let owner = rustix::process::geteuid().is_root().then(ensure_user);
        for (path, pem) in [(&cert, cert_pem), (&key, key_pem)] {
            std::fs::write(path, pem).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Some(Ok((uid, gid))) = &owner {
                std::os::unix::fs::chown(path, Some(*uid), Some(*gid))
                    .unwrap_or_else(|e| panic!("chown {} to {USER}: {e}", path.display()));
            }
        }
        let admin = self.url("postgres");
        self.psql(
            &admin,
            &format!("ALTER SYSTEM SET ssl_cert_file = '{}'", cert.display()),
        );
        self.psql(
            &admin,
            &format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
        );
        self.psql(&admin, "ALTER SYSTEM SET ssl = on");
        self.psql(&admin, "SELECT pg_reload_conf()");
        let deadline = Instant::now() + Duration::from_secs(30);
        let tls = format!("{admin}?sslmode=require");
        while !Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-d", &tls, "-c", "SELECT 1"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(
                Instant::now() < deadline,
                "the test cluster did not start serving TLS; log:\n{}",
                std::fs::read_to_string(self.base.join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start() -> Result<Self, String> {
        let bin = find_bin()?;
        let owner = if rustix::process::geteuid().is_root() {
            Some(ensure_user()?)
        } else {
            None
        };
        let base = std::env::temp_dir().join(format!(
            "continuity-pg-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir(&base).map_err(|e| format!("{}: {e}", base.display()))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&base, Some(uid), Some(gid))
                .map_err(|e| format!("chown {} to {USER}: {e}", base.display()))?;
        }
        // From here on the reaper removes the directory, whatever happens next.
        let reaper = spawn_reaper(&bin, &base, owner.is_some())?;
        let data = base.join("data");
        run(
            as_owner(&bin.join("initdb"), owner.is_some())
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "--no-sync"])
                .args(["-E", "UTF8", "--locale=C"]),
            "initdb",
        )?;
        let port = start_server(&bin, &base, owner.is_some())?;
        Ok(Self {
            bin,
            base,
            port,
            _reaper: Mutex::new(reaper),
        })
    }

    /// The cluster's directory (data directory, socket and log).
    pub fn dir(&self) -> &Path {
        &self.base
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb`.
fn find_bin() -> Result<PathBuf, String> {
    let missing = || {
        format!(
            "PostgreSQL is not installed (no {DEBIAN_BIN_GLOB}/<version>/bin/initdb); the datastore tests run on PostgreSQL too: run scripts/setup"
        )
    };
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN_BIN_GLOB)
        .map_err(|_| missing())?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(missing)
}

/// The uid and gid of [`USER`], creating the system user if it does not exist. Concurrent
/// test processes may race to create it: a failed `useradd` is followed by a new look-up.
fn ensure_user() -> Result<(u32, u32), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let (Some(uid), Some(gid)) = (id_of("-u"), id_of("-g")) {
            return Ok((uid, gid));
        }
        let added = Command::new("useradd")
            .args(["--system", "--no-create-home", "--home-dir", "/nonexistent"])
            .args(["--shell", "/usr/sbin/nologin", USER])
            .output()
            .map_err(|e| format!("useradd {USER} (initdb refuses root): {e}"))?;
        if !added.status.success() && Instant::now() > deadline {
            return Err(format!(
                "could not create the system user {USER} that runs the test cluster (initdb refuses root): {}",
                String::from_utf8_lossy(&added.stderr)
            ));
        }
        if !added.status.success() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn id_of(flag: &str) -> Option<u32> {
    let o = Command::new("id").args([flag, USER]).output().ok()?;
    o.status.success().then_some(())?;
    String::from_utf8_lossy(&o.stdout).trim().parse().ok()
}

/// `program`, run as [`USER`] when the tests run as root.
fn as_owner(program: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", USER, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<Output, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The reaper: waits for EOF on its stdin (this process's end closes when it exits), then
/// stops the cluster at once and removes its directory.
fn spawn_reaper(bin: &Path, base: &Path, root: bool) -> Result<Child, String> {
    let pg_ctl = as_owner(&bin.join("pg_ctl"), root);
    let mut args: Vec<String> = std::iter::once(pg_ctl.get_program())
        .chain(pg_ctl.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    args.extend(["-D".into(), base.join("data").display().to_string()]);
    args.extend(["-m", "immediate", "-w", "stop"].map(String::from));
    Command::new("sh")
        .arg("-c")
        .arg(r#"cat >/dev/null; base="$1"; shift; [ -f "$base/data/postmaster.pid" ] && "$@"; rm -rf "$base""#)
        .arg("continuity-pg-reaper")
        .arg(base)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the test cluster's reaper (sh): {e}"))
}

/// Starts the server on a free port (another port if that one was taken meanwhile).
fn start_server(bin: &Path, base: &Path, root: bool) -> Result<u16, String> {
    let data = base.join("data");
    let log = base.join("postgres.log");
    let mut last = String::new();
    for _ in 0..5 {
        let port = super::ports::reserve();
        // fsync=off: a throwaway cluster needs no durability; nothing the tests check depends
        // on it (PostgreSQL's commit semantics are unchanged).
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c max_connections=200",
            data.display()
        );
        let started = run(
            as_owner(&bin.join("pg_ctl"), root)
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "120", "-o", &options, "start"]),
            "pg_ctl start",
        );
        match started {
            Ok(_) => return Ok(port),
            Err(e) => {
                last = format!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
                if !last.contains("could not bind") && !last.contains("already in use") {
                    break;
                }
            }
        }
    }
    Err(format!("the test PostgreSQL cluster did not start: {last}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    /// Two databases on one cluster: distinct names, same port, each its own namespace.
    #[test]
    fn databases_are_fresh_and_on_one_cluster() {
        let a = super::database();
        let b = super::database();
        assert_ne!(a, b);
        let port = super::cluster().port();
        for url in [&a, &b] {
            assert!(
                url.starts_with(&format!("postgres://postgres@127.0.0.1:{port}/t_")),
                "{url}"
            );
        }
        assert!(super::cluster().dir().join("data/postmaster.pid").exists());
        let c = super::cluster();
        c.psql(&a, "CREATE TABLE t (x BIGINT)");
        c.psql(&a, "INSERT INTO t VALUES (7)");
        assert_eq!(c.psql(&a, "SELECT x FROM t").trim(), "7");
        assert_eq!(
            c.psql(&b, "SELECT count(*) FROM pg_tables WHERE tablename = 't'")
                .trim(),
            "0"
        );
    }
}
