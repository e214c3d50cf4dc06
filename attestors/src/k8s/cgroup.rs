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
//! Each line is `hierarchy-ID:controllers:path`. The path must start with `/`, and has no empty,
//! `.` or `..` segments (a `..` means the process is outside the agent's cgroup namespace, so
//! the path cannot be anchored). `HEX64` is 64 lower-case hex digits, `UUID` a lower-case
//! 8-4-4-4-12 UUID (`UUID_` the same with `_` for `-`, as systemd escapes it).
//!
//! ```text
//! path      = [node] (cgroupfs | systemd)
//! node      = "/docker/" HEX64                       ; kind node container, cgroup v1,
//!           | "/system.slice/docker-" HEX64 ".scope"  ;   no cgroup namespace
//! cgroupfs  = ["/kubelet"] "/kubepods" ["/besteffort" | "/burstable"]
//!             "/pod" UUID "/" ( HEX64 | "crio-" HEX64 )
//! systemd   = ( "/kubepods.slice"                           -> P = "kubepods"
//!             | "/kubelet.slice/kubelet-kubepods.slice" )   -> P = "kubelet-kubepods"
//!             [ "/" P "-besteffort.slice" | "/" P "-burstable.slice" ]  -> P = P "-" qos
//!             "/" P "-pod" UUID_ ".slice"
//!             "/" runtime "-" HEX64 ".scope"
//! runtime   = "cri-containerd" | "containerd" | "crio" | "cri-o" | "docker"
//! ```
//!
//! Each systemd slice is named after its parent, as systemd requires (`a-b-c.slice` lives in
//! `a-b.slice`); `crio-conmon-<id>.scope` (CRI-O's monitor, not a container) is not a
//! container. The pod segment sits directly under the kubepods or QoS level, the container
//! directly under the pod, and nothing follows it.
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

/// cgroupfs driver: `[kubelet/]kubepods/[besteffort|burstable/]pod<UUID>/<id>`.
fn cgroupfs(segs: &[&str]) -> Option<PodContainer> {
    let segs = match segs {
        ["kubelet", rest @ ..] => rest,
        _ => segs,
    };
    let ["kubepods", rest @ ..] = segs else {
        return None;
    };
    let rest = match rest {
        ["besteffort" | "burstable", rest @ ..] => rest,
        _ => rest,
    };
    let [pod, container] = rest else {
        return None;
    };
    let uid = pod.strip_prefix("pod").filter(|u| is_uuid_with(u, b'-'))?;
    let id = container.strip_prefix("crio-").unwrap_or(container);
    is_hex64(id).then(|| PodContainer {
        pod_uid: uid.to_string(),
        container_id: id.to_string(),
    })
}

/// systemd driver: slices named after their parents down to the pod, then the container scope.
fn systemd(segs: &[&str]) -> Option<PodContainer> {
    let (mut parent, rest): (&str, &[&str]) = match segs {
        ["kubepods.slice", rest @ ..] => ("kubepods", rest),
        ["kubelet.slice", "kubelet-kubepods.slice", rest @ ..] => ("kubelet-kubepods", rest),
        _ => return None,
    };
    let rest = match rest {
        [qos, rest @ ..]
            if matches!(child_slice(parent, qos), Some("besteffort" | "burstable")) =>
        {
            parent = qos.strip_suffix(".slice")?;
            rest
        }
        _ => rest,
    };
    let [pod, scope] = rest else {
        return None;
    };
    let uid = child_slice(parent, pod)?
        .strip_prefix("pod")
        .filter(|u| is_uuid_with(u, b'_'))?;
    let name = scope.strip_suffix(".scope")?;
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

fn classify(line: &str) -> Line {
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
    if segs.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return forged_or_outside();
    }
    let segs = strip_node_container(&segs);
    match cgroupfs(segs).or_else(|| systemd(segs)) {
        Some(pc) => Line::Pod(pc),
        None => forged_or_outside(),
    }
}

/// Finds the pod and container of a process from the text of its `/proc/<pid>/cgroup`.
/// Processes outside pods (host daemons, user sessions), forged placements and ambiguous files
/// give `None`, not an error.
pub fn parse(cgroup_file: &str) -> Option<PodContainer> {
    let mut found: Option<PodContainer> = None;
    for line in cgroup_file.lines().filter(|l| !l.is_empty()) {
        match classify(line) {
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

    #[test]
    fn real_world_cgroup_lines() {
        let u = UID.replace('-', "_");
        let cases: Vec<(&str, String)> = vec![
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
        ];
        for (what, text) in cases {
            assert_eq!(
                parse(&text),
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
            assert_eq!(parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn forged_placements_name_no_pod() {
        let u = UID.replace('-', "_");
        let good = format!("0::/kubepods/besteffort/pod{UID}/{CID}");
        let cases: Vec<(&str, String)> = vec![
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
        ];
        assert!(parse(&good).is_some());
        for (what, text) in cases {
            assert_eq!(parse(&text), None, "{what}: {text}");
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
        for text in &inputs {
            let _ = parse(text);
        }
    }
}
