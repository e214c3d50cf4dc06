//! Pod UID and container ID from `/proc/<pid>/cgroup`, for cgroup v1 and v2, the systemd and
//! cgroupfs drivers, and containerd, CRI-O and Docker naming.
//!
//! Everything here is hostile input: on a cgroup-v2 / systemd node an unprivileged user owns a
//! delegated subtree (`/user.slice/user-<uid>.slice/user@<uid>.service/...`) and can create
//! cgroups with any name in it, including `pod<victim-uid>/<victim-container-id>`. So a path is
//! accepted only when it is exactly where the kubelet and the container runtime put containers,
//! anchored at the cgroup root, with nothing before or after.
//!
//! # Accepted grammar
//!
//! Each line is `hierarchy-ID:controllers:path`. The path must start with `/`, may start with
//! `..` segments (see below), and has no other empty, `.` or `..` segments. `HEX64` is 64
//! lower-case hex digits, `UUID` a lower-case 8-4-4-4-12 UUID (`UUID_` the same with `_` for
//! `-`, as systemd escapes it).
//!
//! ```text
//! path      = [node] (cgroupfs | systemd)
//! node      = "/docker/" HEX64                       ; kind node container, cgroup v1,
//!           | "/system.slice/docker-" HEX64 ".scope"  ;   no cgroup namespace
//! cgroupfs  = ["/kubelet"] "/kubepods" cfs-qos
//! cfs-qos   = ["/besteffort" | "/burstable"] cfs-pod
//! cfs-pod   = "/pod" UUID "/" ( HEX64 | "crio-" HEX64 ) [crun]
//! systemd   = ( "/kubepods.slice"                           -> P = "kubepods"
//!             | "/kubelet.slice/kubelet-kubepods.slice" )   -> P = "kubelet-kubepods"
//!             sd-qos(P)
//! sd-qos(P) = [ "/" P "-besteffort.slice" | "/" P "-burstable.slice" ]  -> P = P "-" qos
//!             sd-pod(P)
//! sd-pod(P) = "/" P "-pod" UUID_ ".slice" "/" runtime "-" HEX64 ".scope" [crun]
//! runtime   = "cri-containerd" | "containerd" | "crio" | "cri-o" | "docker"
//! crun      = "/container"        ; crun with the systemd driver on cgroup v2
//! ```
//!
//! Each systemd slice is named after its parent, as systemd requires (`a-b-c.slice` lives in
//! `a-b.slice`); `crio-conmon-<id>.scope` (CRI-O's monitor, not a container) is not a
//! container. The pod segment sits directly under the kubepods or QoS level, the container
//! directly under the pod, and nothing follows it but crun's literal `container` cgroup (only
//! root, the runtime or that container itself can create cgroups below a container's cgroup,
//! so it names the same container).
//!
//! # Private cgroup namespaces
//!
//! On cgroup v2, containerd gives non-privileged containers, the agent's included, a private
//! cgroup namespace: the kernel shows other processes' paths relative to the agent's own
//! container cgroup, with one leading `..` per level climbed. The agent reads the depth `d` of
//! its namespace root once, as the number of leading `..` in the v2 line of `/proc/1/cgroup`
//! (pid 1 is the host's init under `hostPID`; [`namespace_depth`]); `d = 0` means no private
//! namespace. A path with `j` leading `..` is then judged as follows:
//!
//! - `j == d`: the rest is an absolute host path and must match `path` above, from the root.
//! - `0 < j < d`: the process sits below one of the agent's own ancestors, which are the
//!   kubelet's QoS and kubepods cgroups (the agent runs in a pod), where only root can create
//!   cgroups. The rest must be a pod below such a level: `cfs-qos`, or `sd-qos(P)` with `P` one
//!   of `kubepods` and `kubelet-kubepods`, or `sd-pod(P)` with `P` one of those two followed by
//!   `-besteffort` or `-burstable` (so `[qos/]pod<uid>/<container>`, slice names consistent
//!   with each other).
//! - `j > d`, `j == 0 < d`, and anything else with `j < d` are refused.
//!
//! A process in a cgroup an unprivileged user controls (a systemd `user@.service` delegation,
//! any cgroup outside the agent's ancestors) shares only the root with the agent, so it always
//! has `j == d` and its path is held to the full grammar from the root: the forgeries below
//! stay refused at every `j`. Containers of the agent's own pod (`j == 1`) name no pod.
//!
//! # Lines and ambiguity
//!
//! Lines that name no pod (`0::/`, `/system.slice/containerd.service`, a v2 line on a hybrid
//! host) are ignored. The file names a pod only if at least one line matches the grammar and all
//! matching lines agree on pod and container. A line that looks like a Kubernetes placement (a
//! segment containing `kubepods` or `pod<uuid>`) but does not match the grammar is treated as a
//! forgery and the whole file names no pod, as does any disagreement between lines.
//!
//! The node-container prefixes are trusted because only root on the host can create cgroups
//! there; a process that can write there (root, a privileged container) can already do anything
//! the agent can.

