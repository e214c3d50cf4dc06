//! `entry`: registration entries.

use std::io::{self, Write};

use clap::{Args, Subcommand};
use continuity_proto::admin::entry_admin_client::EntryAdminClient;
use continuity_proto::admin::{
    CreateEntryRequest, DeleteEntryRequest, GetEntryRequest, ListEntriesRequest, UpdateEntryRequest,
};
use continuity_proto::types;
use serde::Serialize;
use tonic::transport::Channel;

use super::error::CliError;
use super::output::{Output, View, plural, show};
use super::parse;

/// `entry` subcommands.
#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Create an entry from flags, or a batch from `--data FILE`.
    Create(CreateArgs),
    /// Count entries (all, or filtered as `show` filters).
    Count(EntryFilter),
    /// Show entries (all, or filtered).
    Show {
        /// One entry by id.
        #[arg(long)]
        id: Option<String>,
        /// Filters.
        #[command(flatten)]
        filter: EntryFilter,
    },
    /// Replace an entry's fields.
    Update {
        /// The entry to update.
        #[arg(long)]
        id: String,
        /// New fields.
        #[command(flatten)]
        fields: EntryFields,
    },
    /// Delete an entry.
    Delete {
        /// The entry to delete.
        #[arg(long)]
        id: String,
    },
}

/// The filters of `entry show` and `entry count`.
#[derive(Debug, Args)]
pub struct EntryFilter {
    /// Filter by SPIFFE ID.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Filter by parent ID.
    #[arg(long)]
    pub parent_id: Option<String>,
    /// Filter by selector (entries having all of them).
    #[arg(long = "selector", value_parser = parse::selector)]
    pub selectors: Vec<types::Selector>,
}

impl From<EntryFilter> for ListEntriesRequest {
    fn from(f: EntryFilter) -> Self {
        Self {
            spiffe_id: f.spiffe_id.unwrap_or_default(),
            parent_id: f.parent_id.unwrap_or_default(),
            selectors: f.selectors,
        }
    }
}

/// `entry create`: one entry from flags, or many from a JSON file.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A JSON file of entries in SPIRE's `-data` shape (`{"entries": [...]}`); `-` reads
    /// stdin. Every entry is tried; the command fails if any is refused.
    #[arg(long, conflicts_with_all = ["spiffe_id", "parent_id", "node", "selectors"])]
    pub data: Option<std::path::PathBuf>,
    /// The entry's fields (without `--data`).
    #[command(flatten)]
    pub fields: EntryFields,
}

/// Fields of an entry.
#[derive(Debug, Args)]
pub struct EntryFields {
    /// The SPIFFE ID the workload receives (required).
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// The agent (or node alias) ID (required unless `--node`).
    #[arg(long, conflicts_with = "node")]
    pub parent_id: Option<String>,
    /// A node alias entry: its SPIFFE ID becomes an alias of every agent whose node
    /// selectors (`k8s_psat:cluster:C`, `k8s_psat:agent_node_name:N`, ...) include these.
    #[arg(long)]
    pub node: bool,
    /// TYPE:VALUE, repeatable; all must match (at least one).
    #[arg(long = "selector", value_parser = parse::selector)]
    pub selectors: Vec<types::Selector>,
    /// X509-SVID TTL (seconds or "1h"); server default when absent.
    #[arg(long)]
    pub x509_svid_ttl: Option<String>,
    /// JWT-SVID TTL (seconds or "5m"); server default when absent.
    #[arg(long)]
    pub jwt_svid_ttl: Option<String>,
    /// DNS SAN, repeatable.
    #[arg(long = "dns-name")]
    pub dns_names: Vec<String>,
    /// Hint for workloads holding several SVIDs.
    #[arg(long, default_value = "")]
    pub hint: String,
    /// Grant admin rights.
    #[arg(long)]
    pub admin: bool,
    /// Bind the entry to an Engine.
    #[arg(long)]
    pub engine: Option<String>,
    /// Trust domains to federate with, repeatable.
    #[arg(long = "federates-with")]
    pub federates_with: Vec<String>,
}

