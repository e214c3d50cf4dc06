//! Signed checkpoints of the audit head, kept outside the datastore.
//!
//! A checkpoint is (seq, head hash, time) signed with the key manager's `audit-checkpoint` key
//! (EC P-256), written as JSON under `data_dir/audit/checkpoints/` and exportable (`audit
//! checkpoint`) to write-once storage. A datastore writer can cut the log's tail together with
//! its stored head, but cannot make a checkpoint vouching for less: `audit verify` finds the
//! log ends before a checkpoint's seq, or holds another record there. It holds no secret
//! (0644), and is written atomically (temp file, fsync, rename, fsync of the directory).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use continuity_common::fsperm::{SecureDir, secure_dir};
use serde::{Deserialize, Serialize};

use super::chain::Canonical;
use crate::datastore::AuditHead;
use crate::keys::{KeyError, KeyHandle, KeyManager, KeyType};

/// The key manager id of the checkpoint signing key.
pub const CHECKPOINT_KEY: &str = "audit-checkpoint";

/// The `format` of a checkpoint, and the domain tag of what is signed.
const FORMAT: &str = "continuity-audit-checkpoint-v1";

/// Checkpoints kept under data_dir (the highest sequence numbers win).
const KEEP: usize = 64;

/// Checkpoint failures.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The signing key could not be made, found or used.
    #[error("audit checkpoint key {CHECKPOINT_KEY}: {0}")]
    Key(#[from] KeyError),
    /// The checkpoint directory or a file in it could not be used.
    #[error("audit checkpoints: {0}")]
    Io(String),
    /// The head could not be read from the datastore.
    #[error("audit checkpoint: {0}")]
    Store(#[from] crate::datastore::StoreError),
}

/// A signed statement that the audit log's record `seq` had hash `head` at `time`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Always `continuity-audit-checkpoint-v1`.
    pub format: String,
    /// Sequence number of the last record.
    pub seq: i64,
    /// Its hash (hex).
    pub head: String,
    /// When the checkpoint was made, Unix seconds.
    pub time: i64,
    /// The key manager id of the signing key.
    pub key_id: String,
    /// The signing key's SubjectPublicKeyInfo, DER, base64.
    pub public_key: String,
    /// The signature over the canonical encoding of (format, seq, head, time), base64.
    pub signature: String,
}

impl Checkpoint {
    /// Parses a checkpoint file's text; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cp: Self =
            serde_json::from_str(text).map_err(|e| format!("not an audit checkpoint: {e}"))?;
        if cp.format != FORMAT {
            return Err(format!("format {:?} is not {FORMAT:?}", cp.format));
        }
        Ok(cp)
    }

    /// The JSON text written to files and printed by `audit checkpoint`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What is signed: the canonical encoding of (format, seq, head, time).
fn signed(seq: i64, head: &str, time: i64) -> Vec<u8> {
    let mut c = Canonical::new(FORMAT.as_bytes());
    c.int(seq).text(head).int(time);
    c.finish()
}

/// A checkpoint file's name, and the checkpoint or why it cannot be read.
pub type Listed = (String, Result<Checkpoint, String>);

/// The checkpoint directory and the signing key.
#[derive(Debug)]
pub struct Checkpoints {
    dir: SecureDir,
    key: Arc<dyn KeyHandle>,
}

impl Checkpoints {
    /// Opens (creating) `data_dir/audit/checkpoints` and finds or makes the signing key.
    pub async fn open(data_dir: &Path, keys: &dyn KeyManager) -> Result<Self, CheckpointError> {
        let path = data_dir.join("audit").join("checkpoints");
        let dir = secure_dir(&path, 0o700, "audit checkpoint directory")
            .map_err(|e| CheckpointError::Io(e.to_string()))?;
        let key = match keys.get(CHECKPOINT_KEY).await? {
            Some(k) => k,
            None => keys.generate(CHECKPOINT_KEY, KeyType::EcP256).await?,
        };
        Ok(Self { dir, key })
    }

