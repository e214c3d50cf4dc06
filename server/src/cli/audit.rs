//! `audit`: the audit log and its hash chain.

use std::io::{self, Write};

use clap::Subcommand;
use continuity_proto::admin::audit_admin_client::AuditAdminClient;
use continuity_proto::admin::{AuditRecord, ShowAuditRequest, VerifyAuditRequest};
use serde::Serialize;
use tonic::transport::Channel;

use super::error::CliError;
use super::output::{Output, View, show};

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print records (the last N with --limit).
    Show {
        /// How many of the latest records.
        #[arg(long, default_value_t = 0)]
        limit: i64,
    },
    /// Check the hash chain; names the first bad record.
    Verify,
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
        AuditCommand::Verify => {
            let r = c.verify_audit(VerifyAuditRequest {}).await?.into_inner();
            let verdict = Verdict {
                ok: r.ok,
                records: r.records,
                bad_seq: (!r.ok).then_some(r.bad_seq),
                reason: (!r.ok).then_some(&r.reason),
            };
            show(out, &verdict)?;
            if r.ok {
                Ok(())
            } else {
                Err(CliError::Argument(format!(
                    "audit log tampered: {}",
                    r.reason
                )))
            }
        }
    }
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

/// What `audit verify` prints; where the chain breaks only when it does.
#[derive(Debug, Serialize)]
struct Verdict<'a> {
    ok: bool,
    records: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    bad_seq: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a String>,
}

impl View for Verdict<'_> {
    /// A broken chain prints nothing here: the error names it.
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        if self.ok {
            writeln!(
                w,
                "Audit log intact: {} records, hash chain verified.",
                self.records
            )?;
        }
        Ok(())
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
        };
        let before = json!({"ok": false, "records": 5, "bad_seq": 3, "reason": reason});
        assert_eq!(rendered(Output::Json, &broken), format!("{before}\n"));
        assert_eq!(rendered(Output::Text, &broken), "");
    }
}
