//! The `continuity-server` command line: `run`, `healthcheck`, and the admin commands that talk
//! to a running server over its admin socket.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use continuity_proto::admin::agent_admin_client::AgentAdminClient;
use continuity_proto::admin::bundle_admin_client::BundleAdminClient;
use continuity_proto::admin::entry_admin_client::EntryAdminClient;
use continuity_proto::admin::token_admin_client::TokenAdminClient;
use continuity_proto::admin::*;
use continuity_proto::types;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::config::DEFAULT_ADMIN_SOCKET;

/// The Continuity server: the trust domain's authority.
#[derive(Debug, Parser)]
#[command(name = "continuity-server", version, about)]
pub struct Cli {
    /// Admin socket of the running server.
    #[arg(long, global = true, default_value = DEFAULT_ADMIN_SOCKET)]
    pub socket: PathBuf,
    /// Output format of show/list commands.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable.
    Text,
    /// JSON.
    Json,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Run {
        /// Path to server.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check that a running server answers on its admin socket.
    Healthcheck,
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// The trust bundle.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Attested agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Engines: persistent identities of logical services and their keys.
    #[command(subcommand)]
    Engine(EngineCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

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
        #[arg(long)]
        custody: Option<String>,
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

/// `engine key` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key (version 1).
    Create {
        /// Engine.
        engine: String,
        /// Key name.
        key: String,
        /// sign | encrypt.
        #[arg(long)]
        purpose: String,
        /// ec-p256 | rsa-2048 | rsa-3072 | aes-256-gcm.
        #[arg(long)]
        algorithm: Option<String>,
        /// Automatic rotation period ("30d"); none when absent.
        #[arg(long)]
        rotation_period: Option<String>,
        /// Grace before a scheduled destruction ("24h" default).
        #[arg(long)]
        destroy_grace: Option<String>,
    },
    /// List keys and versions.
    List {
        /// Engine.
        engine: String,
    },
    /// Add a version and make it primary.
    Rotate {
        /// Engine.
        engine: String,
        /// Key.
        key: String,
    },
    /// DISABLED → ENABLED.
    Enable(VersionArgs),
    /// ENABLED → DISABLED.
    Disable(VersionArgs),
    /// Schedule destruction (after the key's grace).
    Destroy(VersionArgs),
    /// Cancel a scheduled destruction (→ DISABLED).
    Restore(VersionArgs),
}

/// A key version.
#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Engine.
    pub engine: String,
    /// Key.
    pub key: String,
    /// Version.
    #[arg(long)]
    pub version: u32,
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

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Generate a single-use join token.
    Generate {
        /// Node alias: entries parented to this ID reach the agent that uses the token.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Lifetime (seconds or "10m"); default 10m, at most 1h.
        #[arg(long)]
        ttl: Option<String>,
    },
}

/// Fields of an entry.
#[derive(Debug, Args)]
pub struct EntryFields {
    /// The SPIFFE ID the workload receives.
    #[arg(long)]
    pub spiffe_id: String,
    /// The agent (or node alias) ID.
    #[arg(long)]
    pub parent_id: String,
    /// TYPE:VALUE, repeatable; all must match.
    #[arg(long = "selector", required = true)]
    pub selectors: Vec<String>,
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

/// `entry` subcommands.
#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Create an entry.
    Create(EntryFields),
    /// Show entries (all, or filtered).
    Show {
        /// One entry by id.
        #[arg(long)]
        id: Option<String>,
        /// Filter by SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Filter by parent ID.
        #[arg(long)]
        parent_id: Option<String>,
        /// Filter by selector (entries having all of them).
        #[arg(long = "selector")]
        selectors: Vec<String>,
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

/// `bundle` subcommands.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print the trust bundle.
    Show {
        /// pem: CA certificates; spiffe: the SPIFFE bundle document (JWKS).
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
}

/// Bundle formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// Concatenated PEM certificates.
    Pem,
    /// SPIFFE bundle JSON.
    Spiffe,
}

/// `agent` subcommands.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List attested agents.
    List,
    /// Show one agent.
    Show {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
    },
    /// Remove an agent; it must attest again to return.
    Evict {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
    },
    /// Ban an agent: refuse its calls and its re-attestation.
    Ban {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
    },
}

/// CLI failures.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server is not reachable on its socket.
    #[error("cannot reach the server on {socket}: {source} (is it running? is --socket right?)")]
    Connect {
        /// The socket tried.
        socket: PathBuf,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The server refused the request.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(Box<tonic::Status>),
    /// An argument was malformed.
    #[error("{0}")]
    Argument(String),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        Self::Status(Box::new(s))
    }
}

