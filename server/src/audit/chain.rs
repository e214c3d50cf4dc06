//! The keyed hash chain: a canonical, length-prefixed encoding of a record and its HMAC-SHA256
//! under the key manager's `audit-mac` key, and the plain SHA-256 of the chain written before it.
//!
//! Encoding (version 1): the domain tag, then every field as an 8-byte big-endian length
//! followed by its bytes, in the order seq, time, actor, action, target, key_version, result,
//! prev; integers are big-endian (`seq` and `time` i64, `key_version` u32). No field can run
//! into the next, so no two different records share an encoding.

use std::sync::Arc;

use crate::datastore::{AuditHead, AuditLinker, AuditRecord, StoreError};
use crate::keys::MacKey;

/// The key manager id of the chain's HMAC key.
pub const AUDIT_MAC_KEY: &str = "audit-mac";

/// Domain tag of a record's encoding (bumped if the encoding ever changes).
const RECORD_TAG: &[u8] = b"continuity-audit-record-v1";

/// Length-prefixed fields: each one's 8-byte big-endian length, then its bytes.
#[derive(Debug, Default)]
pub struct Canonical(Vec<u8>);

impl Canonical {
    /// Starts an encoding with its domain tag.
    pub fn new(tag: &[u8]) -> Self {
        let mut c = Self(Vec::with_capacity(256));
        c.bytes(tag);
        c
    }

    /// Appends one field.
    pub fn bytes(&mut self, field: &[u8]) -> &mut Self {
        self.0
            .extend_from_slice(&(field.len() as u64).to_be_bytes());
        self.0.extend_from_slice(field);
        self
    }

    /// Appends a text field (its UTF-8 bytes).
    pub fn text(&mut self, field: &str) -> &mut Self {
        self.bytes(field.as_bytes())
    }

    /// Appends a signed integer, big-endian.
    pub fn int(&mut self, field: i64) -> &mut Self {
        self.bytes(&field.to_be_bytes())
    }

    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// The canonical encoding of `r`: (seq, time, actor, action, target, key_version, result,
/// prev) — everything but its own hash.
pub fn canonical(r: &AuditRecord) -> Vec<u8> {
    let mut c = Canonical::new(RECORD_TAG);
    c.int(r.seq)
        .int(r.time)
        .text(&r.actor)
        .text(&r.action)
        .text(&r.target)
        .bytes(&r.key_version.to_be_bytes())
        .text(&r.result)
        .text(&r.prev_hash);
    c.finish()
}

/// The keyed chain: links records with HMAC-SHA256 under the `audit-mac` key.
#[derive(Debug, Clone)]
pub struct KeyedChain(Arc<dyn MacKey>);

impl KeyedChain {
    /// A chain keyed with `key`.
    pub fn new(key: Arc<dyn MacKey>) -> Self {
        Self(key)
    }

    /// The hex HMAC of `r`'s canonical encoding.
    pub fn hash(&self, r: &AuditRecord) -> Result<String, StoreError> {
        self.0
            .mac(&canonical(r))
            .map(hex::encode)
            .map_err(|e| StoreError::Audit(format!("audit chain key {AUDIT_MAC_KEY}: {e}")))
    }

    /// Whether `r.hash` is the keyed hash of `r` (compared in constant time).
    pub fn verifies(&self, r: &AuditRecord) -> Result<bool, StoreError> {
        let Ok(tag) = hex::decode(&r.hash) else {
            return Ok(false);
        };
        self.0
            .verify(&canonical(r), &tag)
            .map_err(|e| StoreError::Audit(format!("audit chain key {AUDIT_MAC_KEY}: {e}")))
    }
}

impl AuditLinker for KeyedChain {
    fn link(&self, head: &AuditHead, records: &mut [AuditRecord]) -> Result<(), StoreError> {
        let (mut seq, mut prev) = (head.seq, head.hash.clone());
        for r in records {
            seq += 1;
            r.seq = seq;
            r.prev_hash = prev;
            r.hash = self.hash(r)?;
            prev = r.hash.clone();
        }
        Ok(())
    }
}

/// The plain SHA-256 hash of the chain written before the keyed one (JSON array of the
/// fields): verifiable by anyone, so it proves nothing against a datastore writer.
pub fn plain_hash(r: &AuditRecord) -> String {
    let fields = serde_json::json!([
        r.seq,
        r.time,
        r.actor,
        r.action,
        r.target,
        r.key_version,
        r.result,
        r.prev_hash
    ]);
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        fields.to_string().as_bytes(),
    ))
}