/// Runs an `entry` command.
pub async fn run(ch: Channel, out: Output, cmd: EntryCommand) -> Result<(), CliError> {
    let mut c = EntryAdminClient::new(ch);
    match cmd {
        EntryCommand::Create(CreateArgs {
            data: Some(file), ..
        }) => super::entry_batch::create(&mut c, out, &file).await,
        EntryCommand::Create(CreateArgs { fields, .. }) => {
            let entry = Some(entry_from(String::new(), fields)?);
            let e = c.create_entry(CreateEntryRequest { entry }).await?;
            show(out, &EntryView::from(&e.into_inner()))
        }
        EntryCommand::Count(filter) => {
            let r = c.list_entries(ListEntriesRequest::from(filter)).await?;
            show(
                out,
                &super::output::Count::new(
                    r.into_inner().entries.len(),
                    "registration entr",
                    ("y", "ies"),
                ),
            )
        }
        EntryCommand::Show { id: Some(id), .. } => {
            let e = c.get_entry(GetEntryRequest { id }).await?.into_inner();
            show(out, &EntryList::from(&[e][..]))
        }
        EntryCommand::Show { id: None, filter } => {
            let r = c
                .list_entries(ListEntriesRequest::from(filter))
                .await?
                .into_inner();
            show(out, &EntryList::from(&r.entries[..]))
        }
        EntryCommand::Update { id, fields } => {
            let entry = Some(entry_from(id, fields)?);
            let e = c.update_entry(UpdateEntryRequest { entry }).await?;
            show(out, &EntryView::from(&e.into_inner()))
        }
        EntryCommand::Delete { id } => {
            c.delete_entry(DeleteEntryRequest { id: id.clone() })
                .await?;
            show(out, &Deleted { deleted: id })
        }
    }
}

/// The parent ID of a node alias entry: the server's ID in the entry's trust domain.
pub(super) fn node_parent(spiffe_id: &str) -> Result<String, CliError> {
    let id = continuity_common::SpiffeId::new(spiffe_id)
        .map_err(|e| CliError::Argument(format!("--spiffe-id: {e}")))?;
    Ok(format!(
        "spiffe://{}{}",
        id.trust_domain(),
        crate::entry::NODE_PARENT_PATH
    ))
}

fn entry_from(id: String, f: EntryFields) -> Result<types::Entry, CliError> {
    let required = |what: &str| CliError::Argument(format!("{what} is required"));
    let spiffe_id = f.spiffe_id.ok_or_else(|| required("--spiffe-id"))?;
    let parent_id = match (f.parent_id, f.node) {
        (Some(p), _) => p,
        (None, true) => node_parent(&spiffe_id)?,
        (None, false) => return Err(required("--parent-id (or --node)")),
    };
    if f.selectors.is_empty() {
        return Err(required("at least one --selector"));
    }
    Ok(types::Entry {
        id,
        spiffe_id,
        parent_id,
        selectors: f.selectors,
        x509_svid_ttl: parse::seconds("--x509-svid-ttl", f.x509_svid_ttl.as_deref())? as i32,
        jwt_svid_ttl: parse::seconds("--jwt-svid-ttl", f.jwt_svid_ttl.as_deref())? as i32,
        dns_names: f.dns_names,
        hint: f.hint,
        admin: f.admin,
        engine: f.engine.unwrap_or_default(),
        federates_with: f.federates_with,
        revision: 0,
        created_at: 0,
    })
}

/// An entry as printed.
#[derive(Debug, Serialize)]
pub struct EntryView<'a> {
    id: &'a str,
    spiffe_id: &'a str,
    parent_id: &'a str,
    selectors: Vec<SelectorView<'a>>,
    x509_svid_ttl: i32,
    jwt_svid_ttl: i32,
    dns_names: &'a [String],
    hint: &'a str,
    admin: bool,
    engine: &'a str,
    federates_with: &'a [String],
    revision: i64,
    created_at: i64,
}

/// A selector as printed in an entry.
#[derive(Debug, Serialize)]
struct SelectorView<'a> {
    r#type: &'a str,
    value: &'a str,
}

impl<'a> From<&'a types::Entry> for EntryView<'a> {
    fn from(e: &'a types::Entry) -> Self {
        Self {
            id: &e.id,
            spiffe_id: &e.spiffe_id,
            parent_id: &e.parent_id,
            selectors: e
                .selectors
                .iter()
                .map(|s| SelectorView {
                    r#type: &s.r#type,
                    value: &s.value,
                })
                .collect(),
            x509_svid_ttl: e.x509_svid_ttl,
            jwt_svid_ttl: e.jwt_svid_ttl,
            dns_names: &e.dns_names,
            hint: &e.hint,
            admin: e.admin,
            engine: &e.engine,
            federates_with: &e.federates_with,
            revision: e.revision,
            created_at: e.created_at,
        }
    }
}