    /// The directory checkpoints are written to.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Signs `head` as of `time`. Blocking (pkcs11 signs in the token).
    pub fn sign(&self, head: &AuditHead, time: i64) -> Result<Checkpoint, CheckpointError> {
        let signature = self.key.sign(&signed(head.seq, &head.hash, time))?;
        Ok(Checkpoint {
            format: FORMAT.into(),
            seq: head.seq,
            head: head.hash.clone(),
            time,
            key_id: CHECKPOINT_KEY.into(),
            public_key: STANDARD.encode(self.key.spki_der()),
            signature: STANDARD.encode(signature),
        })
    }

    /// Writes `cp` atomically under a name of its own (never over another checkpoint), drops
    /// all but the [`KEEP`] highest, and returns the file's path. Blocking.
    pub fn write(&self, cp: &Checkpoint) -> Result<PathBuf, CheckpointError> {
        let nonce = continuity_common::rand::array::<4>()
            .map_err(|e| CheckpointError::Io(format!("no random file name: {e}")))?;
        let name = format!("{:020}-{}-{}.json", cp.seq, cp.time, hex::encode(nonce));
        let body = format!("{}\n", cp.to_json());
        self.dir
            .write_atomic(&name, 0o644, |f| {
                std::io::Write::write_all(f, body.as_bytes())
            })
            .map_err(|e| CheckpointError::Io(e.to_string()))?;
        let mut names = self.names()?;
        if names.len() > KEEP {
            names.truncate(names.len() - KEEP);
            for old in names {
                let _ = std::fs::remove_file(self.path().join(old));
            }
        }
        Ok(self.path().join(name))
    }

    /// Checkpoint file names, lowest sequence number first.
    fn names(&self) -> Result<Vec<String>, CheckpointError> {
        let entries = std::fs::read_dir(self.path())
            .map_err(|e| CheckpointError::Io(format!("{}: {e}", self.path().display())))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every checkpoint under data_dir: (file name, checkpoint or why it cannot be read).
    /// Blocking.
    pub fn list(&self) -> Result<Vec<Listed>, CheckpointError> {
        let mut out = Vec::new();
        for name in self.names()? {
            let parsed = match self.dir.read(std::ffi::OsStr::new(&name)) {
                Ok(Some(bytes)) => String::from_utf8(bytes)
                    .map_err(|_| "not UTF-8".to_string())
                    .and_then(|t| Checkpoint::parse(&t)),
                Ok(None) => continue,
                Err(e) => Err(e.to_string()),
            };
            out.push((name, parsed));
        }
        Ok(out)
    }

    /// The newest checkpoint under data_dir that reads, if any. Blocking.
    pub fn latest(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        Ok(self
            .list()?
            .into_iter()
            .filter_map(|(_, c)| c.ok())
            .max_by_key(|c| (c.time, c.seq)))
    }

    /// Whether `cp` was signed by this server's checkpoint key; the error says why not.
    pub fn check(&self, cp: &Checkpoint) -> Result<(), String> {
        if cp.public_key != STANDARD.encode(self.key.spki_der()) {
            return Err(format!(
                "it was signed by another key than this server's {CHECKPOINT_KEY} key"
            ));
        }
        let sig = STANDARD
            .decode(&cp.signature)
            .map_err(|_| "its signature is not base64".to_string())?;
        let alg: &dyn aws_lc_rs::signature::VerificationAlgorithm = match self.key.key_type() {
            KeyType::EcP256 => &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
            KeyType::EcP384 => &aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1,
            _ => &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        };
        aws_lc_rs::signature::UnparsedPublicKey::new(alg, self.key.public_key_raw())
            .verify(&signed(cp.seq, &cp.head, cp.time), &sig)
            .map_err(|_| "its signature does not verify (the checkpoint was altered)".to_string())
    }
}
