//! `engine`: Engines, their incarnations and KV secrets (keys are in [`super::key`]).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use clap::Subcommand;
use continuity_proto::admin::engine_admin_client::EngineAdminClient;
use continuity_proto::admin::{
    CreateEngineRequest, Engine, GetEngineRequest, IncarnationRecord, ListEnginesRequest,
    ListIncarnationsRequest, PutSecretRequest,
};
use serde::Serialize;
use tonic::transport::Channel;

use super::error::CliError;
use super::key::{self, KeyCommand};
use super::output::{Output, View, plural, show};
use super::parse::{self, Custody};

/// `engine` subcommands.
#[derive(Debug, Subcommand)]
pub enum EngineCommand {
    /// Create an Engine.
    Create {
        /// Engine name (a-z, 0-9, '-', '_').
        name: String,
        /// Tier 0, 1 or 2 (custody defaults: hsm, transit, kv).
        #[arg(long)]
        tier: i32,
        /// hsm | transit | kv.
        #[arg(long, value_parser = parse::domain::<Custody>)]
        custody: Option<Custody>,
        /// SPIFFE ID (default spiffe://<td>/engine/<name>).
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Allow more exposure than the tier's alignment (audited).
        #[arg(long)]
        allow_exposure: bool,
    },
    /// Show one Engine.
    Show {
        /// Engine name.
        name: String,
    },
    /// List Engines.
    List,
    /// The workloads that were this Engine.
    Incarnations {
        /// Engine name.
        name: String,
    },
    /// Engine keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Named KV secrets.
    #[command(subcommand)]
    Secret(SecretCommand),
}

/// `engine secret` subcommands.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Store a new version of a named secret (KV custody Engines).
    Put {
        /// Engine.
        engine: String,
        /// Secret name.
        name: String,
        /// Read the value from this file ("-" for stdin).
        #[arg(long)]
        value_file: PathBuf,
    },
}

/// Runs an `engine` command.
pub async fn run(ch: Channel, out: Output, cmd: EngineCommand) -> Result<(), CliError> {
    let mut c = EngineAdminClient::new(ch);
    match cmd {
        EngineCommand::Create {
            name,
            tier,
            custody,
            spiffe_id,
            allow_exposure,
        } => {
            let request = CreateEngineRequest {
                name,
                tier,
                custody: custody.map(|c| c.as_str().to_string()).unwrap_or_default(),
                spiffe_id: spiffe_id.unwrap_or_default(),
                allow_exposure,
            };
            let e = c.create_engine(request).await?.into_inner();
            show(out, &EngineView::from(&e))
        }
        EngineCommand::Show { name } => {
            let e = c.get_engine(GetEngineRequest { name }).await?.into_inner();
            show(out, &EngineView::from(&e))
        }
        EngineCommand::List => {
            let r = c.list_engines(ListEnginesRequest {}).await?.into_inner();
            let engines = r.engines.iter().map(EngineView::from).collect();
            show(out, &EngineList { engines })
        }
        EngineCommand::Incarnations { name } => {
            let request = ListIncarnationsRequest { engine: name };
            let r = c.list_incarnations(request).await?.into_inner();
            let incarnations = r.incarnations.iter().map(IncarnationView::from).collect();
            show(out, &IncarnationList { incarnations })
        }
        EngineCommand::Key(cmd) => key::run(&mut c, out, cmd).await,
        EngineCommand::Secret(SecretCommand::Put {
            engine,
            name,
            value_file,
        }) => {
            let value = read_value(&value_file)?;
            let request = PutSecretRequest {
                engine: engine.clone(),
                name: name.clone(),
                value,
            };
            let r = c.put_secret(request).await?.into_inner();
            let version = r.version;
            show(
                out,
                &Stored {
                    engine,
                    name,
                    version,
                },
            )
        }
    }
}

fn read_value(value_file: &Path) -> Result<Vec<u8>, CliError> {
    if value_file.as_os_str() == "-" {
        let mut v = Vec::new();
        io::stdin()
            .read_to_end(&mut v)
            .map_err(|e| CliError::Argument(e.to_string()))?;
        Ok(v)
    } else {
        std::fs::read(value_file)
            .map_err(|e| CliError::Argument(format!("--value-file {}: {e}", value_file.display())))
    }
}

/// An Engine as printed.
#[derive(Debug, Serialize)]
struct EngineView<'a> {
    name: &'a str,
    spiffe_id: &'a str,
    tier: i32,
    custody: &'a str,
    exposure_override: bool,
    created_at: i64,
}

impl<'a> From<&'a Engine> for EngineView<'a> {
    fn from(e: &'a Engine) -> Self {
        Self {
            name: &e.name,
            spiffe_id: &e.spiffe_id,
            tier: e.tier,
            custody: &e.custody,
            exposure_override: e.exposure_override,
            created_at: e.created_at,
        }
    }
}

impl View for EngineView<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        writeln!(w, "Engine           : {}", self.name)?;
        writeln!(w, "SPIFFE ID        : {}", self.spiffe_id)?;
        writeln!(w, "Tier             : {}", self.tier)?;
        let exposure = if self.exposure_override {
            " (exposure override)"
        } else {
            ""
        };
        writeln!(w, "Custody          : {}{exposure}", self.custody)
    }
}