fn seconds(flag: &str, v: &Option<String>) -> Result<i64, CliError> {
    match v {
        None => Ok(0),
        Some(s) => continuity_common::duration::parse(s)
            .map(|d| d.as_secs() as i64)
            .map_err(|e| CliError::Argument(format!("{flag}: {e}"))),
    }
}

fn selector(s: &str) -> Result<types::Selector, CliError> {
    let (t, v) = s.split_once(':').ok_or_else(|| {
        CliError::Argument(format!(
            "--selector {s:?} must be TYPE:VALUE, e.g. unix:uid:1000"
        ))
    })?;
    Ok(types::Selector {
        r#type: t.into(),
        value: v.into(),
    })
}

fn entry_from(id: String, f: EntryFields) -> Result<types::Entry, CliError> {
    Ok(types::Entry {
        id,
        spiffe_id: f.spiffe_id,
        parent_id: f.parent_id,
        selectors: f
            .selectors
            .iter()
            .map(|s| selector(s))
            .collect::<Result<_, _>>()?,
        x509_svid_ttl: seconds("--x509-svid-ttl", &f.x509_svid_ttl)? as i32,
        jwt_svid_ttl: seconds("--jwt-svid-ttl", &f.jwt_svid_ttl)? as i32,
        dns_names: f.dns_names,
        hint: f.hint,
        admin: f.admin,
        engine: f.engine.unwrap_or_default(),
        federates_with: f.federates_with,
        revision: 0,
        created_at: 0,
    })
}

/// JSON form of an entry.
pub fn entry_json(e: &types::Entry) -> Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| json!({"type": s.r#type, "value": s.value})).collect::<Vec<_>>(),
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "dns_names": e.dns_names,
        "hint": e.hint,
        "admin": e.admin,
        "engine": e.engine,
        "federates_with": e.federates_with,
        "revision": e.revision,
        "created_at": e.created_at,
    })
}

fn entry_text(e: &types::Entry) -> String {
    let ttl = |t: i32| {
        if t == 0 {
            "default".to_string()
        } else {
            format!("{t}s")
        }
    };
    let mut s = format!(
        "Entry ID         : {}\nSPIFFE ID        : {}\nParent ID        : {}\nRevision         : {}\nX509-SVID TTL    : {}\nJWT-SVID TTL     : {}\n",
        e.id,
        e.spiffe_id,
        e.parent_id,
        e.revision,
        ttl(e.x509_svid_ttl),
        ttl(e.jwt_svid_ttl)
    );
    for sel in &e.selectors {
        s.push_str(&format!(
            "Selector         : {}:{}\n",
            sel.r#type, sel.value
        ));
    }
    for d in &e.dns_names {
        s.push_str(&format!("DNS name         : {d}\n"));
    }
    if !e.hint.is_empty() {
        s.push_str(&format!("Hint             : {}\n", e.hint));
    }
    if e.admin {
        s.push_str("Admin            : true\n");
    }
    s
}

/// JSON form of an agent.
pub fn agent_json(a: &types::Agent) -> Value {
    json!({
        "spiffe_id": a.spiffe_id,
        "attestation_type": a.attestation_type,
        "serial_number": a.serial_number,
        "expires_at": a.expires_at,
        "banned": a.banned,
        "alias": a.alias,
        "created_at": a.created_at,
        "last_seen": a.last_seen,
        "forked": a.forked,
        "forked_at": a.forked_at,
    })
}

