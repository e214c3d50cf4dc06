//! `/proc/<pid>/cgroup` text (written by whoever controls the cgroup tree) through the k8s
//! attestor's parser: no panic, and whatever it accepts is well-formed and taken from the text.
#![no_main]

use continuity_attestors::k8s::cgroup;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the depth of the agent's own cgroup namespace (0 = none).
    let Some((&depth, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if let Some(pc) = cgroup::parse(&text, usize::from(depth % 8)) {
        let id = &pc.container_id;
        assert_eq!(id.len(), 64, "container id {id:?}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert!(text.to_ascii_lowercase().contains(id.as_str()));
        let uid = &pc.pod_uid;
        assert_eq!(uid.len(), 36, "pod uid {uid:?}");
        // cgroupfs writes the UID with dashes, systemd with underscores (the parser reads
        // either separator anywhere, so compare with both spelled as dashes).
        assert!(text.replace('_', "-").contains(uid.as_str()));
    }
});
