//! Attestors and selectors for Continuity.
//!
//! - [`selector`]: the `type:value` selectors entries are written with (SPIRE's spelling),
//!   validated per type so a typo is caught at `entry create`, not at attestation time.
//! - [`unix`]: the Unix workload attestor (uid, gid, user, group, supplementary gids, path, sha256).
//! - [`k8s`]: the k8s workload attestor (cgroup → kubelet → `k8s:` selectors).
//! - [`k8s_psat`]: the k8s_psat node attestor (projected service-account tokens).
//! - [`join_token`]: the join-token node attestor's shared pieces (the agent ID it yields).
#![forbid(unsafe_code)]
// A unit test reads as one scenario, however long; functions outside tests stay under
// clippy.toml's line limit.
#![cfg_attr(test, allow(clippy::too_many_lines))]

pub mod join_token;
pub mod k8s;
pub mod k8s_psat;
pub mod selector;
pub mod unix;

pub use selector::{Selector, SelectorError};
