//! `audit`: the audit log, its keyed hash chain and its signed checkpoints.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use clap::Subcommand;
use continuity_proto::admin::audit_admin_client::AuditAdminClient;
use continuity_proto::admin::{
    AuditCheckpoint, AuditFinding, AuditRecord, CheckpointAuditRequest, ExportedCheckpoint,
    ShowAuditRequest, VerifyAuditRequest,
};
use serde::Serialize;
use tonic::transport::Channel;

use super::error::CliError;
use super::output::{Output, View, show};

/// Largest checkpoint file `--checkpoint` reads.
const MAX_CHECKPOINT_FILE: u64 = 64 * 1024;

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print records (the last N with --limit).
    Show {
        /// How many of the latest records.
        #[arg(long, default_value_t = 0)]
        limit: i64,
    },
    /// Check the keyed chain, the stored head and every checkpoint; names each finding and
    /// exits non-zero on any.
    Verify {
        /// A checkpoint exported earlier with `audit checkpoint --output json` (repeatable).
        #[arg(long = "checkpoint", value_name = "FILE")]
        checkpoints: Vec<PathBuf>,
    },
    /// Sign the head now, write the checkpoint under data_dir and print it (ship the JSON
    /// to write-once storage).
    Checkpoint,
}

/// Runs an `audit` command.
pub async fn run(ch: Channel, out: Output, cmd: AuditCommand) -> Result<(), CliError> {
    let mut c = AuditAdminClient::new(ch);
    match cmd {
        AuditCommand::Show { limit } => {
            let r = c.show_audit(ShowAuditRequest { limit }).await?.into_inner();
            let records = r.records.iter().map(RecordView::from).collect();
            show(out, &RecordList { records })
        }
        AuditCommand::Verify { checkpoints } => {
            let checkpoints = checkpoints
                .iter()
                .map(|p| read_checkpoint(p))
                .collect::<Result<_, _>>()?;
            let r = c
                .verify_audit(VerifyAuditRequest { checkpoints })
                .await?
                .into_inner();
            verdict(out, &r)
        }
        AuditCommand::Checkpoint => {
            let r = c
                .checkpoint_audit(CheckpointAuditRequest {})
                .await?
                .into_inner();
            show(out, &CheckpointView::new(&r)?)
        }
    }
}

/// Prints a verification and fails if it found anything.
fn verdict(out: Output, r: &continuity_proto::admin::VerifyAuditResponse) -> Result<(), CliError> {
    let verdict = Verdict {
        ok: r.ok,
        records: r.records,
        bad_seq: (!r.ok).then_some(r.bad_seq),
        reason: (!r.ok).then_some(&r.reason),
        checkpoints: r.checkpoints,
        findings: r.findings.iter().map(FindingView::from).collect(),
    };
    show(out, &verdict)?;
    if r.ok {
        return Ok(());
    }
    let mut msg = format!("audit log tampered: {}", r.reason);
    if r.findings.len() > 1 {
        msg.push_str(&format!("\n{} findings:", r.findings.len()));
        for f in &r.findings {
            msg.push_str(&format!("\n  {} at {}: {}", f.kind, f.seq, f.detail));
        }
    }
    Err(CliError::Argument(msg))
}

/// Reads one `--checkpoint FILE` (at most [`MAX_CHECKPOINT_FILE`] bytes).
fn read_checkpoint(path: &Path) -> Result<ExportedCheckpoint, CliError> {
    let bad = |e: &dyn std::fmt::Display| {
        CliError::Argument(format!("--checkpoint {}: {e}", path.display()))
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(|e| bad(&e))?
        .take(MAX_CHECKPOINT_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(&e))?;
    if text.len() as u64 > MAX_CHECKPOINT_FILE {
        return Err(bad(&"larger than 64 KiB: not an audit checkpoint"));
    }
    Ok(ExportedCheckpoint {
        name: path.display().to_string(),
        text,
    })
}

/// An audit record as printed.
#[derive(Debug, Serialize)]
struct RecordView<'a> {
    seq: i64,
    time: i64,
    actor: &'a str,
    action: &'a str,
    target: &'a str,
    key_version: u32,
    result: &'a str,
    hash: &'a str,
}

impl<'a> From<&'a AuditRecord> for RecordView<'a> {
    fn from(r: &'a AuditRecord) -> Self {
        Self {
            seq: r.seq,
            time: r.time,
            actor: &r.actor,
            action: &r.action,
            target: &r.target,
            key_version: r.key_version,
            result: &r.result,
            hash: &r.hash,
        }
    }
}