fn agent_text(a: &types::Agent) -> String {
    format!(
        "SPIFFE ID        : {}\nAttestation type : {}\nSVID serial      : {}\nSVID expires at  : {}\nBanned           : {}\n{}{}",
        a.spiffe_id,
        a.attestation_type,
        a.serial_number,
        a.expires_at,
        a.banned,
        if a.alias.is_empty() {
            String::new()
        } else {
            format!("Alias            : {}\n", a.alias)
        },
        if a.forked {
            format!(
                "Forked           : true (at {}; a superseded SVID was presented: ban or evict, then re-attest)\n",
                a.forked_at
            )
        } else {
            String::new()
        }
    )
}

fn print_entries(out: Output, entries: &[types::Entry]) {
    match out {
        Output::Json => println!(
            "{}",
            json!({ "entries": entries.iter().map(entry_json).collect::<Vec<_>>() })
        ),
        Output::Text => {
            println!(
                "Found {} entr{}",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" }
            );
            for e in entries {
                println!("{}", entry_text(e));
            }
        }
    }
}

fn print_entry(out: Output, e: &types::Entry) {
    match out {
        Output::Json => println!("{}", entry_json(e)),
        Output::Text => println!("{}", entry_text(e)),
    }
}

async fn channel(cli: &Cli) -> Result<Channel, CliError> {
    continuity_common::grpc::uds_channel(&cli.socket)
        .await
        .map_err(|source| CliError::Connect {
            socket: cli.socket.clone(),
            source,
        })
}

/// Runs an admin command (everything but `run`).
pub async fn admin(cli: Cli) -> Result<(), CliError> {
    let ch = channel(&cli).await?;
    let out = cli.output;
    match cli.command {
        Command::Run { .. } => {
            return Err(CliError::Argument(
                "`run` starts a server; it is not an admin command".into(),
            ));
        }
        Command::Healthcheck => {
            let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
            let r = c
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner();
            if r.status != tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                return Err(tonic::Status::unavailable("server is not serving").into());
            }
            println!("Server is healthy.");
        }
        Command::Token(TokenCommand::Generate { spiffe_id, ttl }) => {
            let r = TokenAdminClient::new(ch)
                .generate_token(GenerateTokenRequest {
                    spiffe_id: spiffe_id.unwrap_or_default(),
                    ttl: seconds("--ttl", &ttl)?,
                })
                .await?
                .into_inner();
            match out {
                Output::Json => {
                    println!("{}", json!({"token": r.token, "expires_at": r.expires_at}))
                }
                Output::Text => println!("Token: {}", r.token),
            }
        }
        Command::Entry(cmd) => entry(ch, out, cmd).await?,
        Command::Bundle(BundleCommand::Show { format }) => {
            let b = BundleAdminClient::new(ch)
                .get_bundle(GetBundleRequest {})
                .await?
                .into_inner();
            match format {
                BundleFormat::Pem => {
                    for c in &b.x509_authorities {
                        print!("{}", continuity_common::x509::pem_encode("CERTIFICATE", c));
                    }
                }
                BundleFormat::Spiffe => {
                    let jwt: Vec<_> = b
                        .jwt_authorities
                        .iter()
                        .map(|k| continuity_common::jwk::JwtAuthority {
                            key_id: &k.key_id,
                            public_key: &k.public_key,
                        })
                        .collect();
                    let doc = continuity_common::jwk::spiffe_bundle(
                        &b.x509_authorities,
                        &jwt,
                        b.sequence_number,
                        b.refresh_hint,
                    )
                    .map_err(|e| CliError::Argument(e.to_string()))?;
                    println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
                }
            }
        }
        Command::Engine(cmd) => engine(ch, out, cmd).await?,
        Command::Audit(cmd) => audit(ch, out, cmd).await?,
        Command::Agent(cmd) => {
            let mut c = AgentAdminClient::new(ch);
            match cmd {
                AgentCommand::List => {
                    let agents = c
                        .list_agents(ListAgentsRequest {})
                        .await?
                        .into_inner()
                        .agents;
                    match out {
                        Output::Json => println!(
                            "{}",
                            json!({"agents": agents.iter().map(agent_json).collect::<Vec<_>>()})
                        ),
                        Output::Text => {
                            println!(
                                "Found {} attested agent{}",
                                agents.len(),
                                if agents.len() == 1 { "" } else { "s" }
                            );
                            for a in &agents {
                                println!("{}", agent_text(a));
                            }
                        }
                    }
                }
                AgentCommand::Show { spiffe_id } => {
                    let a = c
                        .get_agent(GetAgentRequest { spiffe_id })
                        .await?
                        .into_inner();
                    match out {
                        Output::Json => println!("{}", agent_json(&a)),
                        Output::Text => println!("{}", agent_text(&a)),
                    }
                }
                AgentCommand::Evict { spiffe_id } => {
                    c.evict_agent(EvictAgentRequest {
                        spiffe_id: spiffe_id.clone(),
                    })
                    .await?;
                    println!("Agent {spiffe_id} evicted.");
                }
                AgentCommand::Ban { spiffe_id } => {
                    c.ban_agent(BanAgentRequest {
                        spiffe_id: spiffe_id.clone(),
                    })
                    .await?;
                    println!("Agent {spiffe_id} banned.");
                }
            }
        }
    }
    Ok(())
}

