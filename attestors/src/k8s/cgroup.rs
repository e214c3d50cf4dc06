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
mod tests {
    use super::*;

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
    const NODE: &str = "93529524695bb00d91c1f6dba692ea8d3550c3b94fb2463af7bc9ec82f992d26";
    const OTHER_UID: &str = "a2830d0d-b0f0-4ff0-81b5-0ee4e299cf80";

    /// Real placements, from the host's cgroup root.
    fn real_world() -> Vec<(&'static str, String)> {
        let u = UID.replace('-', "_");
        vec![
            (
                "v1 cgroupfs, docker",
                format!(
                    "11:memory:/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/kubepods/besteffort/pod{UID}/{CID}"
                ),
            ),
            (
                "v1 cgroupfs, guaranteed QoS",
                format!("4:cpu,cpuacct:/kubepods/pod{UID}/{CID}"),
            ),
            (
                "v1 systemd, docker",
                format!(
                    "1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/docker-{CID}.scope"
                ),
            ),
            (
                "v2 systemd, containerd",
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
            ),
            (
                "v2 systemd, CRI-O",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-{CID}.scope"
                ),
            ),
            (
                "v2 systemd, guaranteed",
                format!("0::/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{CID}.scope"),
            ),
            (
                "v2 cgroupfs, containerd",
                format!("0::/kubepods/burstable/pod{UID}/{CID}"),
            ),
            (
                "kind node (nested kubelet slice)",
                format!(
                    "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
            ),
            (
                "kind node, cgroup v1 without a cgroup namespace (docker cgroupfs driver)",
                format!(
                    "12:pids:/docker/{NODE}/kubepods/besteffort/pod{UID}/{CID}\n0::/docker/{NODE}/system.slice/containerd.service"
                ),
            ),
            (
                "kind node, cgroupfs driver with cgroup root /kubelet",
                format!("5:memory:/docker/{NODE}/kubelet/kubepods/burstable/pod{UID}/{CID}"),
            ),
            (
                "kind node in a docker systemd scope",
                format!(
                    "1:name=systemd:/system.slice/docker-{NODE}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
            ),
            (
                "v2 cgroupfs, CRI-O",
                format!("0::/kubepods/besteffort/pod{UID}/crio-{CID}"),
            ),
            (
                "v1 with mixed lines",
                format!("12:pids:/\n9:name=systemd:/\n4:memory:/kubepods/burstable/pod{UID}/{CID}"),
            ),
        ]
    }

    fn want() -> Option<PodContainer> {
        Some(PodContainer {
            pod_uid: UID.into(),
            container_id: CID.into(),
        })
    }

    /// `text` as seen from a cgroup namespace: `j` leading `..` on every path.
    fn climb(text: &str, j: usize) -> String {
        text.lines()
            .map(|l| match l.match_indices(":/").next() {
                Some((i, _)) => format!("{}:/{}{}", &l[..i], "../".repeat(j), &l[i + 2..]),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn real_world_cgroup_lines() {
        for (what, text) in real_world() {
            assert_eq!(
                parse(&text, 0),
                Some(PodContainer {
                    pod_uid: UID.into(),
                    container_id: CID.into()
                }),
                "{what}"
            );
        }
    }

    #[test]
    fn processes_outside_pods_have_no_pod() {
        for text in [
            "0::/",
            "0::/user.slice/user-1000.slice/session-3.scope",
            "0::/system.slice/containerd.service",
            "1:name=systemd:/system.slice/docker.service\n0::/init.scope",
            "4:memory:/process_api/357b2dce49ab994cfb4a16bf96190d64",
            &format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-conmon-{CID}.scope",
                UID.replace('-', "_")
            ),
            &format!("0::/kubepods/burstable/pod{UID}"),
            "garbage without colons",
            "",
        ] {
            assert_eq!(parse(text, 0), None, "{text:?}");
        }
    }

    /// Forged placements, written from the host's cgroup root.
    fn forgeries() -> Vec<(&'static str, String)> {
        let u = UID.replace('-', "_");
        let good = format!("0::/kubepods/besteffort/pod{UID}/{CID}");
        vec![
            (
                "user@.service delegation",
                format!(
                    "0::/user.slice/user-1000.slice/user@1000.service/app.slice/pod{UID}/{CID}"
                ),
            ),
            (
                "user@.service delegation, systemd spelling",
                format!(
                    "0::/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
            ),
            (
                "system.slice service",
                format!("0::/system.slice/evil.service/pod{UID}/{CID}"),
            ),
            (
                "kubepods deeper than the root",
                format!(
                    "0::/user.slice/user-1000.slice/user@1000.service/kubepods/besteffort/pod{UID}/{CID}"
                ),
            ),
            (
                "kubepods.slice deeper than the root",
                format!(
                    "0::/user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
            ),
            (
                "kubepods not at the root (under a non-node prefix)",
                format!("0::/machine.slice/kubepods/pod{UID}/{CID}"),
            ),
            (
                "node prefix with a short id",
                format!("0::/docker/abc/kubepods/pod{UID}/{CID}"),
            ),
            (
                "pod segment with an extra level (cgroupfs)",
                format!("0::/kubepods/besteffort/extra/pod{UID}/{CID}"),
            ),
            (
                "pod segment with an extra level (systemd)",
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/x.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
            ),
            (
                "trailing extra segment (cgroupfs)",
                format!("0::/kubepods/besteffort/pod{UID}/{CID}/sub"),
            ),
            (
                "trailing extra segment (systemd)",
                format!(
                    "0::/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{CID}.scope/{CID}"
                ),
            ),
            (
                "container two levels under the pod",
                format!("0::/kubepods/pod{UID}/x/{CID}"),
            ),
            (
                "systemd pod slice not named after its parent",
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
            ),
            (
                "systemd QoS slice not named after its parent",
                format!(
                    "0::/kubepods.slice/evil-besteffort.slice/evil-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
            ),
            (
                "systemd pod slice with dashes (a deeper slice in systemd naming)",
                format!("0::/kubepods.slice/kubepods-pod{UID}.slice/cri-containerd-{CID}.scope"),
            ),
            (
                "systemd container without .scope",
                format!("0::/kubepods.slice/kubepods-pod{u}.slice/{CID}"),
            ),
            (
                "dot-dot segments",
                format!("0::/user.slice/../kubepods/besteffort/pod{UID}/{CID}"),
            ),
            (
                "dot-dot at the start (outside the cgroup namespace)",
                format!("0::/../kubepods/besteffort/pod{UID}/{CID}"),
            ),
            ("dot segment", format!("0::/kubepods/./pod{UID}/{CID}")),
            ("empty segment", format!("0::/kubepods//pod{UID}/{CID}")),
            ("relative path", format!("0::kubepods/pod{UID}/{CID}")),
            (
                "upper-case container id",
                format!("0::/kubepods/pod{UID}/{}", CID.to_ascii_uppercase()),
            ),
            (
                "prefix of a container id",
                format!("0::/kubepods/pod{UID}/{}", &CID[..63]),
            ),
            (
                "mixed lines, one forged",
                format!(
                    "{good}\n1:name=systemd:/user.slice/user-1000.slice/user@1000.service/app.slice/pod{OTHER_UID}/{CID}"
                ),
            ),
            (
                "mixed lines, forged with a real line outside pods",
                format!(
                    "9:pids:/user.slice/user-1000.slice/session-2.scope\n0::/user.slice/user-1000.slice/user@1000.service/app.slice/pod{UID}/{CID}"
                ),
            ),
            (
                "two lines naming different pods",
                format!("{good}\n4:memory:/kubepods/besteffort/pod{OTHER_UID}/{CID}"),
            ),
            (
                "two lines naming different containers",
                format!(
                    "{good}\n4:memory:/kubepods/besteffort/pod{UID}/{}",
                    CID.replace('9', "8")
                ),
            ),
            (
                "a line without a hierarchy id",
                format!("{good}\nkubepods/pod{UID}/{CID}"),
            ),
            (
                "non-numeric hierarchy id",
                format!("x::/kubepods/pod{UID}/{CID}"),
            ),
        ]
    }

    #[test]
    fn forged_placements_name_no_pod() {
        let good = format!("0::/kubepods/besteffort/pod{UID}/{CID}");
        assert!(parse(&good, 0).is_some());
        for (what, text) in forgeries() {
            assert_eq!(parse(&text, 0), None, "{what}: {text}");
        }
    }

    #[test]
    fn namespace_depth_counts_the_leading_dot_dots_of_the_v2_line() {
        for (text, d) in [
            ("0::/", 0),
            ("0::/init.scope", 0),
            ("0::/../../..", 3),
            ("0::/../../../../init.scope", 4),
            ("12:pids:/../..\n0::/../x/..", 1),
            ("9:name=systemd:/\n4:memory:/kubepods", 0),
            ("0::", 0),
            ("0::..", 0),
            ("garbage", 0),
            ("", 0),
        ] {
            assert_eq!(namespace_depth(text), d, "{text:?}");
        }
    }

    #[test]
    fn namespaced_paths_climbing_to_the_root_keep_the_full_grammar() {
        // j == d: the rest is a host path from the root, judged exactly as without a namespace.
        for d in 1..=5 {
            for (what, text) in real_world() {
                assert_eq!(parse(&climb(&text, d), d), want(), "d = {d}: {what}");
            }
        }
    }

    /// Pods next to the agent, as a namespaced agent sees them: (what, j, path without `..`).
    fn below_ancestors() -> Vec<(&'static str, usize, String)> {
        let u = UID.replace('-', "_");
        vec![
            (
                "systemd, other QoS (QoS level below kubepods.slice)",
                3,
                format!(
                    "kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
            ),
            (
                "systemd, guaranteed pod (pod level below kubepods.slice)",
                3,
                format!("kubepods-pod{u}.slice/cri-containerd-{CID}.scope"),
            ),
            (
                "systemd, same QoS as the agent (pod level below the QoS slice)",
                2,
                format!("kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"),
            ),
            (
                "systemd, CRI-O with crun's container cgroup",
                2,
                format!("kubepods-burstable-pod{u}.slice/crio-{CID}.scope/container"),
            ),
            (
                "kind, nested kubelet slice, other QoS",
                3,
                format!(
                    "kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
            ),
            (
                "kind, nested kubelet slice, same QoS",
                2,
                format!("kubelet-kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"),
            ),
            (
                "cgroupfs, QoS level",
                3,
                format!("burstable/pod{UID}/{CID}"),
            ),
            ("cgroupfs, pod level", 2, format!("pod{UID}/{CID}")),
            ("cgroupfs, CRI-O", 2, format!("pod{UID}/crio-{CID}")),
        ]
    }

    #[test]
    fn namespaced_paths_below_the_agents_ancestors_name_pods() {
        // The agent in a besteffort pod: kubepods.slice/kubepods-besteffort.slice/<pod>/<ctr>.
        let d = 4;
        for (what, j, rest) in below_ancestors() {
            let text = format!("0::/{}{rest}", "../".repeat(j));
            assert_eq!(parse(&text, d), want(), "{what}: {text}");
            // Any 0 < j < d is an ancestor of the agent; 0, d and beyond are not.
            for other in 1..d {
                let text = format!("0::/{}{rest}", "../".repeat(other));
                assert_eq!(parse(&text, d), want(), "{what} at j = {other}");
            }
            for other in [0, d, d + 1, d + 5] {
                let text = format!("0::/{}{rest}", "../".repeat(other));
                assert_eq!(parse(&text, d), None, "{what} at j = {other}: {text}");
            }
            // Without a namespace, a pod below nothing is nothing.
            assert_eq!(parse(&format!("0::/{rest}"), 0), None, "{what}, d = 0");
            assert_eq!(
                parse(&format!("0::/../{rest}"), 0),
                None,
                "{what}, d = 0, j = 1"
            );
        }
    }

    #[test]
    fn namespaced_paths_below_ancestors_are_only_pods() {
        let u = UID.replace('-', "_");
        let d = 4;
        // Real from the root (j == d), but no kubepods level sits below another one.
        for (what, rest) in [
            (
                "a kubepods level below an ancestor",
                format!("kubepods/besteffort/pod{UID}/{CID}"),
            ),
            (
                "a kubepods.slice below an ancestor",
                format!("kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{CID}.scope"),
            ),
        ] {
            for j in 0..d {
                let text = format!("0::/{}{rest}", "../".repeat(j));
                assert_eq!(parse(&text, d), None, "{what} at j = {j}: {text}");
            }
            let text = format!("0::/{}{rest}", "../".repeat(d));
            assert_eq!(parse(&text, d), want(), "{what} at j = d: {text}");
        }
        for (what, rest) in [
            (
                "a user delegation below an ancestor",
                format!("user.slice/user-1000.slice/user@1000.service/app.slice/pod{UID}/{CID}"),
            ),
            (
                "QoS and pod slices not named after each other",
                format!(
                    "kubepods-besteffort.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
            ),
            (
                "QoS slice of a mixed family",
                format!(
                    "kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
            ),
            (
                "pod slice with an unknown parent",
                format!("evil-pod{u}.slice/cri-containerd-{CID}.scope"),
            ),
            (
                "pod slice with an unknown QoS",
                format!("kubepods-gold-pod{u}.slice/cri-containerd-{CID}.scope"),
            ),
            (
                "an extra level between QoS and pod",
                format!("burstable/x/pod{UID}/{CID}"),
            ),
            ("an unknown QoS directory", format!("gold/pod{UID}/{CID}")),
            (
                "a container without its pod (the agent's own pod)",
                format!("cri-containerd-{CID}.scope"),
            ),
            ("a cgroupfs container without its pod", CID.to_string()),
            (
                "a trailing segment",
                format!("kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope/sub"),
            ),
            (
                "a pod inside a container",
                format!(
                    "kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope/kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
            ),
            (
                "dot-dot after the climb",
                format!(
                    "kubepods-besteffort.slice/../kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
            ),
        ] {
            for j in 0..=d + 1 {
                let text = format!("0::/{}{rest}", "../".repeat(j));
                assert_eq!(parse(&text, d), None, "{what} at j = {j}: {text}");
            }
        }
    }

    #[test]
    fn forged_placements_name_no_pod_from_any_namespace() {
        // A user's delegated cgroups share only the root with the agent, so the kernel shows
        // them with j == d; every forgery stays refused at every j, for every depth.
        for d in 0..=5 {
            for j in 0..=d + 2 {
                // (Its one `..` is what a namespace adds: it is real at j + 1 == d, and is
                // covered by the ancestor tests.)
                for (what, text) in forgeries()
                    .into_iter()
                    .filter(|(w, _)| !w.starts_with("dot-dot at the start"))
                {
                    let text = climb(&text, j);
                    assert_eq!(parse(&text, d), None, "d = {d}, j = {j}, {what}: {text}");
                }
            }
        }
    }

    #[test]
    fn crun_container_cgroup_names_its_container() {
        let u = UID.replace('-', "_");
        let scope = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-{CID}.scope"
        );
        assert_eq!(parse(&format!("{scope}/container"), 0), want());
        assert_eq!(
            parse(
                &format!("0::/kubepods/burstable/pod{UID}/crio-{CID}/container"),
                0
            ),
            want()
        );
        for bad in [
            format!("{scope}/container/container"),
            format!("{scope}/containers"),
            format!("{scope}/Container"),
            format!("{scope}/container/{CID}"),
            format!("{scope}/sub"),
            format!("{scope}/container/"),
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-conmon-{CID}.scope/container"
            ),
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/container"
            ),
            format!("0::/kubepods/burstable/pod{UID}/container"),
            format!(
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods-burstable-pod{u}.slice/crio-{CID}.scope/container"
            ),
        ] {
            assert_eq!(parse(&bad, 0), None, "{bad}");
        }
    }

    #[test]
    fn hostile_text_never_panics() {
        let u = UID.replace('-', "_");
        let mut inputs: Vec<String> = vec![
            "pod".into(),
            "0::/pod".into(),
            "0::/podé".into(),
            "0::/kubepods/podééééééééééééééééééééééééééééééééééééé/x".into(),
            "0::/kubepods.slice/kubepods-pod€.slice/crio-€.scope".into(),
            "0::/kubepods.slice/-.slice/.scope".into(),
            "0::/kubepods.slice/kubepods-.slice/-.scope".into(),
            "0::/kubepods.slice/kubepods-besteffort.slice".into(),
            "0::/kubelet.slice".into(),
            "0::/docker".into(),
            "0::/system.slice/docker-.scope".into(),
            ":::::".into(),
            "\n\n\n".into(),
            "0::/\u{0}pod\u{0}".into(),
            format!("0::/kubepods/pod{}", &UID[..35]),
            format!("0::/kubepods.slice/kubepods-pod{u}é.slice/crio-{CID}.scope"),
        ];
        // Every prefix and every char-boundary cut of real lines.
        for real in [
            format!("0::/kubepods/besteffort/pod{UID}/{CID}"),
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"
            ),
        ] {
            for i in 0..=real.len() {
                inputs.push(real[..i].to_string());
                inputs.push(format!("{}é{}", &real[..i], &real[i..]));
            }
        }
        inputs.push("0::/../../..".into());
        inputs.push("0::/..".into());
        inputs.push(format!("0::/{}", "../".repeat(10_000)));
        inputs.push(format!("0::/{}", "..".repeat(10_000)));
        for text in &inputs {
            for d in [0, 1, 2, 4, usize::MAX] {
                let _ = parse(text, d);
                let _ = parse(&climb(text, 3), d);
            }
            let _ = namespace_depth(text);
        }
    }
}
