//! `entry create --data FILE`: entries in SPIRE's batch JSON shape (`{"entries": [...]}`, the
//! file SPIRE's `entry create -data` reads), each created on its own; a refused entry is
//! reported and the rest still tried, and the command fails if any was refused.

use std::io::{self, Read, Write};
use std::path::Path;

use continuity_proto::admin::CreateEntryRequest;
use continuity_proto::admin::entry_admin_client::EntryAdminClient;
use continuity_proto::types;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use super::entry::{EntryView, node_parent};
use super::error::CliError;
use super::output::{Output, View, show};

/// Largest file read (an entry is well under 4 KiB: 16 MiB is thousands of them).
const MAX_FILE: u64 = 16 << 20;

/// The file: SPIRE's `RegistrationEntries` JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    entries: Vec<FileEntry>,
}

/// One entry of the file, with SPIRE's field names. Fields SPIRE has and we do not support
/// are refused when set, never silently dropped.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    spiffe_id: String,
    #[serde(default)]
    parent_id: String,
    #[serde(default)]
    selectors: Vec<FileSelector>,
    #[serde(default)]
    x509_svid_ttl: i32,
    #[serde(default)]
    jwt_svid_ttl: i32,
    /// SPIRE's older single TTL: the X509-SVID TTL.
    #[serde(default)]
    ttl: i32,
    #[serde(default)]
    federates_with: Vec<String>,
    #[serde(default)]
    dns_names: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    hint: String,
    /// Ours: bind the entry to an Engine.
    #[serde(default)]
    engine: String,
    /// Set by the server: ignored on create, as SPIRE does.
    #[serde(default)]
    entry_id: String,
    #[serde(default)]
    revision_number: i64,
    #[serde(default)]
    downstream: bool,
    #[serde(default)]
    store_svid: bool,
    #[serde(default)]
    entry_expiry: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSelector {
    r#type: String,
    value: String,
}

impl FileEntry {
    /// The entry to create, or why this one cannot be.
    fn to_entry(&self) -> Result<types::Entry, String> {
        let _ = (&self.entry_id, self.revision_number);
        if self.downstream || self.store_svid || self.entry_expiry != 0 {
            return Err("downstream, store_svid and entry_expiry are not supported".into());
        }
        if self.selectors.is_empty() {
            return Err("an entry needs at least one selector".into());
        }
        if self.ttl != 0 && self.x509_svid_ttl != 0 && self.ttl != self.x509_svid_ttl {
            return Err("ttl and x509_svid_ttl disagree".into());
        }
        if self.x509_svid_ttl < 0 || self.jwt_svid_ttl < 0 || self.ttl < 0 {
            return Err("a TTL cannot be negative".into());
        }
        Ok(types::Entry {
            spiffe_id: self.spiffe_id.clone(),
            parent_id: self.parent()?,
            selectors: self
                .selectors
                .iter()
                .map(|s| types::Selector {
                    r#type: s.r#type.clone(),
                    value: s.value.clone(),
                })
                .collect(),
            x509_svid_ttl: if self.x509_svid_ttl != 0 {
                self.x509_svid_ttl
            } else {
                self.ttl
            },
            jwt_svid_ttl: self.jwt_svid_ttl,
            dns_names: self.dns_names.clone(),
            hint: self.hint.clone(),
            admin: self.admin,
            engine: self.engine.clone(),
            federates_with: self.federates_with.clone(),
            ..Default::default()
        })
    }

    /// The parent: SPIRE's node entries name `spiffe://<td>/spire/server`, which is our node
    /// alias parent.
    fn parent(&self) -> Result<String, String> {
        match continuity_common::SpiffeId::new(&self.parent_id) {
            Ok(p) if p.path() == "/spire/server" => {
                node_parent(&self.spiffe_id).map_err(|e| e.to_string())
            }
            Ok(_) => Ok(self.parent_id.clone()),
            Err(e) => Err(format!("parent_id: {e}")),
        }
    }
}

