//! `audit verify`: checks the chain from the first record, the stored head and every checkpoint,
//! and names each thing it finds.
//!
//! A record whose keyed hash fails is classified by what still links to it: one that verifies
//! under another sequence number was moved (reordered, or renumbered around a deletion or an
//! insertion); one whose stored hash a later record (or the head) still names was edited in
//! place; anything else was inserted by someone without the key. Records before the anchor
//! (the `audit.keyed` record of the upgrade) are the old plain SHA-256 chain, checked as such.

use std::collections::HashSet;

use serde::Serialize;

use super::chain::{KeyedChain, is_plain, plain_hash};
use super::checkpoint::Checkpoint;
use crate::datastore::{AuditHead, AuditRecord, StoreError};

/// The action of the record that starts the keyed chain after a plain SHA-256 one.
pub const ANCHOR_ACTION: &str = "audit.keyed";

/// How far from its place a moved record is looked for (its own predecessor is always tried).
const MOVE_WINDOW: i64 = 8;

/// What kind of tampering a finding shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FindingKind {
    /// A record's content changed (its keyed hash fails where it stands).
    Edited,
    /// Records are missing inside the log (a gap in the sequence).
    Deleted,
    /// A record the server never wrote.
    Inserted,
    /// A record stands at another place than it was written at.
    Reordered,
    /// The tail was cut: the head or a checkpoint vouches for more, or for another record.
    Truncated,
    /// A checkpoint that is not this server's, or cannot be read.
    Checkpoint,
}

impl FindingKind {
    /// The word printed and sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Edited => "edited",
            Self::Deleted => "deleted",
            Self::Inserted => "inserted",
            Self::Reordered => "reordered",
            Self::Truncated => "truncated",
            Self::Checkpoint => "checkpoint",
        }
    }
}

/// One thing `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The record it is about (for a checkpoint: the checkpoint's seq).
    pub seq: i64,
    /// What kind of tampering.
    pub kind: FindingKind,
    /// A sentence naming it.
    pub detail: String,
}

impl Finding {
    fn new(seq: i64, kind: FindingKind, detail: String) -> Self {
        Self { seq, kind, detail }
    }
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verification {
    /// Records checked.
    pub records: i64,
    /// Checkpoints the log was checked against.
    pub checkpoints: usize,
    /// Everything found, by seq (empty: intact).
    pub findings: Vec<Finding>,
}

impl Verification {
    /// Whether nothing was found.
    pub fn intact(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Checks `records` (in seq order), the stored `head` and the valid `checkpoints` (named by
/// where they came from).
pub fn verify(
    records: &[AuditRecord],
    head: &AuditHead,
    chain: &KeyedChain,
    checkpoints: &[(String, Checkpoint)],
) -> Result<Vec<Finding>, StoreError> {
    let mut anchor = None;
    for (i, r) in records.iter().enumerate() {
        if r.action == ANCHOR_ACTION && chain.verifies(r)? {
            anchor = Some(i);
            break;
        }
    }
    let split = anchor.unwrap_or(0);
    let mut findings = plain_findings(&records[..split]);
    let linked = Linked {
        chain,
        records,
        named: records.iter().map(|r| r.prev_hash.as_str()).collect(),
        head,
    };
    for i in split..records.len() {
        findings.extend(linked.check(i)?);
    }
    findings.extend(head_findings(records, head));
    findings.extend(checkpoint_findings(records, checkpoints));
    findings.sort_by_key(|f| f.seq);
    Ok(findings)
}

/// The old plain SHA-256 chain before the anchor: anyone could have recomputed it, but the
/// anchor's HMAC covers its last hash, so an edit still shows.
pub fn plain_findings(records: &[AuditRecord]) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut prev = "";
    for (i, r) in records.iter().enumerate() {
        let expected = i as i64 + 1;
        if r.seq != expected {
            out.push(missing(expected, r.seq));
            break;
        }
        if r.prev_hash != prev {
            out.push(reordered(r.seq));
        } else if plain_hash(r) != r.hash {
            out.push(Finding::new(
                r.seq,
                FindingKind::Edited,
                format!("record {} was modified after it was written", r.seq),
            ));
        }
        prev = &r.hash;
    }
    out
}

/// Record `seq` does not link to the one before it.
fn reordered(seq: i64) -> Finding {
    Finding::new(
        seq,
        FindingKind::Reordered,
        format!(
            "record {seq} does not follow record {} (moved, or the record before it was replaced)",
            seq - 1
        ),
    )
}

fn missing(expected: i64, next: i64) -> Finding {
    let detail = if next == expected + 1 {
        format!("record {expected} is missing (the next record is {next})")
    } else if next > expected {
        format!(
            "records {expected}..={} are missing (the next record is {next})",
            next - 1
        )
    } else {
        format!("record {next} stands where record {expected} should")
    };
    Finding::new(expected, FindingKind::Deleted, detail)
}

/// The keyed part of the log, with the hashes something still names.
struct Linked<'a> {
    chain: &'a KeyedChain,
    records: &'a [AuditRecord],
    /// Every stored `prev_hash`: a record whose hash is named here was followed by another.
    named: HashSet<&'a str>,
    head: &'a AuditHead,
}

impl Linked<'_> {
    /// Findings about record `i`: a gap before it, its keyed hash, its link to the one before.
    fn check(&self, i: usize) -> Result<Vec<Finding>, StoreError> {
        let r = &self.records[i];
        let before = i.checked_sub(1).map(|j| &self.records[j]);
        let expected = before.map_or(1, |b| b.seq + 1);
        let mut out = Vec::new();
        if r.seq != expected {
            out.push(missing(expected, r.seq));
        }
        if !self.chain.verifies(r)? {
            out.push(self.classify(r)?);
        } else if r.seq == expected && r.prev_hash != before.map_or("", |b| b.hash.as_str()) {
            out.push(reordered(r.seq));
        }
        Ok(out)
    }

