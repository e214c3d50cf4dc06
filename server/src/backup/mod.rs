//! Backups: a portable, versioned logical dump of the datastore (JSON lines), integrity-checked
//! and never holding unwrapped key material.
//!
//! The file is one JSON object per line: a `header` (format, version, trust domain, key
//! manager, schema version, the passphrase KDF and its salt), then for each table a `table`
//! line (its columns, read from the schema) followed by one `row` line per row, then the key
//! manager's part (`keys`: the disk key files sealed with AES-256-GCM under a key derived from
//! the operator's passphrase with PBKDF2-HMAC-SHA256; or `hsm_labels`: the token keys the rows
//! refer to), and a `trailer` with the line count, the SHA-256 of everything before it and,
//! with a passphrase, an HMAC-SHA256 under a second derived key. A truncated or edited file is
//! refused; so is a wrong passphrase. Engine key material in the rows is already sealed under
//! the KEK (itself a sealed key file, or in the token).
//!
//! [`service`] serves `backup create` on the admin socket; [`restore`] is the offline restore.

pub mod restore;
mod service;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use continuity_common::secret::Zeroizing;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::datastore::TableDump;

pub use self::service::BackupService;

/// The `format` of a backup header.
pub const FORMAT: &str = "continuity-backup";
/// The format version written and read.
pub const VERSION: u32 = 1;
/// PBKDF2-HMAC-SHA256 iterations for new backups (OWASP's 2023 figure).
pub const PBKDF2_ITERATIONS: u32 = 600_000;
/// Fewest iterations a backup may claim (a lower one is an edit, refused).
const MIN_ITERATIONS: u32 = 100_000;
/// Associated data of the sealed key files.
const KEYS_AAD: &[u8] = b"continuity-backup-keys-v1";

/// Why a backup could not be made or restored; the message says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackupError(pub String);

impl BackupError {
    /// An error with this message.
    pub fn new(m: impl Into<String>) -> Self {
        Self(m.into())
    }
}

/// Key files opened from a backup: (file name, content, wiped on drop).
pub type KeyFiles = Vec<(String, Zeroizing<Vec<u8>>)>;

/// The first line of a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// Unix seconds.
    pub created_at: i64,
    /// The server's trust domain.
    pub trust_domain: String,
    /// memory | disk | pkcs11.
    pub key_manager: String,
    /// The latest datastore migration applied.
    pub schema_version: i64,
    /// How the passphrase keys were derived (absent: no passphrase).
    pub kdf: Option<Kdf>,
}

/// PBKDF2 parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kdf {
    /// "pbkdf2-hmac-sha256".
    pub algorithm: String,
    /// Iterations.
    pub iterations: u32,
    /// Random salt, base64.
    pub salt: String,
}

/// One line of the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Header(Header),
    Table {
        name: String,
        columns: Vec<(String, String)>,
    },
    Row(Vec<Value>),
    Keys {
        sealed: String,
    },
    HsmLabels(Vec<String>),
    Trailer {
        lines: u64,
        sha256: String,
        hmac: Option<String>,
    },
}

/// A backup's content.
#[derive(Debug, Clone, PartialEq)]
pub struct Backup {
    /// The header.
    pub header: Header,
    /// Every table.
    pub tables: Vec<TableDump>,
    /// Key files sealed under the passphrase key (disk key manager).
    pub sealed_keys: Option<Vec<u8>>,
    /// Labels of the token keys the rows refer to (pkcs11 key manager).
    pub hsm_labels: Vec<String>,
}

/// The two keys derived from a passphrase: AES-256-GCM for the key files, HMAC for the file.
pub struct PassphraseKeys {
    aes: Zeroizing<Vec<u8>>,
    mac: Zeroizing<Vec<u8>>,
}

impl PassphraseKeys {
    /// Derives both keys (PBKDF2-HMAC-SHA256, 64 bytes; slow on purpose: run it off the
    /// async executor).
    pub fn derive(passphrase: &[u8], kdf: &Kdf) -> Result<Self, BackupError> {
        if kdf.algorithm != "pbkdf2-hmac-sha256" || kdf.iterations < MIN_ITERATIONS {
            return Err(BackupError::new(format!(
                "the backup's key derivation ({} with {} iterations) is not one this server writes",
                kdf.algorithm, kdf.iterations
            )));
        }
        let salt = STANDARD
            .decode(&kdf.salt)
            .map_err(|e| BackupError::new(format!("the backup's salt is malformed: {e}")))?;
        let mut out = Zeroizing::new(vec![0u8; 64]);
        let iterations = std::num::NonZeroU32::new(kdf.iterations)
            .ok_or_else(|| BackupError::new("zero PBKDF2 iterations"))?;
        aws_lc_rs::pbkdf2::derive(
            aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            passphrase,
            &mut out,
        );
        Ok(Self {
            aes: Zeroizing::new(out[..32].to_vec()),
            mac: Zeroizing::new(out[32..].to_vec()),
        })
    }