async fn entry(ch: Channel, out: Output, cmd: EntryCommand) -> Result<(), CliError> {
    let mut c = EntryAdminClient::new(ch);
    match cmd {
        EntryCommand::Create(f) => {
            let e = c
                .create_entry(CreateEntryRequest {
                    entry: Some(entry_from(String::new(), f)?),
                })
                .await?
                .into_inner();
            print_entry(out, &e);
        }
        EntryCommand::Show { id: Some(id), .. } => {
            let e = c.get_entry(GetEntryRequest { id }).await?.into_inner();
            print_entries(out, &[e]);
        }
        EntryCommand::Show {
            id: None,
            spiffe_id,
            parent_id,
            selectors,
        } => {
            let r = c
                .list_entries(ListEntriesRequest {
                    spiffe_id: spiffe_id.unwrap_or_default(),
                    parent_id: parent_id.unwrap_or_default(),
                    selectors: selectors
                        .iter()
                        .map(|s| selector(s))
                        .collect::<Result<_, _>>()?,
                })
                .await?
                .into_inner();
            print_entries(out, &r.entries);
        }
        EntryCommand::Update { id, fields } => {
            let e = c
                .update_entry(UpdateEntryRequest {
                    entry: Some(entry_from(id, fields)?),
                })
                .await?
                .into_inner();
            print_entry(out, &e);
        }
        EntryCommand::Delete { id } => {
            c.delete_entry(DeleteEntryRequest { id: id.clone() })
                .await?;
            match out {
                Output::Json => println!("{}", json!({"deleted": id})),
                Output::Text => println!("Deleted entry {id}"),
            }
        }
    }
    Ok(())
}

fn engine_json(e: &continuity_proto::admin::Engine) -> Value {
    json!({"name": e.name, "spiffe_id": e.spiffe_id, "tier": e.tier, "custody": e.custody, "exposure_override": e.exposure_override, "created_at": e.created_at})
}

fn key_json(k: &continuity_proto::admin::EngineKey) -> Value {
    json!({
        "engine": k.engine, "name": k.name, "purpose": k.purpose, "algorithm": k.algorithm, "custody": k.custody,
        "primary_version": k.primary_version, "rotation_period": k.rotation_period, "destroy_grace": k.destroy_grace,
        "versions": k.versions.iter().map(|v| json!({"version": v.version, "state": v.state, "kid": v.kid, "created_at": v.created_at, "destroy_at": v.destroy_at, "encryptions": v.encryptions})).collect::<Vec<_>>(),
    })
}

