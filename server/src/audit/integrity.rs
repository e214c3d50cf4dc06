//! What anchors the log outside the datastore: checkpoints written and checked, the keyed chain
//! started after a plain one, and `audit verify` over both.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use continuity_common::Clock;

use super::Audit;
use super::chain::plain_hash;
use super::checkpoint::{Checkpoint, CheckpointError, Checkpoints};
use super::verify::{self, ANCHOR_ACTION, Finding, FindingKind, Verification};
use crate::datastore::{AuditStore, StoreError};
use crate::keys::KeyManager;
use crate::scheduler::Job;

/// The scheduled checkpoint: every `interval`, unless nothing was logged since the last one.
pub fn checkpoint_job(audit: Arc<Audit>, interval: Duration) -> Job {
    Job::every(
        "audit-checkpoint",
        interval,
        "writing an audit checkpoint failed; will retry",
        move || {
            let audit = audit.clone();
            async move {
                audit
                    .checkpoint_if_changed()
                    .await
                    .map(drop)
                    .map_err(Into::into)
            }
        },
    )
}

/// A checkpoint exported earlier and handed to `audit verify --checkpoint`.
#[derive(Debug, Clone)]
pub struct ExportedCheckpoint {
    /// Where it came from (the file name the operator gave).
    pub name: String,
    /// Its JSON text.
    pub text: String,
}