/// What `audit show` prints.
#[derive(Debug, Serialize)]
struct RecordList<'a> {
    records: Vec<RecordView<'a>>,
}

impl View for RecordList<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        for r in &self.records {
            let v = if r.key_version > 0 {
                format!(" v{}", r.key_version)
            } else {
                String::new()
            };
            writeln!(
                w,
                "{:>6} {} {:<16} {}{v}  by {}  → {}",
                r.seq, r.time, r.action, r.target, r.actor, r.result
            )?;
        }
        Ok(())
    }
}

/// What `audit verify` prints; where the chain breaks, and every finding, only when it does.
#[derive(Debug, Serialize)]
struct Verdict<'a> {
    ok: bool,
    records: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    bad_seq: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a String>,
    #[serde(skip_serializing_if = "is_zero")]
    checkpoints: i64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    findings: Vec<FindingView<'a>>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// One finding as printed.
#[derive(Debug, Serialize)]
struct FindingView<'a> {
    seq: i64,
    kind: &'a str,
    detail: &'a str,
}

impl<'a> From<&'a AuditFinding> for FindingView<'a> {
    fn from(f: &'a AuditFinding) -> Self {
        Self {
            seq: f.seq,
            kind: &f.kind,
            detail: &f.detail,
        }
    }
}

impl View for Verdict<'_> {
    /// A broken chain prints nothing here: the error names it.
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        if self.ok {
            let against = match self.checkpoints {
                0 => String::new(),
                1 => " 1 checkpoint agrees.".into(),
                n => format!(" {n} checkpoints agree."),
            };
            writeln!(
                w,
                "Audit log intact: {} records, hash chain verified.{against}",
                self.records
            )?;
        }
        Ok(())
    }
}

/// What `audit checkpoint` prints: the checkpoint as written (what `--checkpoint` reads), and
/// the file it was written to.
#[derive(Debug, Serialize)]
struct CheckpointView {
    #[serde(flatten)]
    checkpoint: serde_json::Map<String, serde_json::Value>,
    file: String,
}

impl CheckpointView {
    fn new(r: &AuditCheckpoint) -> Result<Self, CliError> {
        let checkpoint = serde_json::from_str(&r.json)?;
        Ok(Self {
            checkpoint,
            file: r.file.clone(),
        })
    }
}

impl View for CheckpointView {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        let field = |k: &str| self.checkpoint.get(k).cloned().unwrap_or_default();
        writeln!(
            w,
            "Checkpoint of record {} (head {}) signed with {}, written to {}",
            field("seq"),
            field("head").as_str().unwrap_or_default(),
            field("key_id").as_str().unwrap_or_default(),
            self.file
        )?;
        writeln!(w, "{}", serde_json::Value::Object(self.checkpoint.clone()))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::output::rendered;
    use super::*;

    #[test]
    fn records_are_what_they_always_were() {
        let r = AuditRecord {
            seq: 12,
            time: 1_700_000_000,
            actor: "admin".into(),
            action: "key.sign".into(),
            target: "books/k".into(),
            key_version: 2,
            result: "ok".into(),
            hash: "ab".into(),
        };
        let list = RecordList {
            records: vec![RecordView::from(&r)],
        };
        let before = json!({"records": [{"seq": 12, "time": 1_700_000_000, "actor": "admin",
            "action": "key.sign", "target": "books/k", "key_version": 2, "result": "ok",
            "hash": "ab"}]});
        assert_eq!(rendered(Output::Json, &list), format!("{before}\n"));
        assert_eq!(
            rendered(Output::Text, &list),
            "    12 1700000000 key.sign         books/k v2  by admin  → ok\n"
        );
    }

    #[test]
    fn verdicts_are_what_they_always_were() {
        let intact = Verdict {
            ok: true,
            records: 5,
            bad_seq: None,
            reason: None,
            checkpoints: 0,
            findings: vec![],
        };
        assert_eq!(
            rendered(Output::Json, &intact),
            "{\"ok\":true,\"records\":5}\n"
        );
        assert_eq!(
            rendered(Output::Text, &intact),
            "Audit log intact: 5 records, hash chain verified.\n"
        );
        let reason = "hash mismatch".to_string();
        let broken = Verdict {
            ok: false,
            records: 5,
            bad_seq: Some(3),
            reason: Some(&reason),
            checkpoints: 0,
            findings: vec![],
        };
        let before = json!({"ok": false, "records": 5, "bad_seq": 3, "reason": reason});
        assert_eq!(rendered(Output::Json, &broken), format!("{before}\n"));
        assert_eq!(rendered(Output::Text, &broken), "");
    }
}