/// Reads and parses the file (`-`: stdin).
fn read(path: &Path) -> Result<File, CliError> {
    let name = path.display();
    let mut text = String::new();
    let read = if path == Path::new("-") {
        io::stdin().take(MAX_FILE + 1).read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(MAX_FILE + 1).read_to_string(&mut text))
    };
    read.map_err(|e| CliError::Argument(format!("--data {name}: {e}")))?;
    if text.len() as u64 > MAX_FILE {
        return Err(CliError::Argument(format!(
            "--data {name}: larger than {MAX_FILE} bytes"
        )));
    }
    serde_json::from_str(&text).map_err(|e| {
        CliError::Argument(format!(
            "--data {name}: not SPIRE's entries JSON ({{\"entries\": [...]}}): {e}"
        ))
    })
}

/// Creates every entry of `path`, printing each result.
pub async fn create(
    c: &mut EntryAdminClient<Channel>,
    out: Output,
    path: &Path,
) -> Result<(), CliError> {
    let file = read(path)?;
    let mut results = Vec::with_capacity(file.entries.len());
    for (n, fe) in file.entries.iter().enumerate() {
        let result = match fe.to_entry() {
            Err(why) => Outcome::refused(n, &fe.spiffe_id, tonic::Code::InvalidArgument, why),
            Ok(entry) => match c
                .create_entry(CreateEntryRequest { entry: Some(entry) })
                .await
            {
                Ok(r) => Outcome::created(n, r.into_inner()),
                Err(s) => Outcome::refused(n, &fe.spiffe_id, s.code(), s.message().to_string()),
            },
        };
        results.push(result);
    }
    let failed = results.iter().filter(|r| r.entry.is_none()).count();
    show(out, &Results { results: &results })?;
    match failed {
        0 => Ok(()),
        n => Err(CliError::Argument(format!(
            "{n} of {} entries could not be created",
            results.len()
        ))),
    }
}

/// One entry's outcome, as SPIRE's batch result: a status and, on success, the entry.
#[derive(Debug)]
struct Outcome {
    /// Position in the file (0-based).
    index: usize,
    status: Status,
    entry: Option<types::Entry>,
    spiffe_id: String,
}

#[derive(Debug, Serialize)]
struct Status {
    code: i32,
    message: String,
}

impl Outcome {
    fn created(index: usize, e: types::Entry) -> Self {
        let status = Status {
            code: 0,
            message: "OK".into(),
        };
        Self {
            index,
            status,
            entry: Some(e),
            spiffe_id: String::new(),
        }
    }

    fn refused(index: usize, spiffe_id: &str, code: tonic::Code, message: String) -> Self {
        let status = Status {
            code: code as i32,
            message,
        };
        Self {
            index,
            status,
            entry: None,
            spiffe_id: spiffe_id.to_string(),
        }
    }
}

#[derive(Debug)]
struct Results<'a> {
    results: &'a [Outcome],
}

impl Serialize for Results<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            results: Vec<WireOutcome<'a>>,
        }
        #[derive(Serialize)]
        struct WireOutcome<'a> {
            index: usize,
            status: &'a Status,
            #[serde(skip_serializing_if = "Option::is_none")]
            entry: Option<EntryView<'a>>,
            #[serde(skip_serializing_if = "str::is_empty")]
            spiffe_id: &'a str,
        }
        Wire {
            results: self
                .results
                .iter()
                .map(|r| WireOutcome {
                    index: r.index,
                    status: &r.status,
                    entry: r.entry.as_ref().map(EntryView::from),
                    spiffe_id: &r.spiffe_id,
                })
                .collect(),
        }
        .serialize(s)
    }
}

impl View for Results<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        for r in self.results {
            match &r.entry {
                Some(e) => EntryView::from(e).text(w)?,
                None => {
                    writeln!(w, "FAILED to create entry #{} ({}):", r.index, r.spiffe_id)?;
                    writeln!(w, "  {}\n", r.status.message)?;
                }
            }
        }
        Ok(())
    }
}