/// What `engine list` prints.
#[derive(Debug, Serialize)]
struct EngineList<'a> {
    engines: Vec<EngineView<'a>>,
}

impl View for EngineList<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        for e in &self.engines {
            writeln!(
                w,
                "{:<20} tier {}  {:<8} {}",
                e.name, e.tier, e.custody, e.spiffe_id
            )?;
        }
        Ok(())
    }
}

/// An incarnation as printed (selectors as `type:value`).
#[derive(Debug, Serialize)]
struct IncarnationView<'a> {
    engine: &'a str,
    entry_id: &'a str,
    agent_id: &'a str,
    workload_id: &'a str,
    pid: u32,
    uid: u32,
    selectors: Vec<String>,
    first_seen: i64,
    last_seen: i64,
}

impl<'a> From<&'a IncarnationRecord> for IncarnationView<'a> {
    fn from(i: &'a IncarnationRecord) -> Self {
        Self {
            engine: &i.engine,
            entry_id: &i.entry_id,
            agent_id: &i.agent_id,
            workload_id: &i.workload_id,
            pid: i.pid,
            uid: i.uid,
            selectors: i
                .selectors
                .iter()
                .map(|s| format!("{}:{}", s.r#type, s.value))
                .collect(),
            first_seen: i.first_seen,
            last_seen: i.last_seen,
        }
    }
}

/// What `engine incarnations` prints.
#[derive(Debug, Serialize)]
struct IncarnationList<'a> {
    incarnations: Vec<IncarnationView<'a>>,
}

impl View for IncarnationList<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        let n = self.incarnations.len();
        writeln!(w, "Found {n} incarnation{}", plural(n, "", "s"))?;
        for i in &self.incarnations {
            writeln!(
                w,
                "{}  agent {}  pid {} uid {}  first {} last {}",
                i.workload_id, i.agent_id, i.pid, i.uid, i.first_seen, i.last_seen
            )?;
        }
        Ok(())
    }
}

/// What `engine secret put` prints.
#[derive(Debug, Serialize)]
struct Stored {
    engine: String,
    name: String,
    version: u32,
}

impl View for Stored {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        let Self {
            engine,
            name,
            version,
        } = self;
        writeln!(w, "Stored {engine}/{name} version {version}")
    }
}

#[cfg(test)]
mod tests {
    use continuity_proto::types::Selector;
    use serde_json::json;

    use super::super::output::rendered;
    use super::*;

    fn engine(exposure_override: bool) -> Engine {
        Engine {
            name: "books".into(),
            spiffe_id: "spiffe://example.org/engine/books".into(),
            tier: 1,
            custody: "transit".into(),
            exposure_override,
            created_at: 9,
        }
    }

    #[test]
    fn engine_output_is_what_it_always_was() {
        let e = engine(true);
        let before = json!({"name": "books", "spiffe_id": e.spiffe_id, "tier": 1,
            "custody": "transit", "exposure_override": true, "created_at": 9});
        assert_eq!(
            rendered(Output::Json, &EngineView::from(&e)),
            format!("{before}\n")
        );
        assert_eq!(
            rendered(Output::Text, &EngineView::from(&e)),
            "Engine           : books\nSPIFFE ID        : spiffe://example.org/engine/books\n\
             Tier             : 1\nCustody          : transit (exposure override)\n"
        );
        let plain = engine(false);
        let list = EngineList {
            engines: vec![EngineView::from(&plain)],
        };
        assert_eq!(
            rendered(Output::Text, &list),
            "books                tier 1  transit  spiffe://example.org/engine/books\n"
        );
        let stored = Stored {
            engine: "kvs".into(),
            name: "db".into(),
            version: 2,
        };
        assert_eq!(rendered(Output::Text, &stored), "Stored kvs/db version 2\n");
        assert_eq!(
            rendered(Output::Json, &stored),
            format!("{}\n", json!({"engine": "kvs", "name": "db", "version": 2}))
        );
    }

    #[test]
    fn incarnations_are_what_they_always_were() {
        let i = IncarnationRecord {
            engine: "books".into(),
            entry_id: "e1".into(),
            agent_id: "spiffe://example.org/a".into(),
            workload_id: "pid:7:start:8".into(),
            pid: 7,
            uid: 1000,
            selectors: vec![Selector {
                r#type: "unix".into(),
                value: "uid:1000".into(),
            }],
            first_seen: 1,
            last_seen: 2,
        };
        let list = IncarnationList {
            incarnations: vec![IncarnationView::from(&i)],
        };
        let before = json!({"incarnations": [{
            "engine": "books", "entry_id": "e1", "agent_id": i.agent_id, "workload_id": i.workload_id,
            "pid": 7, "uid": 1000, "selectors": ["unix:uid:1000"], "first_seen": 1, "last_seen": 2,
        }]});
        assert_eq!(rendered(Output::Json, &list), format!("{before}\n"));
        assert_eq!(
            rendered(Output::Text, &list),
            "Found 1 incarnation\npid:7:start:8  agent spiffe://example.org/a  pid 7 uid 1000  first 1 last 2\n"
        );
    }
}