/// Whether `r.hash` is a hash anyone can compute without the key: plain SHA-256 of the old
/// chain's fields or of the canonical encoding.
pub fn is_plain(r: &AuditRecord) -> bool {
    let canonical_sha = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &canonical(r),
    ));
    r.hash == plain_hash(r) || r.hash == canonical_sha
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SoftwareMac;

    fn record() -> AuditRecord {
        AuditRecord {
            seq: 2,
            time: 1_700_000_000,
            actor: "admin uid 0".into(),
            action: "key.sign".into(),
            target: "books/k".into(),
            key_version: 3,
            result: "ok".into(),
            prev_hash: "ab".into(),
            hash: String::new(),
        }
    }

    #[test]
    fn the_encoding_is_length_prefixed_field_by_field() {
        let mut want = Vec::new();
        let mut field = |b: &[u8]| {
            want.extend_from_slice(&(b.len() as u64).to_be_bytes());
            want.extend_from_slice(b);
        };
        field(b"continuity-audit-record-v1");
        field(&2i64.to_be_bytes());
        field(&1_700_000_000i64.to_be_bytes());
        field(b"admin uid 0");
        field(b"key.sign");
        field(b"books/k");
        field(&3u32.to_be_bytes());
        field(b"ok");
        field(b"ab");
        assert_eq!(canonical(&record()), want);
        assert_eq!(
            hex::encode(&canonical(&record())[..34]),
            "000000000000001a636f6e74696e756974792d61756469742d7265636f72642d7631",
            "tag and its length, byte for byte"
        );
    }

    #[test]
    fn moving_bytes_between_fields_changes_the_encoding() {
        let a = record();
        let mut b = record();
        b.actor = "admin uid 0key".into();
        b.action = ".sign".into();
        assert_ne!(canonical(&a), canonical(&b));
        let mut c = record();
        c.result = String::new();
        c.prev_hash = "okab".into();
        assert_ne!(canonical(&a), canonical(&c));
    }

    #[test]
    fn every_field_and_nothing_else_is_covered() {
        let base = canonical(&record());
        let edits: [fn(&mut AuditRecord); 8] = [
            |r| r.seq += 1,
            |r| r.time += 1,
            |r| r.actor.push('x'),
            |r| r.action.push('x'),
            |r| r.target.push('x'),
            |r| r.key_version += 1,
            |r| r.result.push('x'),
            |r| r.prev_hash.push('0'),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut r = record();
            edit(&mut r);
            assert_ne!(canonical(&r), base, "field {i} is not covered");
        }
        let mut r = record();
        r.hash = "anything".into();
        assert_eq!(canonical(&r), base, "the hash is not part of its own input");
    }

    #[test]
    fn links_number_after_the_head_and_verify_only_under_the_key() {
        let chain = KeyedChain::new(Arc::new(SoftwareMac::new(&[7; 32])));
        let other = KeyedChain::new(Arc::new(SoftwareMac::new(&[8; 32])));
        let head = AuditHead {
            seq: 41,
            hash: "cafe".into(),
        };
        let mut rs = vec![record(), record()];
        chain.link(&head, &mut rs).unwrap();
        assert_eq!((rs[0].seq, rs[1].seq), (42, 43));
        assert_eq!(rs[0].prev_hash, "cafe");
        assert_eq!(rs[1].prev_hash, rs[0].hash);
        assert_eq!(rs[0].hash.len(), 64);
        assert!(chain.verifies(&rs[0]).unwrap() && chain.verifies(&rs[1]).unwrap());
        assert!(
            !other.verifies(&rs[0]).unwrap(),
            "another key does not verify"
        );
        assert!(!is_plain(&rs[0]));
        let mut forged = rs[0].clone();
        forged.hash = plain_hash(&forged);
        assert!(is_plain(&forged) && !chain.verifies(&forged).unwrap());
    }
}