impl View for EntryView<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        let ttl = |t: i32| match t {
            0 => "default".to_string(),
            t => format!("{t}s"),
        };
        writeln!(w, "Entry ID         : {}", self.id)?;
        writeln!(w, "SPIFFE ID        : {}", self.spiffe_id)?;
        writeln!(w, "Parent ID        : {}", self.parent_id)?;
        writeln!(w, "Revision         : {}", self.revision)?;
        writeln!(w, "X509-SVID TTL    : {}", ttl(self.x509_svid_ttl))?;
        writeln!(w, "JWT-SVID TTL     : {}", ttl(self.jwt_svid_ttl))?;
        for s in &self.selectors {
            writeln!(w, "Selector         : {}:{}", s.r#type, s.value)?;
        }
        for d in self.dns_names {
            writeln!(w, "DNS name         : {d}")?;
        }
        if !self.hint.is_empty() {
            writeln!(w, "Hint             : {}", self.hint)?;
        }
        if self.admin {
            writeln!(w, "Admin            : true")?;
        }
        writeln!(w)
    }
}

/// Entries as printed by `entry show`.
#[derive(Debug, Serialize)]
pub struct EntryList<'a> {
    entries: Vec<EntryView<'a>>,
}

impl<'a> From<&'a [types::Entry]> for EntryList<'a> {
    fn from(entries: &'a [types::Entry]) -> Self {
        Self {
            entries: entries.iter().map(EntryView::from).collect(),
        }
    }
}

impl View for EntryList<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        let n = self.entries.len();
        writeln!(w, "Found {n} entr{}", plural(n, "y", "ies"))?;
        self.entries.iter().try_for_each(|e| e.text(w))
    }
}

/// What `entry delete` prints.
#[derive(Debug, Serialize)]
struct Deleted {
    deleted: String,
}

impl View for Deleted {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        writeln!(w, "Deleted entry {}", self.deleted)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::output::rendered;
    use super::*;

    fn entry() -> types::Entry {
        types::Entry {
            id: "e1".into(),
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/node".into(),
            selectors: vec![parse::selector("unix:uid:1000").unwrap()],
            x509_svid_ttl: 600,
            jwt_svid_ttl: 0,
            dns_names: vec!["web.example.org".into()],
            hint: "h".into(),
            admin: true,
            engine: "books".into(),
            federates_with: vec!["spiffe://other.org".into()],
            revision: 3,
            created_at: 1_700_000_000,
        }
    }

    #[test]
    fn entry_json_is_what_it_always_was() {
        let e = entry();
        // The object the CLI built by hand before views.
        let before = json!({
            "id": e.id, "spiffe_id": e.spiffe_id, "parent_id": e.parent_id,
            "selectors": [{"type": "unix", "value": "uid:1000"}],
            "x509_svid_ttl": 600, "jwt_svid_ttl": 0, "dns_names": e.dns_names, "hint": "h",
            "admin": true, "engine": "books", "federates_with": e.federates_with,
            "revision": 3, "created_at": 1_700_000_000,
        });
        assert_eq!(
            rendered(Output::Json, &EntryView::from(&e)),
            format!("{before}\n")
        );
        let list = rendered(Output::Json, &EntryList::from(&[e][..]));
        assert_eq!(list, format!("{}\n", json!({ "entries": [before] })));
        let deleted = Deleted {
            deleted: "e1".into(),
        };
        assert_eq!(rendered(Output::Json, &deleted), "{\"deleted\":\"e1\"}\n");
    }

    #[test]
    fn entry_text_is_what_it_always_was() {
        let e = entry();
        let one = "Entry ID         : e1\nSPIFFE ID        : spiffe://example.org/web\n\
                   Parent ID        : spiffe://example.org/node\nRevision         : 3\n\
                   X509-SVID TTL    : 600s\nJWT-SVID TTL     : default\n\
                   Selector         : unix:uid:1000\nDNS name         : web.example.org\n\
                   Hint             : h\nAdmin            : true\n\n";
        assert_eq!(rendered(Output::Text, &EntryView::from(&e)), one);
        let two = [e.clone(), e];
        let list = rendered(Output::Text, &EntryList::from(&two[..]));
        assert_eq!(list, format!("Found 2 entries\n{one}{one}"));
        assert_eq!(
            rendered(Output::Text, &EntryList::from(&[][..])),
            "Found 0 entries\n"
        );
    }
}