/// Where a process sits in Kubernetes, as its cgroup path tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// Pod UID (with dashes, as the API server writes it).
    pub pod_uid: String,
    /// Container ID (64 lower-case hex digits), without runtime prefix.
    pub container_id: String,
}

/// Runtime prefixes of a systemd container scope (`<runtime>-<id>.scope`).
const SCOPE_RUNTIMES: [&str; 5] = ["cri-containerd", "containerd", "crio", "cri-o", "docker"];

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(is_lower_hex)
}

/// A lower-case UUID whose four separators are `sep`.
fn is_uuid_with(s: &str, sep: u8) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == sep,
            _ => is_lower_hex(b),
        })
}

/// Whether a segment would pass for a Kubernetes one: contains `kubepods`, or `pod` followed by
/// something UUID-shaped (either separator, either case).
fn looks_kube(segment: &str) -> bool {
    if segment.to_ascii_lowercase().contains("kubepods") {
        return true;
    }
    segment
        .to_ascii_lowercase()
        .match_indices("pod")
        .any(|(i, _)| {
            segment
                .get(i + 3..)
                .and_then(|rest| rest.get(..36))
                .map(str::to_ascii_lowercase)
                .is_some_and(|u| is_uuid_with(&u, b'-') || is_uuid_with(&u, b'_'))
        })
}

/// The component of a systemd slice named `<parent>-<component>.slice`.
fn child_slice<'a>(parent: &str, segment: &'a str) -> Option<&'a str> {
    segment
        .strip_suffix(".slice")?
        .strip_prefix(parent)?
        .strip_prefix('-')
        .filter(|c| !c.is_empty())
}

/// Drops a kind node container's prefix (`docker/<id>` or `system.slice/docker-<id>.scope`).
fn strip_node_container<'a, 'b>(segs: &'b [&'a str]) -> &'b [&'a str] {
    match segs {
        ["docker", id, rest @ ..] if is_hex64(id) => rest,
        ["system.slice", scope, rest @ ..]
            if scope
                .strip_prefix("docker-")
                .and_then(|s| s.strip_suffix(".scope"))
                .is_some_and(is_hex64) =>
        {
            rest
        }
        _ => segs,
    }
}

/// A container segment, optionally followed by crun's literal `container` cgroup.
fn container_segment<'a>(segs: &[&'a str]) -> Option<&'a str> {
    match segs {
        [c] | [c, "container"] => Some(c),
        _ => None,
    }
}

/// cgroupfs driver: `[kubelet/]kubepods/` then [`cgroupfs_qos`].
fn cgroupfs(segs: &[&str]) -> Option<PodContainer> {
    let segs = match segs {
        ["kubelet", rest @ ..] => rest,
        _ => segs,
    };
    let ["kubepods", rest @ ..] = segs else {
        return None;
    };
    cgroupfs_qos(rest)
}

/// cgroupfs driver below the kubepods level: `[besteffort|burstable/]pod<UUID>/<id>[/container]`.
fn cgroupfs_qos(segs: &[&str]) -> Option<PodContainer> {
    let rest = match segs {
        ["besteffort" | "burstable", rest @ ..] => rest,
        _ => segs,
    };
    let [pod, container @ ..] = rest else {
        return None;
    };
    let uid = pod.strip_prefix("pod").filter(|u| is_uuid_with(u, b'-'))?;
    let container = container_segment(container)?;
    let id = container.strip_prefix("crio-").unwrap_or(container);
    is_hex64(id).then(|| PodContainer {
        pod_uid: uid.to_string(),
        container_id: id.to_string(),
    })
}

/// Names of the systemd kubepods level (the `P` of the grammar).
const KUBEPODS_SLICES: [&str; 2] = ["kubepods", "kubelet-kubepods"];

/// Names of the systemd QoS level (`P "-" qos` in the grammar).
const QOS_SLICES: [&str; 4] = [
    "kubepods-besteffort",
    "kubepods-burstable",
    "kubelet-kubepods-besteffort",
    "kubelet-kubepods-burstable",
];

/// systemd driver: slices named after their parents down to the pod, then the container scope.
fn systemd(segs: &[&str]) -> Option<PodContainer> {
    let (parent, rest): (&str, &[&str]) = match segs {
        ["kubepods.slice", rest @ ..] => ("kubepods", rest),
        ["kubelet.slice", "kubelet-kubepods.slice", rest @ ..] => ("kubelet-kubepods", rest),
        _ => return None,
    };
    systemd_qos(parent, rest)
}

