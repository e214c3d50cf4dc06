//! Record MACs: every security-relevant row carries an HMAC-SHA256 tag, computed with a key
//! the key manager holds (`"record-mac"`), over a canonical encoding of its table, its primary
//! key and every content column. A row edited, forged, or moved under another key fails.
//!
//! The encoding ([`Canon`]) is unambiguous: a format version byte, then the table name, then
//! each field as a type tag and a 4-byte big-endian length before its bytes. Key fields have
//! their own tag, so no bytes can shift between the key and the content, or between columns.

use std::sync::Arc;

use crate::keys::MacKey;

use super::StoreError;

/// Version of the canonical encoding, the first byte MACed.
pub const FORMAT_VERSION: u8 = 1;

/// Field type tags.
const TAG_TABLE: u8 = b'T';
const TAG_KEY: u8 = b'K';
const TAG_TEXT: u8 = b's';
const TAG_BYTES: u8 = b'b';
const TAG_INT: u8 = b'i';
const TAG_NONE: u8 = b'n';

/// The canonical encoding of one row, and its primary key spelled for reports.
#[derive(Debug, Clone)]
pub struct Canon {
    table: &'static str,
    key: Vec<KeyPart>,
    buf: Vec<u8>,
}

/// One column of a primary key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// A text column.
    Text(String),
    /// An integer column.
    Int(i64),
}

impl std::fmt::Display for KeyPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Text(s) => f.write_str(s),
            Self::Int(i) => write!(f, "{i}"),
        }
    }
}

impl Canon {
    /// Starts the encoding of a row of `table`.
    pub fn new(table: &'static str) -> Self {
        let mut c = Self {
            table,
            key: Vec::new(),
            buf: vec![FORMAT_VERSION],
        };
        c.field(TAG_TABLE, table.as_bytes());
        c
    }

    fn field(&mut self, tag: u8, bytes: &[u8]) {
        self.buf.push(tag);
        // Rows are far below 4 GiB; a longer value saturates and still differs by content.
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(bytes);
    }

    /// A text primary-key column.
    pub fn key(mut self, part: &str) -> Self {
        self.field(TAG_KEY, part.as_bytes());
        self.key.push(KeyPart::Text(part.into()));
        self
    }

    /// An integer primary-key column.
    pub fn key_int(mut self, part: i64) -> Self {
        self.field(TAG_KEY, &part.to_be_bytes());
        self.key.push(KeyPart::Int(part));
        self
    }

    /// A text column.
    pub fn text(mut self, s: &str) -> Self {
        self.field(TAG_TEXT, s.as_bytes());
        self
    }

    /// A nullable text column.
    pub fn opt_text(self, s: Option<&str>) -> Self {
        match s {
            Some(s) => self.text(s),
            None => self.none(),
        }
    }

    /// A binary column.
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.field(TAG_BYTES, b);
        self
    }

    /// A nullable binary column.
    pub fn opt_bytes(self, b: Option<&[u8]>) -> Self {
        match b {
            Some(b) => self.bytes(b),
            None => self.none(),
        }
    }

    /// An integer column (booleans are 0 or 1).
    pub fn int(mut self, v: i64) -> Self {
        self.field(TAG_INT, &v.to_be_bytes());
        self
    }

    fn none(mut self) -> Self {
        self.field(TAG_NONE, &[]);
        self
    }

    /// The table this row belongs to.
    pub fn table(&self) -> &'static str {
        self.table
    }

    /// The primary key, its parts joined with `/`.
    pub fn key_string(&self) -> String {
        let parts: Vec<String> = self.key.iter().map(ToString::to_string).collect();
        parts.join("/")
    }

    /// The primary key's columns, in order.
    pub fn key_parts(&self) -> &[KeyPart] {
        &self.key
    }

    /// The bytes that are MACed.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// Computes and checks record MACs with the key manager's `"record-mac"` key.
#[derive(Clone)]
pub struct RecordSealer {
    key: Option<Arc<dyn MacKey>>,
}

impl std::fmt::Debug for RecordSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.key {
            Some(_) => "RecordSealer(record-mac)",
            None => "RecordSealer(none)",
        })
    }
}

/// Why a row failed its check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The row has no MAC (after the upgrade every row must have one).
    Missing,
    /// The MAC does not match the row's table, key and content.
    Mismatch,
}

impl Failure {
    /// The reason as reported.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "no record MAC",
            Self::Mismatch => "record MAC does not match the row",
        }
    }
}

