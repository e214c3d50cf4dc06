//! The AES-GCM nonce budget of each key version, in memory: encryptions used, and how many
//! are reserved (persisted) in the datastore. `used` never passes `reserved`, and neither
//! passes the maximum.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::VersionId;
use crate::model::engine::KeyVersion;

/// Encryptions reserved (persisted) at a time, so counting costs no write per encryption.
pub(super) const ENCRYPTION_BLOCK: u64 = 4096;

/// Encryptions of one key version: `used` never passes `reserved`, which is persisted first.
#[derive(Debug, Clone, Copy)]
struct NonceBudget {
    used: u64,
    reserved: u64,
}

/// What taking one nonce from a version's budget found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Nonce {
    /// Taken; encrypt.
    Taken,
    /// The reserved block is used up: reserve another.
    Reserve,
    /// The version has had its maximum: rotate.
    Exhausted,
}

/// The budgets of every version encrypted with since start, and the per-version maximum.
#[derive(Debug)]
pub(super) struct NonceBudgets {
    budgets: Mutex<HashMap<VersionId, NonceBudget>>,
    max: AtomicU64,
}

fn id(v: &KeyVersion) -> VersionId {
    (v.engine.clone(), v.key.clone(), v.version)
}

impl NonceBudgets {
    /// Empty budgets allowing `max` encryptions per version.
    pub(super) fn new(max: u64) -> Self {
        Self {
            budgets: Mutex::default(),
            max: AtomicU64::new(max.max(1)),
        }
    }

    /// Sets the per-version maximum (at least 1).
    pub(super) fn set_max(&self, max: u64) {
        self.max.store(max.max(1), Ordering::Relaxed);
    }

    /// The per-version maximum.
    pub(super) fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VersionId, NonceBudget>> {
        self.budgets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one nonce of `v` (its budget starts from the count persisted with it).
    pub(super) fn try_take(&self, v: &KeyVersion) -> Nonce {
        let max = self.max();
        let mut budgets = self.lock();
        let b = budgets.entry(id(v)).or_insert(NonceBudget {
            used: v.encryptions,
            reserved: v.encryptions,
        });
        if b.used >= max {
            Nonce::Exhausted
        } else if b.used < b.reserved {
            b.used += 1;
            Nonce::Taken
        } else {
            Nonce::Reserve
        }
    }

    /// The size of the next block to reserve for `v`, or None when none is needed (the
    /// reserved block is not used up, the maximum is reserved, or `v` has no budget yet).
    pub(super) fn next_block(&self, v: &KeyVersion) -> Option<u64> {
        let max = self.max();
        match self.lock().get(&id(v)) {
            Some(b) if b.used < b.reserved || b.reserved >= max => None,
            Some(b) => Some(ENCRYPTION_BLOCK.min(max - b.reserved)),
            None => None,
        }
    }

    /// Records that the datastore reserved `block` encryptions of `v`, reaching `total`.
    pub(super) fn reserved(&self, v: &KeyVersion, block: u64, total: u64) {
        if let Some(b) = self.lock().get_mut(&id(v)) {
            // Ours is the block just below `total`; anything between what we had and it was
            // reserved by another server on the same datastore and counts as used.
            b.used = b.used.max(total.saturating_sub(block));
            b.reserved = b.reserved.max(total);
        }
    }

    /// Shows the encryptions used so far (not only the reserved count) in `versions`.
    pub(super) fn show_used(&self, versions: &mut [KeyVersion]) {
        let budgets = self.lock();
        for v in versions {
            if let Some(b) = budgets.get(&id(v)) {
                v.encryptions = b.used;
            }
        }
    }
}