fn print_key(out: Output, k: &continuity_proto::admin::EngineKey) {
    match out {
        Output::Json => println!("{}", key_json(k)),
        Output::Text => {
            println!(
                "Key {}/{} ({} {}, {} custody), primary version {}",
                k.engine, k.name, k.purpose, k.algorithm, k.custody, k.primary_version
            );
            for v in &k.versions {
                let when = if v.destroy_at > 0 {
                    format!(" (destroyed at {})", v.destroy_at)
                } else {
                    String::new()
                };
                let count = if k.purpose == "encrypt" {
                    format!(" encryptions {}", v.encryptions)
                } else {
                    String::new()
                };
                println!(
                    "  v{:<4} {:<18} kid {}{count}{when}",
                    v.version, v.state, v.kid
                );
            }
        }
    }
}

async fn engine(ch: Channel, out: Output, cmd: EngineCommand) -> Result<(), CliError> {
    use continuity_proto::admin::engine_admin_client::EngineAdminClient;
    let mut c = EngineAdminClient::new(ch);
    let print_engine = |e: &continuity_proto::admin::Engine| match out {
        Output::Json => println!("{}", engine_json(e)),
        Output::Text => println!(
            "Engine           : {}\nSPIFFE ID        : {}\nTier             : {}\nCustody          : {}{}",
            e.name,
            e.spiffe_id,
            e.tier,
            e.custody,
            if e.exposure_override {
                " (exposure override)"
            } else {
                ""
            }
        ),
    };
    match cmd {
        EngineCommand::Create {
            name,
            tier,
            custody,
            spiffe_id,
            allow_exposure,
        } => {
            let e = c
                .create_engine(CreateEngineRequest {
                    name,
                    tier,
                    custody: custody.unwrap_or_default(),
                    spiffe_id: spiffe_id.unwrap_or_default(),
                    allow_exposure,
                })
                .await?
                .into_inner();
            print_engine(&e);
        }
        EngineCommand::Show { name } => {
            print_engine(&c.get_engine(GetEngineRequest { name }).await?.into_inner())
        }
        EngineCommand::List => {
            let list = c
                .list_engines(ListEnginesRequest {})
                .await?
                .into_inner()
                .engines;
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"engines": list.iter().map(engine_json).collect::<Vec<_>>()})
                ),
                Output::Text => {
                    for e in &list {
                        println!(
                            "{:<20} tier {}  {:<8} {}",
                            e.name, e.tier, e.custody, e.spiffe_id
                        );
                    }
                }
            }
        }
        EngineCommand::Incarnations { name } => {
            let list = c
                .list_incarnations(ListIncarnationsRequest { engine: name })
                .await?
                .into_inner()
                .incarnations;
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"incarnations": list.iter().map(|i| json!({
                        "engine": i.engine, "entry_id": i.entry_id, "agent_id": i.agent_id, "workload_id": i.workload_id,
                        "pid": i.pid, "uid": i.uid,
                        "selectors": i.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
                        "first_seen": i.first_seen, "last_seen": i.last_seen,
                    })).collect::<Vec<_>>()})
                ),
                Output::Text => {
                    println!(
                        "Found {} incarnation{}",
                        list.len(),
                        if list.len() == 1 { "" } else { "s" }
                    );
                    for i in &list {
                        println!(
                            "{}  agent {}  pid {} uid {}  first {} last {}",
                            i.workload_id, i.agent_id, i.pid, i.uid, i.first_seen, i.last_seen
                        );
                    }
                }
            }
        }
        EngineCommand::Key(k) => {
            let key = match k {
                KeyCommand::Create {
                    engine,
                    key,
                    purpose,
                    algorithm,
                    rotation_period,
                    destroy_grace,
                } => c
                    .create_key(CreateKeyRequest {
                        engine,
                        name: key,
                        purpose,
                        algorithm: algorithm.unwrap_or_default(),
                        rotation_period: seconds("--rotation-period", &rotation_period)?,
                        destroy_grace: seconds("--destroy-grace", &destroy_grace)?,
                    })
                    .await?
                    .into_inner(),
                KeyCommand::List { engine } => {
                    let keys = c
                        .list_keys(ListKeysRequest { engine })
                        .await?
                        .into_inner()
                        .keys;
                    match out {
                        Output::Json => println!(
                            "{}",
                            json!({"keys": keys.iter().map(key_json).collect::<Vec<_>>()})
                        ),
                        Output::Text => keys.iter().for_each(|k| print_key(out, k)),
                    }
                    return Ok(());
                }
                KeyCommand::Rotate { engine, key } => c
                    .rotate_key(RotateKeyRequest { engine, name: key })
                    .await?
                    .into_inner(),
                KeyCommand::Enable(v) => set_state(&mut c, "enable", v).await?,
                KeyCommand::Disable(v) => set_state(&mut c, "disable", v).await?,
                KeyCommand::Destroy(v) => set_state(&mut c, "destroy", v).await?,
                KeyCommand::Restore(v) => set_state(&mut c, "restore", v).await?,
            };
            print_key(out, &key);
        }
        EngineCommand::Secret(SecretCommand::Put {
            engine,
            name,
            value_file,
        }) => {
            let value = if value_file.as_os_str() == "-" {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)
                    .map_err(|e| CliError::Argument(e.to_string()))?;
                v
            } else {
                std::fs::read(&value_file).map_err(|e| {
                    CliError::Argument(format!("--value-file {}: {e}", value_file.display()))
                })?
            };
            let r = c
                .put_secret(PutSecretRequest {
                    engine: engine.clone(),
                    name: name.clone(),
                    value,
                })
                .await?
                .into_inner();
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"engine": engine, "name": name, "version": r.version})
                ),
                Output::Text => println!("Stored {engine}/{name} version {}", r.version),
            }
        }
    }
    Ok(())
}