impl Audit {
    /// The server's log: keyed with the key manager's [`super::AUDIT_MAC_KEY`] key,
    /// checkpointed under `data_dir/audit/checkpoints` (one checkpoint now if the head moved
    /// since the newest one).
    pub async fn open(
        data_dir: &Path,
        keys: &Arc<dyn KeyManager>,
        store: Arc<dyn AuditStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, CheckpointError> {
        let mac = keys.mac_key(super::AUDIT_MAC_KEY).await?;
        let checkpoints = Checkpoints::open(data_dir, &**keys).await?;
        let audit = Self::load(store, clock, mac, Some(checkpoints)).await?;
        audit.checkpoint_if_changed().await?;
        Ok(audit)
    }

    /// Checks the chain from the first record, the stored head, every checkpoint under
    /// data_dir and the `exported` ones; names everything found.
    pub async fn verify(
        &self,
        exported: &[ExportedCheckpoint],
    ) -> Result<Verification, StoreError> {
        let records = self.backend.list_audit().await?;
        let head = self.backend.audit_head().await?;
        let cps = self.checkpoints.clone();
        let exported = exported.to_vec();
        let (valid, mut findings) =
            tokio::task::spawn_blocking(move || gather(cps.as_deref(), &exported))
                .await
                .map_err(|e| StoreError::Io(format!("reading audit checkpoints: {e}")))??;
        findings.extend(verify::verify(&records, &head, &self.chain, &valid)?);
        findings.sort_by_key(|f| f.seq);
        Ok(Verification {
            records: records.len() as i64,
            checkpoints: valid.len(),
            findings,
        })
    }

    /// Signs the head as it is now and writes the checkpoint under data_dir; returns it and
    /// its file.
    pub async fn checkpoint(&self) -> Result<(Checkpoint, PathBuf), CheckpointError> {
        let cps = self.checkpoints.clone().ok_or_else(|| {
            CheckpointError::Io("this audit log has no checkpoint directory".into())
        })?;
        let head = self.backend.audit_head().await?;
        let time = self.clock.unix();
        tokio::task::spawn_blocking(move || {
            let cp = cps.sign(&head, time)?;
            let path = cps.write(&cp)?;
            Ok((cp, path))
        })
        .await
        .map_err(|e| CheckpointError::Io(format!("writing the checkpoint: {e}")))?
    }

    /// [`Audit::checkpoint`], unless the newest checkpoint already names the current head
    /// (the scheduled job: no new file while nothing is logged). None if nothing was written.
    pub async fn checkpoint_if_changed(&self) -> Result<Option<PathBuf>, CheckpointError> {
        let Some(cps) = self.checkpoints.clone() else {
            return Ok(None);
        };
        let head = self.backend.audit_head().await?;
        let latest = tokio::task::spawn_blocking(move || cps.latest())
            .await
            .map_err(|e| CheckpointError::Io(format!("reading checkpoints: {e}")))??;
        if latest.is_some_and(|c| c.seq == head.seq && c.head == head.hash) {
            return Ok(None);
        }
        Ok(Some(self.checkpoint().await?.1))
    }

    /// Starts the keyed chain after a log still on plain SHA-256 (the upgrade): verifies the
    /// plain chain and appends the keyed anchor record saying what it found. A log with no
    /// keyed record while checkpoints exist was rewritten by someone without the key: it is
    /// left for `audit verify` to report, never anchored.
    pub(super) async fn anchor_plain_chain(&self) -> Result<(), StoreError> {
        let records = self.backend.list_audit().await?;
        let Some(last) = records.last() else {
            return Ok(());
        };
        if self.chain.verifies(last)? || plain_hash(last) != last.hash {
            return Ok(());
        }
        for r in &records {
            if r.action == ANCHOR_ACTION && self.chain.verifies(r)? {
                return Ok(());
            }
        }
        if let Some(cps) = self.checkpoints.clone() {
            let any = tokio::task::spawn_blocking(move || cps.latest())
                .await
                .map_err(|e| StoreError::Io(e.to_string()))?
                .map_err(|e| StoreError::Io(e.to_string()))?;
            if any.is_some() {
                tracing::error!(
                    records = records.len(),
                    "the audit log holds only plain SHA-256 records although checkpoints of its keyed chain exist: it was rewritten without the key; not anchoring it (run `audit verify`)"
                );
                return Ok(());
            }
        }
        let result = match verify::plain_findings(&records).first() {
            None => format!(
                "ok: plain SHA-256 records 1..={} verified; keyed chain from here",
                last.seq
            ),
            Some(f) => format!(
                "plain SHA-256 chain broken: {}; keyed chain from here",
                f.detail
            ),
        };
        self.record("server", ANCHOR_ACTION, "audit_log", 0, &result)
            .await?;
        tracing::info!(records = records.len(), %result, "audit log upgraded to the keyed chain");
        if let Err(e) = self.checkpoint_if_changed().await {
            tracing::warn!(error = %e, "no audit checkpoint after the upgrade");
        }
        Ok(())
    }
}

/// Valid checkpoints (named by where they came from), and findings about the others.
type Gathered = (Vec<(String, Checkpoint)>, Vec<Finding>);

/// The checkpoints to check against (data_dir's and the exported ones, each signature
/// checked), and a finding for each that is not valid. Blocking.
fn gather(
    cps: Option<&Checkpoints>,
    exported: &[ExportedCheckpoint],
) -> Result<Gathered, StoreError> {
    let mut candidates = Vec::new();
    if let Some(c) = cps {
        for (name, parsed) in c.list().map_err(|e| StoreError::Io(e.to_string()))? {
            candidates.push((c.path().join(name).display().to_string(), parsed));
        }
    }
    for e in exported {
        candidates.push((e.name.clone(), Checkpoint::parse(&e.text)));
    }
    let (mut valid, mut bad) = (Vec::new(), Vec::new());
    for (from, parsed) in candidates {
        let seq = parsed.as_ref().map_or(0, |c| c.seq);
        let checked = parsed.and_then(|cp| match cps {
            Some(c) => c.check(&cp).map(|()| cp),
            None => Err("this server keeps no checkpoint key to check it with".into()),
        });
        match checked {
            Ok(cp) => valid.push((from, cp)),
            Err(why) => bad.push(Finding {
                seq,
                kind: FindingKind::Checkpoint,
                detail: format!("checkpoint {from} cannot be trusted: {why}"),
            }),
        }
    }
    Ok((valid, bad))
}