    /// Why `r` fails its keyed hash: moved, edited in place, or never written by the server.
    fn classify(&self, r: &AuditRecord) -> Result<Finding, StoreError> {
        if let Some(written) = self.written_as(r)? {
            return Ok(Finding::new(
                r.seq,
                FindingKind::Reordered,
                format!(
                    "record {} was written as record {written}: the log was reordered or renumbered",
                    r.seq
                ),
            ));
        }
        let plain = if is_plain(r) {
            " (its hash is a plain SHA-256, which anyone can compute without the audit key)"
        } else {
            ""
        };
        // A later record, or the head, still names its hash: the server wrote a record here
        // and its content changed. (A plain hash in the head is the attacker's own.)
        let followed = self.named.contains(r.hash.as_str())
            || (self.head.seq == r.seq && self.head.hash == r.hash && plain.is_empty());
        Ok(if followed {
            Finding::new(
                r.seq,
                FindingKind::Edited,
                format!(
                    "record {} was modified after it was written: HMAC mismatch at seq {}{plain}",
                    r.seq, r.seq
                ),
            )
        } else {
            Finding::new(
                r.seq,
                FindingKind::Inserted,
                format!(
                    "record {} was inserted: the server never wrote it, its hash is not the audit key's HMAC{plain}",
                    r.seq
                ),
            )
        })
    }

    /// The sequence number `r` verifies under, if it was written elsewhere.
    fn written_as(&self, r: &AuditRecord) -> Result<Option<i64>, StoreError> {
        let mut candidates: Vec<i64> = (r.seq - MOVE_WINDOW..=r.seq + MOVE_WINDOW)
            .filter(|&s| s >= 1 && s != r.seq)
            .collect();
        if r.prev_hash.is_empty() {
            candidates.insert(0, 1);
        } else if let Some(p) = self.records.iter().find(|p| p.hash == r.prev_hash) {
            candidates.insert(0, p.seq + 1);
        }
        let mut moved = r.clone();
        for s in candidates {
            moved.seq = s;
            if s != r.seq && self.chain.verifies(&moved)? {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }
}

/// The stored head against the last record.
fn head_findings(records: &[AuditRecord], head: &AuditHead) -> Vec<Finding> {
    let last = records.last().map_or(0, |r| r.seq);
    if head.seq > last {
        vec![Finding::new(
            last + 1,
            FindingKind::Truncated,
            format!(
                "records {}..={} were deleted from the end of the log (the stored head is record {})",
                last + 1,
                head.seq,
                head.seq
            ),
        )]
    } else if head.seq < last {
        vec![Finding::new(
            head.seq + 1,
            FindingKind::Inserted,
            format!(
                "records {}..={last} were inserted after the stored head (record {})",
                head.seq + 1,
                head.seq
            ),
        )]
    } else if records.last().is_some_and(|r| r.hash != head.hash) {
        vec![Finding::new(
            last,
            FindingKind::Edited,
            format!("record {last} is not the record the stored head names (its hash differs)"),
        )]
    } else {
        vec![]
    }
}

/// Each checkpoint against the record at its seq.
fn checkpoint_findings(
    records: &[AuditRecord],
    checkpoints: &[(String, Checkpoint)],
) -> Vec<Finding> {
    let last = records.last().map_or(0, |r| r.seq);
    let mut out = Vec::new();
    for (from, cp) in checkpoints {
        if cp.seq == 0 {
            continue;
        }
        if cp.seq > last {
            out.push(Finding::new(
                cp.seq,
                FindingKind::Truncated,
                format!(
                    "the log ends at record {last} but checkpoint {from} (time {}) vouches for record {}: the tail was cut back past it",
                    cp.time, cp.seq
                ),
            ));
            continue;
        }
        let at = records.binary_search_by_key(&cp.seq, |r| r.seq);
        if let Ok(i) = at
            && records[i].hash != cp.head
        {
            out.push(Finding::new(
                cp.seq,
                FindingKind::Truncated,
                format!(
                    "record {} is not the one checkpoint {from} (time {}) vouches for: the log was cut back past it and written again",
                    cp.seq, cp.time
                ),
            ));
        }
    }
    out
}