async fn set_state(
    c: &mut continuity_proto::admin::engine_admin_client::EngineAdminClient<Channel>,
    action: &str,
    v: VersionArgs,
) -> Result<continuity_proto::admin::EngineKey, CliError> {
    Ok(c.set_key_version_state(SetKeyVersionStateRequest {
        engine: v.engine,
        name: v.key,
        version: v.version,
        action: action.into(),
    })
    .await?
    .into_inner())
}

async fn audit(ch: Channel, out: Output, cmd: AuditCommand) -> Result<(), CliError> {
    use continuity_proto::admin::audit_admin_client::AuditAdminClient;
    let mut c = AuditAdminClient::new(ch);
    match cmd {
        AuditCommand::Show { limit } => {
            let records = c
                .show_audit(ShowAuditRequest { limit })
                .await?
                .into_inner()
                .records;
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"records": records.iter().map(|r| json!({
                        "seq": r.seq, "time": r.time, "actor": r.actor, "action": r.action, "target": r.target,
                        "key_version": r.key_version, "result": r.result, "hash": r.hash,
                    })).collect::<Vec<_>>()})
                ),
                Output::Text => {
                    for r in &records {
                        let v = if r.key_version > 0 {
                            format!(" v{}", r.key_version)
                        } else {
                            String::new()
                        };
                        println!(
                            "{:>6} {} {:<16} {}{v}  by {}  → {}",
                            r.seq, r.time, r.action, r.target, r.actor, r.result
                        );
                    }
                }
            }
        }
        AuditCommand::Verify => {
            let r = c.verify_audit(VerifyAuditRequest {}).await?.into_inner();
            if r.ok {
                match out {
                    Output::Json => println!("{}", json!({"ok": true, "records": r.records})),
                    Output::Text => println!(
                        "Audit log intact: {} records, hash chain verified.",
                        r.records
                    ),
                }
            } else {
                if out == Output::Json {
                    println!(
                        "{}",
                        json!({"ok": false, "records": r.records, "bad_seq": r.bad_seq, "reason": r.reason})
                    );
                }
                return Err(CliError::Argument(format!(
                    "audit log tampered: {}",
                    r.reason
                )));
            }
        }
    }
    Ok(())
}
