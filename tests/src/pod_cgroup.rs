//! Real cgroups named like a kubelet's, for workloads attested as pods without a cluster.

use std::path::Path;
use std::process::Command;

/// A real cgroup at `rel` below the root of the cgroup v1 `pids` hierarchy, or of a cgroup v2
/// hierarchy, whichever this machine mounts writable. Named like a kubelet's (cgroupfs driver)
/// for a real pod, or anything else for a forgery. Removes the directories it made on drop.
pub struct PodCgroup {
    /// The cgroup directory.
    pub dir: std::path::PathBuf,
    /// The directories it created (removed on drop, deepest first).
    pub made: Vec<std::path::PathBuf>,
}

impl PodCgroup {
    /// At `rel` below the first writable hierarchy (cgroup v1 `pids`, then v2).
    pub fn at(rel: &str) -> Self {
        Self::at_in(
            &[
                "/sys/fs/cgroup/pids",
                "/sys/fs/cgroup/unified",
                "/sys/fs/cgroup",
            ],
            "cgroup.procs",
            rel,
        )
    }

    /// Like [`PodCgroup::at`], in the cgroup v2 hierarchy (the one private cgroup namespaces
    /// are read from).
    pub fn in_v2(rel: &str) -> Self {
        Self::at_in(
            &["/sys/fs/cgroup/unified", "/sys/fs/cgroup"],
            "cgroup.controllers",
            rel,
        )
    }

    /// At `rel` below the first of `roots` that has the file `marker`.
    fn at_in(roots: &[&str], marker: &str, rel: &str) -> Self {
        let mut tried = Vec::new();
        for root in roots {
            if !Path::new(root).join(marker).exists() {
                continue;
            }
            let mut made = Vec::new();
            let mut dir = Path::new(root).to_path_buf();
            let mut result = Ok(());
            for seg in rel.split('/') {
                dir.push(seg);
                match std::fs::create_dir(&dir) {
                    Ok(()) => made.push(dir.clone()),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            let cg = Self { dir, made };
            match result {
                Ok(()) if cg.dir.join("cgroup.procs").exists() => return cg,
                Ok(()) => tried.push(format!("{}: no cgroup.procs", cg.dir.display())),
                Err(e) => tried.push(format!("{}: {e}", cg.dir.display())),
            }
        }
        panic!(
            "cannot create a pod cgroup (needs root and a writable cgroup hierarchy): {tried:?}"
        );
    }

    /// Starts `program args` as uid/gid `uid`, moves it into this cgroup before it runs (the
    /// shell waits for a line on stdin, then execs), and returns its output.
    pub fn run_as(&self, uid: u32, program: &Path, args: &[&str]) -> std::process::Output {
        use std::io::Write;
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("read _ && exec \"$0\" \"$@\"")
            .arg(program)
            .args(args)
            .uid(uid)
            .gid(uid)
            .current_dir("/")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::fs::write(self.dir.join("cgroup.procs"), child.id().to_string()).unwrap();
        let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            cgroup.contains(self.dir.file_name().unwrap().to_str().unwrap()),
            "the workload was not moved into {}: {cgroup}",
            self.dir.display()
        );
        out
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for d in self.made.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}