    fn hmac(&self, data: &[u8]) -> String {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.mac);
        hex::encode(aws_lc_rs::hmac::sign(&key, data).as_ref())
    }

    /// Whether `hex_tag` is the HMAC of `data` (compared in constant time).
    fn verify(&self, data: &[u8], hex_tag: &str) -> bool {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.mac);
        hex::decode(hex_tag).is_ok_and(|t| aws_lc_rs::hmac::verify(&key, data, &t).is_ok())
    }

    /// Seals the key files (name → content) as one blob.
    pub fn seal_files(&self, files: &[(String, Vec<u8>)]) -> Result<Vec<u8>, BackupError> {
        let map: serde_json::Map<String, Value> = files
            .iter()
            .map(|(n, c)| (n.clone(), Value::from(STANDARD.encode(c))))
            .collect();
        let plain = Zeroizing::new(serde_json::to_vec(&map).unwrap_or_default());
        crate::keys::aes::seal(&self.aes, &plain, KEYS_AAD)
            .map_err(|e| BackupError::new(format!("cannot seal the key files: {e}")))
    }

    /// Opens what [`PassphraseKeys::seal_files`] sealed.
    pub fn open_files(&self, sealed: &[u8]) -> Result<KeyFiles, BackupError> {
        let plain = Zeroizing::new(crate::keys::aes::open(&self.aes, sealed, KEYS_AAD).map_err(
            |_| BackupError::new("the sealed key files do not open under this passphrase"),
        )?);
        let map: serde_json::Map<String, Value> = serde_json::from_slice(&plain)
            .map_err(|e| BackupError::new(format!("the sealed key files are malformed: {e}")))?;
        map.into_iter()
            .map(|(n, v)| {
                let b = STANDARD
                    .decode(v.as_str().unwrap_or_default())
                    .map_err(|e| {
                        BackupError::new(format!("key file {n} in the backup is malformed: {e}"))
                    })?;
                Ok((n, Zeroizing::new(b)))
            })
            .collect()
    }
}

/// New PBKDF2 parameters with a fresh random salt.
pub fn new_kdf() -> Result<Kdf, BackupError> {
    let salt = continuity_common::rand::array::<16>()
        .map_err(|e| BackupError::new(format!("no random salt: {e}")))?;
    Ok(Kdf {
        algorithm: "pbkdf2-hmac-sha256".into(),
        iterations: PBKDF2_ITERATIONS,
        salt: STANDARD.encode(salt),
    })
}

