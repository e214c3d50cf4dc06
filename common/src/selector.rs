//! Selector-set matching, one rule shared by the agent (which cached identities a workload
//! may have) and the server (entry filters). Generic over the selector type, so this crate
//! needs no attestor: `continuity_attestors::Selector` is the type both sides use.

use std::collections::{BTreeSet, HashSet};
use std::hash::{BuildHasher, Hash};

/// A collection of selectors that can say whether one is among them.
pub trait SelectorSet<T> {
    /// Whether `selector` is in the collection.
    fn has(&self, selector: &T) -> bool;
}

impl<T: Eq + Hash, S: BuildHasher> SelectorSet<T> for HashSet<T, S> {
    fn has(&self, selector: &T) -> bool {
        self.contains(selector)
    }
}

impl<T: Ord> SelectorSet<T> for BTreeSet<T> {
    fn has(&self, selector: &T) -> bool {
        self.contains(selector)
    }
}

impl<T: PartialEq> SelectorSet<T> for [T] {
    fn has(&self, selector: &T) -> bool {
        self.contains(selector)
    }
}

impl<T: PartialEq> SelectorSet<T> for Vec<T> {
    fn has(&self, selector: &T) -> bool {
        self.as_slice().contains(selector)
    }
}

/// Whether every selector of `required` is in `have` (no required selector: true).
pub fn subset<T, H: SelectorSet<T> + ?Sized>(required: &[T], have: &H) -> bool {
    required.iter().all(|s| have.has(s))
}

/// Whether a workload with selectors `have` may have the identity of an entry requiring
/// `required`: every required selector is present, and an entry requiring none matches no
/// workload (so an empty selector list never grants an identity to everyone).
pub fn matches<T, H: SelectorSet<T> + ?Sized>(required: &[T], have: &H) -> bool {
    !required.is_empty() && subset(required, have)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&'static str]) -> HashSet<&'static str> {
        items.iter().copied().collect()
    }

    #[test]
    fn subset_needs_every_required_selector() {
        let have = set(&["unix:uid:1000", "unix:gid:1000"]);
        assert!(subset(&["unix:uid:1000"], &have));
        assert!(subset(&["unix:uid:1000", "unix:gid:1000"], &have));
        assert!(!subset(&["unix:uid:1000", "unix:user:root"], &have));
        assert!(!subset(&["unix:uid:0"], &set(&[])));
    }

    #[test]
    fn empty_requirement_is_a_subset_but_matches_nothing() {
        let have = set(&["unix:uid:1000"]);
        assert!(subset::<&str, _>(&[], &have));
        assert!(!matches::<&str, _>(&[], &have));
        assert!(!matches::<&str, _>(&[], &set(&[])));
    }

    #[test]
    fn matches_is_subset_for_a_non_empty_requirement() {
        let have = set(&["k8s:ns:prod", "k8s:sa:web"]);
        assert!(matches(&["k8s:ns:prod"], &have));
        assert!(!matches(&["k8s:ns:prod", "k8s:sa:db"], &have));
    }

    #[test]
    fn every_collection_answers_the_same() {
        let required = ["a", "b"];
        let have = ["c", "b", "a"];
        let btree: BTreeSet<_> = have.iter().copied().collect();
        assert!(subset(&required, &set(&have)));
        assert!(subset(&required, &btree));
        assert!(subset(&required, &have[..]));
        assert!(subset(&required, &have.to_vec()));
        assert!(!subset(&["d"], &have[..]));
    }

    #[test]
    fn duplicates_in_the_requirement_do_not_change_the_answer() {
        let have = set(&["a"]);
        assert!(matches(&["a", "a"], &have));
    }
}