/// systemd driver below the kubepods slice named `parent`: an optional QoS slice, then
/// [`systemd_pod`].
fn systemd_qos(parent: &str, segs: &[&str]) -> Option<PodContainer> {
    match segs {
        [qos, rest @ ..]
            if matches!(child_slice(parent, qos), Some("besteffort" | "burstable")) =>
        {
            systemd_pod(qos.strip_suffix(".slice")?, rest)
        }
        _ => systemd_pod(parent, segs),
    }
}

/// systemd driver below the slice named `parent`: `<parent>-pod<UUID_>.slice/<runtime>-<id>.scope`
/// and crun's optional `container`.
fn systemd_pod(parent: &str, segs: &[&str]) -> Option<PodContainer> {
    let [pod, scope @ ..] = segs else {
        return None;
    };
    let uid = child_slice(parent, pod)?
        .strip_prefix("pod")
        .filter(|u| is_uuid_with(u, b'_'))?;
    let name = container_segment(scope)?.strip_suffix(".scope")?;
    let id = SCOPE_RUNTIMES.iter().find_map(|r| {
        name.strip_prefix(r)?
            .strip_prefix('-')
            .filter(|i| is_hex64(i))
    })?;
    Some(PodContainer {
        pod_uid: uid.replace('_', "-"),
        container_id: id.to_string(),
    })
}

/// A path anchored at the cgroup root (after any leading `..`, when `j == d`).
fn from_root(segs: &[&str]) -> Option<PodContainer> {
    let segs = strip_node_container(segs);
    cgroupfs(segs).or_else(|| systemd(segs))
}

/// A path below one of the agent's own ancestors (`0 < j < d`): a pod below the kubepods or a
/// QoS level, never a kubepods level or anything before it.
fn from_ancestor(segs: &[&str]) -> Option<PodContainer> {
    cgroupfs_qos(segs)
        .or_else(|| KUBEPODS_SLICES.iter().find_map(|p| systemd_qos(p, segs)))
        .or_else(|| QOS_SLICES.iter().find_map(|p| systemd_pod(p, segs)))
}

/// The depth of this process's cgroup-namespace root below the host's cgroup root: the number
/// of leading `..` segments of the cgroup-v2 line (`0::`) of `/proc/1/cgroup`, when pid 1 is
/// the host's init (`hostPID`). 0 when there is no v2 line or no private namespace.
pub fn namespace_depth(init_cgroup_file: &str) -> usize {
    init_cgroup_file
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .and_then(|path| path.strip_prefix('/'))
        .map_or(0, |rel| rel.split('/').take_while(|s| *s == "..").count())
}

/// What one cgroup line says.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A container of a pod, exactly where the kubelet puts it.
    Pod(PodContainer),
    /// Nothing about pods.
    Outside,
    /// Looks like a Kubernetes placement but is not one.
    Forged,
}

fn classify(line: &str, ns_depth: usize) -> Line {
    // hierarchy-ID:controller-list:cgroup-path (the path itself may contain ':').
    let mut parts = line.splitn(3, ':');
    let (Some(id), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
        return if looks_kube(line) {
            Line::Forged
        } else {
            Line::Outside
        };
    };
    let forged_or_outside = || {
        if path.split('/').any(looks_kube) {
            Line::Forged
        } else {
            Line::Outside
        }
    };
    let Some(rel) = path.strip_prefix('/') else {
        return forged_or_outside();
    };
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) || rel.is_empty() {
        return forged_or_outside();
    }
    let segs: Vec<&str> = rel.split('/').collect();
    // Leading `..`: how far above the agent's cgroup-namespace root the path climbs.
    let j = segs.iter().take_while(|s| **s == "..").count();
    let rest = segs.get(j..).unwrap_or_default();
    if rest.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return forged_or_outside();
    }
    let found = if j == ns_depth {
        from_root(rest)
    } else if 0 < j && j < ns_depth {
        from_ancestor(rest)
    } else {
        None
    };
    match found {
        Some(pc) => Line::Pod(pc),
        None => forged_or_outside(),
    }
}

/// Finds the pod and container of a process from the text of its `/proc/<pid>/cgroup`, as seen
/// from a cgroup namespace whose root is `ns_depth` levels below the host's root (see
/// [`namespace_depth`]; 0 without a private namespace). Processes outside pods (host daemons,
/// user sessions), forged placements and ambiguous files give `None`, not an error.
pub fn parse(cgroup_file: &str, ns_depth: usize) -> Option<PodContainer> {
    let mut found: Option<PodContainer> = None;
    for line in cgroup_file.lines().filter(|l| !l.is_empty()) {
        match classify(line, ns_depth) {
            Line::Outside => {}
            Line::Forged => return None,
            Line::Pod(pc) => match &found {
                Some(f) if *f != pc => return None,
                Some(_) => {}
                None => found = Some(pc),
            },
        }
    }
    found
}

#[cfg(test)]
mod tests;