impl RecordSealer {
    /// Seals rows with `key` (the key manager's `"record-mac"` key).
    pub fn new(key: Arc<dyn MacKey>) -> Self {
        Self { key: Some(key) }
    }

    /// A sealer that writes no MAC and accepts every row: only for the benchmark's A/B of
    /// the MAC cost. Never configurable; the server always seals.
    #[doc(hidden)]
    pub fn unsealed_for_benchmark() -> Self {
        Self { key: None }
    }

    /// Whether rows are sealed (false only for the benchmark's unsealed store).
    pub fn is_sealing(&self) -> bool {
        self.key.is_some()
    }

    /// The MAC to store with `row` (None: the benchmark's unsealed store).
    pub fn seal(&self, row: &Canon) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(key) = &self.key else {
            return Ok(None);
        };
        key.mac(row.as_bytes())
            .map(|t| Some(t.to_vec()))
            .map_err(|e| StoreError::MacKey(e.to_string()))
    }

    /// Checks the stored `tag` of `row`.
    pub fn check(
        &self,
        row: &Canon,
        tag: Option<&[u8]>,
    ) -> Result<Result<(), Failure>, StoreError> {
        let Some(key) = &self.key else {
            return Ok(Ok(()));
        };
        let Some(tag) = tag else {
            return Ok(Err(Failure::Missing));
        };
        match key.verify(row.as_bytes(), tag) {
            Ok(true) => Ok(Ok(())),
            Ok(false) => Ok(Err(Failure::Mismatch)),
            Err(e) => Err(StoreError::MacKey(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SoftwareMac;

    fn sealer() -> RecordSealer {
        RecordSealer::new(Arc::new(SoftwareMac::new(&[9; 32])))
    }

    #[test]
    fn fields_cannot_shift_between_columns() {
        let a = Canon::new("t").key("ab").text("c");
        let b = Canon::new("t").key("a").text("bc");
        let c = Canon::new("t").key("a").key("bc");
        let d = Canon::new("t").text("").text("abc");
        let e = Canon::new("t").text("abc").text("");
        let f = Canon::new("t").opt_text(None);
        let g = Canon::new("t").text("");
        let h = Canon::new("t").bytes(b"x");
        let i = Canon::new("t").text("x");
        let all = [&a, &b, &c, &d, &e, &f, &g, &h, &i];
        for (n, x) in all.iter().enumerate() {
            for y in &all[n + 1..] {
                assert_ne!(x.as_bytes(), y.as_bytes(), "{x:?} vs {y:?}");
            }
        }
    }

    #[test]
    fn table_and_key_are_inside_the_mac() {
        let s = sealer();
        let row = Canon::new("entries").key("e1").text("spiffe://td/w").int(1);
        let tag = s.seal(&row).unwrap().unwrap();
        assert_eq!(s.check(&row, Some(&tag)).unwrap(), Ok(()));
        let moved = Canon::new("entries").key("e2").text("spiffe://td/w").int(1);
        assert_eq!(s.check(&moved, Some(&tag)).unwrap(), Err(Failure::Mismatch));
        let other_table = Canon::new("agents").key("e1").text("spiffe://td/w").int(1);
        assert_eq!(
            s.check(&other_table, Some(&tag)).unwrap(),
            Err(Failure::Mismatch)
        );
        let edited = Canon::new("entries").key("e1").text("spiffe://td/w").int(0);
        assert_eq!(
            s.check(&edited, Some(&tag)).unwrap(),
            Err(Failure::Mismatch)
        );
        assert_eq!(s.check(&row, None).unwrap(), Err(Failure::Missing));
        assert_eq!(moved.key_string(), "e2");
    }

    #[test]
    fn encoding_starts_with_the_format_version_and_table() {
        let row = Canon::new("ca_keys").key("k").int(-1);
        let b = row.as_bytes();
        assert_eq!(b[0], FORMAT_VERSION);
        assert_eq!(&b[1..10], b"T\0\0\0\x07ca_k");
        assert_eq!(row.table(), "ca_keys");
    }

    #[test]
    fn the_unsealed_benchmark_store_writes_no_mac() {
        let s = RecordSealer::unsealed_for_benchmark();
        let row = Canon::new("t").key("k");
        assert_eq!(s.seal(&row).unwrap(), None);
        assert!(!s.is_sealing());
    }
}
