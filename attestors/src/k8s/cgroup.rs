//! Pod UID and container ID from `/proc/<pid>/cgroup`, for cgroup v1 and v2, the systemd and
//! cgroupfs drivers, and containerd, CRI-O and Docker naming.

/// Where a process sits in Kubernetes, as its cgroup path tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// Pod UID (with dashes, as the API server writes it).
    pub pod_uid: String,
    /// Container ID (64 hex digits), without runtime prefix.
    pub container_id: String,
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// The pod UID in one path segment: `pod<uid>` (cgroupfs) or `...-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(segment: &str) -> Option<String> {
    let s = segment.strip_suffix(".slice").unwrap_or(segment);
    let i = s.rfind("pod")?;
    if i > 0 && !s[..i].ends_with('-') {
        return None;
    }
    let uid = s[i + 3..].replace('_', "-");
    is_uuid(&uid).then_some(uid)
}

/// The container ID in the last path segment: `<id>`, `docker-<id>.scope`,
/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `containerd-<id>.scope`.
fn container_id(segment: &str) -> Option<String> {
    let s = segment.strip_suffix(".scope").unwrap_or(segment);
    if s.starts_with("crio-conmon-") {
        return None;
    }
    let id = [
        "cri-containerd-",
        "containerd-",
        "crio-",
        "docker-",
        "cri-o-",
    ]
    .iter()
    .find_map(|p| s.strip_prefix(p))
    .unwrap_or(s);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// Finds the pod and container of a process from the text of its `/proc/<pid>/cgroup`.
/// Processes outside pods (host daemons, user sessions) give `None`, not an error.
pub fn parse(cgroup_file: &str) -> Option<PodContainer> {
    for line in cgroup_file.lines() {
        // hierarchy-ID:controller-list:cgroup-path
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let Some(pod_at) = segments.iter().position(|s| pod_uid(s).is_some()) else {
            continue;
        };
        let Some(uid) = pod_uid(segments[pod_at]) else {
            continue;
        };
        if let Some(id) = segments[pod_at + 1..].last().and_then(|s| container_id(s)) {
            return Some(PodContainer {
                pod_uid: uid,
                container_id: id,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

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
}
