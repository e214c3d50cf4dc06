use super::*;

const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
const NODE: &str = "93529524695bb00d91c1f6dba692ea8d3550c3b94fb2463af7bc9ec82f992d26";
const OTHER_UID: &str = "a2830d0d-b0f0-4ff0-81b5-0ee4e299cf80";

/// Real placements, from the host's cgroup root.
fn real_world() -> Vec<(&'static str, String)> {
    let mut all = node_placements();
    all.extend(kind_and_mixed_placements());
    all
}

/// Real placements on a plain node (cgroup v1 and v2, cgroupfs and systemd drivers).
fn node_placements() -> Vec<(&'static str, String)> {
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
    ]
}

/// Real placements in kind nodes (a kubelet inside a container) and mixed v1 files.
fn kind_and_mixed_placements() -> Vec<(&'static str, String)> {
    let u = UID.replace('-', "_");
    vec![
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
    let mut all = misplaced_forgeries();
    all.extend(misshapen_forgeries());
    all.extend(malformed_forgeries());
    all.extend(mixed_line_forgeries());
    all
}

/// Pod-like paths in the wrong place: under a user's delegation or a service, too deep.
fn misplaced_forgeries() -> Vec<(&'static str, String)> {
    let u = UID.replace('-', "_");
    vec![
        (
            "user@.service delegation",
            format!("0::/user.slice/user-1000.slice/user@1000.service/app.slice/pod{UID}/{CID}"),
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
    ]
}

/// Pod-like paths of the wrong shape: extra levels, misnamed slices, a missing `.scope`.
fn misshapen_forgeries() -> Vec<(&'static str, String)> {
    let u = UID.replace('-', "_");
    vec![
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
            format!("0::/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{CID}.scope/{CID}"),
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
    ]
}

/// Paths that are not clean: dot segments, empty or relative paths, altered container ids.
fn malformed_forgeries() -> Vec<(&'static str, String)> {
    vec![
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
    ]
}

/// Files whose lines disagree, or one of whose lines is forged or malformed.
fn mixed_line_forgeries() -> Vec<(&'static str, String)> {
    let good = format!("0::/kubepods/besteffort/pod{UID}/{CID}");
    vec![
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

/// Paths below one of the agent's ancestors that name no pod at any climb.
fn never_pods_below_ancestors() -> Vec<(&'static str, String)> {
    let u = UID.replace('-', "_");
    vec![
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
    ]
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
    for (what, rest) in never_pods_below_ancestors() {
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