fn line(out: &mut Vec<u8>, l: &Line) {
    // Serializing these plain values cannot fail.
    let _ = serde_json::to_writer(&mut *out, l);
    out.push(b'\n');
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

/// The file of `b`, with its trailer (HMAC'd under `keys` when given).
pub fn encode(b: &Backup, keys: Option<&PassphraseKeys>) -> Vec<u8> {
    let mut out = Vec::new();
    line(&mut out, &Line::Header(b.header.clone()));
    let mut lines = 1;
    for t in &b.tables {
        line(
            &mut out,
            &Line::Table {
                name: t.name.clone(),
                columns: t.columns.clone(),
            },
        );
        lines += 1;
        for r in &t.rows {
            line(&mut out, &Line::Row(r.clone()));
            lines += 1;
        }
    }
    if let Some(s) = &b.sealed_keys {
        line(
            &mut out,
            &Line::Keys {
                sealed: STANDARD.encode(s),
            },
        );
        lines += 1;
    }
    if !b.hsm_labels.is_empty() {
        line(&mut out, &Line::HsmLabels(b.hsm_labels.clone()));
        lines += 1;
    }
    let trailer = Line::Trailer {
        lines,
        sha256: sha256_hex(&out),
        hmac: keys.map(|k| k.hmac(&out)),
    };
    line(&mut out, &trailer);
    out
}

/// Checks the trailer of `bytes` (line count, SHA-256); returns the body and the trailer's
/// (lines, hmac).
fn check_trailer(bytes: &[u8]) -> Result<(&[u8], u64, Option<String>), BackupError> {
    let truncated = || BackupError::new("the backup file is truncated (its trailer is missing)");
    let Some(body_end) = bytes
        .strip_suffix(b"\n")
        .and_then(|b| b.iter().rposition(|c| *c == b'\n'))
        .map(|i| i + 1)
    else {
        return Err(truncated());
    };
    let (body, last) = bytes.split_at(body_end);
    let Ok(Line::Trailer {
        lines,
        sha256,
        hmac,
    }) = serde_json::from_slice::<Line>(last)
    else {
        return Err(truncated());
    };
    if sha256_hex(body) != sha256 {
        return Err(BackupError::new(
            "the backup file was modified after it was written (its SHA-256 does not match)",
        ));
    }
    Ok((body, lines, hmac))
}

/// Parses and verifies a backup file. A passphrase-protected one needs `passphrase` (its
/// HMAC is checked and its keys returned).
pub fn decode(
    bytes: &[u8],
    passphrase: Option<&[u8]>,
) -> Result<(Backup, Option<PassphraseKeys>), BackupError> {
    let (body, count, hmac) = check_trailer(bytes)?;
    let mut parsed = body
        .split(|c| *c == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_slice::<Line>(l)
                .map_err(|e| BackupError::new(format!("line {} of the backup: {e}", i + 1)))
        });
    let Some(Ok(Line::Header(header))) = parsed.next() else {
        return Err(BackupError::new(
            "the file is not a Continuity backup (no header)",
        ));
    };
    if header.format != FORMAT || header.version != VERSION {
        return Err(BackupError::new(format!(
            "unsupported backup format {} version {} (this server reads {FORMAT} version {VERSION})",
            header.format, header.version
        )));
    }
    let keys = passphrase_keys(&header, passphrase, body, hmac.as_deref())?;
    let mut b = Backup {
        header,
        tables: Vec::new(),
        sealed_keys: None,
        hsm_labels: Vec::new(),
    };
    let mut lines = 1;
    for l in parsed {
        lines += 1;
        add_line(&mut b, l?)?;
    }
    if lines != count {
        return Err(BackupError::new(format!(
            "the backup has {lines} lines but its trailer says {count}"
        )));
    }
    Ok((b, keys))
}

fn add_line(b: &mut Backup, l: Line) -> Result<(), BackupError> {
    match l {
        Line::Table { name, columns } => b.tables.push(TableDump {
            name,
            columns,
            rows: Vec::new(),
        }),
        Line::Row(r) => {
            let t = b
                .tables
                .last_mut()
                .ok_or_else(|| BackupError::new("a row comes before any table"))?;
            if r.len() != t.columns.len() {
                return Err(BackupError::new(format!(
                    "a row of {} has {} values for {} columns",
                    t.name,
                    r.len(),
                    t.columns.len()
                )));
            }
            t.rows.push(r);
        }
        Line::Keys { sealed } => {
            b.sealed_keys =
                Some(STANDARD.decode(sealed).map_err(|e| {
                    BackupError::new(format!("the sealed keys are malformed: {e}"))
                })?);
        }
        Line::HsmLabels(l) => b.hsm_labels = l,
        Line::Header(_) | Line::Trailer { .. } => {
            return Err(BackupError::new(
                "a second header or trailer inside the backup",
            ));
        }
    }
    Ok(())
}

/// Derives the passphrase keys a header asks for and checks the file's HMAC with them.
fn passphrase_keys(
    header: &Header,
    passphrase: Option<&[u8]>,
    body: &[u8],
    hmac: Option<&str>,
) -> Result<Option<PassphraseKeys>, BackupError> {
    let Some(kdf) = &header.kdf else {
        return Ok(None);
    };
    let Some(passphrase) = passphrase else {
        return Err(BackupError::new(
            "this backup is protected by a passphrase: give it with --passphrase-file",
        ));
    };
    let keys = PassphraseKeys::derive(passphrase, kdf)?;
    let Some(expected) = hmac else {
        return Err(BackupError::new(
            "the backup file was modified: its passphrase HMAC was removed",
        ));
    };
    if !keys.verify(body, expected) {
        return Err(BackupError::new(
            "the passphrase is wrong (or the file was modified): its HMAC does not match",
        ));
    }
    Ok(Some(keys))
}

#[cfg(test)]
mod tests;
