//! The `continuity-agent` command line: `run`, `healthcheck`, and `api` commands that talk to
//! the Workload API like any SPIFFE client would.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use continuity_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use continuity_proto::workload::*;
use serde_json::json;
use tonic::transport::Channel;

use crate::config::DEFAULT_SOCKET_PATH;
use crate::endpoints::workload::SECURITY_HEADER;

/// The Continuity node agent.
#[derive(Debug, Parser)]
#[command(name = "continuity-agent", version, about)]
pub struct Cli {
    /// Output format.
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
    /// Run the agent.
    Run {
        /// Path to agent.toml.
        #[arg(long)]
        config: PathBuf,
        /// Join token for the first attestation (overrides join_token in the config).
        #[arg(long)]
        join_token: Option<String>,
    },
    /// Check that the agent answers on its Workload API socket.
    Healthcheck {
        /// Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET, then the default path).
        #[arg(long)]
        socket_path: Option<String>,
    },
    /// Talk to the Workload API.
    #[command(subcommand)]
    Api(ApiCommand),
}

/// `api` subcommands.
#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Fetch SVIDs.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Validate something.
    #[command(subcommand)]
    Validate(ValidateCommand),
    /// Print X509-SVID updates as they arrive.
    Watch {
        /// Workload API socket.
        #[arg(long)]
        socket_path: Option<String>,
    },
}

/// `api fetch` subcommands.
#[derive(Debug, Subcommand)]
pub enum FetchCommand {
    /// X509-SVIDs and bundle.
    X509 {
        /// Workload API socket.
        #[arg(long)]
        socket_path: Option<String>,
        /// Write svid.N.pem, svid.N.key and bundle.N.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// JWT-SVIDs.
    Jwt {
        /// Workload API socket.
        #[arg(long)]
        socket_path: Option<String>,
        /// Audience (repeatable).
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
}

/// `api validate` subcommands.
#[derive(Debug, Subcommand)]
pub enum ValidateCommand {
    /// Validate a JWT-SVID.
    Jwt {
        /// Workload API socket.
        #[arg(long)]
        socket_path: Option<String>,
        /// Expected audience.
        #[arg(long)]
        audience: String,
        /// The token.
        #[arg(long)]
        svid: String,
    },
}

/// CLI failures.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The socket could not be reached.
    #[error("cannot reach the Workload API at {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The agent refused.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(Box<tonic::Status>),
    /// Writing files failed.
    #[error("{0}")]
    Io(String),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        Self::Status(Box::new(s))
    }
}

/// The socket to use: the flag, else `SPIFFE_ENDPOINT_SOCKET` (`unix:` URI or path), else the default.
pub fn socket_path(flag: Option<String>) -> String {
    let raw = flag
        .or_else(|| {
            std::env::var("SPIFFE_ENDPOINT_SOCKET")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_SOCKET_PATH.to_string());
    raw.strip_prefix("unix://")
        .or_else(|| raw.strip_prefix("unix:"))
        .unwrap_or(&raw)
        .to_string()
}

async fn client(flag: Option<String>) -> Result<SpiffeWorkloadApiClient<Channel>, CliError> {
    let path = socket_path(flag);
    let ch = continuity_common::grpc::uds_channel(Path::new(&path))
        .await
        .map_err(|source| CliError::Connect { path, source })?;
    Ok(SpiffeWorkloadApiClient::new(ch))
}

fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

fn split_der(concat: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = concat;
    while let Ok((_, _, tail)) = continuity_common::der::read_tlv(rest) {
        let len = rest.len() - tail.len();
        out.push(rest[..len].to_vec());
        rest = tail;
        if rest.is_empty() {
            break;
        }
    }
    out
}

fn pem_chain(concat: &[u8]) -> String {
    split_der(concat)
        .iter()
        .map(|c| continuity_common::x509::pem_encode("CERTIFICATE", c))
        .collect()
}

fn print_x509(out: Output, resp: &X509svidResponse) {
    match out {
        Output::Json => {
            let svids: Vec<_> = resp
                .svids
                .iter()
                .map(|s| {
                    let leaf = split_der(&s.x509_svid)
                        .into_iter()
                        .next()
                        .unwrap_or_default();
                    json!({
                        "spiffe_id": s.spiffe_id,
                        "hint": s.hint,
                        "expires_at": continuity_common::x509::not_after(&leaf).unwrap_or_default(),
                        "x509_svid": pem_chain(&s.x509_svid),
                        "bundle": pem_chain(&s.bundle),
                    })
                })
                .collect();
            println!("{}", json!({ "svids": svids }));
        }
        Output::Text => {
            println!(
                "Received {} svid{}",
                resp.svids.len(),
                if resp.svids.len() == 1 { "" } else { "s" }
            );
            for s in &resp.svids {
                let leaf = split_der(&s.x509_svid)
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                println!("\nSPIFFE ID:       {}", s.spiffe_id);
                if !s.hint.is_empty() {
                    println!("Hint:            {}", s.hint);
                }
                println!(
                    "Expires at:      {}",
                    continuity_common::x509::not_after(&leaf).unwrap_or_default()
                );
                println!("CA certificates: {}", split_der(&s.bundle).len());
            }
        }
    }
}

fn write_x509(dir: &Path, resp: &X509svidResponse) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(|e| CliError::Io(format!("{}: {e}", dir.display())))?;
    for (i, s) in resp.svids.iter().enumerate() {
        let w = |name: String, body: &str, mode: u32| -> Result<(), CliError> {
            let p = dir.join(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&p)
                .map_err(|e| CliError::Io(format!("{}: {e}", p.display())))?;
            f.write_all(body.as_bytes())
                .map_err(|e| CliError::Io(format!("{}: {e}", p.display())))
        };
        w(format!("svid.{i}.pem"), &pem_chain(&s.x509_svid), 0o644)?;
        w(
            format!("svid.{i}.key"),
            &continuity_common::x509::pem_encode("PRIVATE KEY", &s.x509_svid_key),
            0o600,
        )?;
        w(format!("bundle.{i}.pem"), &pem_chain(&s.bundle), 0o644)?;
    }
    Ok(())
}

/// Runs a client command (everything but `run`).
pub async fn client_command(cli: Cli) -> Result<(), CliError> {
    let out = cli.output;
    match cli.command {
        Command::Run { .. } => {}
        Command::Healthcheck { socket_path: sp } => {
            let path = socket_path(sp);
            let ch = continuity_common::grpc::uds_channel(Path::new(&path))
                .await
                .map_err(|source| CliError::Connect {
                    path: path.clone(),
                    source,
                })?;
            let r = tonic_health::pb::health_client::HealthClient::new(ch)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner();
            if r.status != tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                return Err(tonic::Status::unavailable("agent is not serving").into());
            }
            println!("Agent is healthy.");
        }
        Command::Api(ApiCommand::Fetch(FetchCommand::X509 { socket_path, write })) => {
            let mut c = client(socket_path).await?;
            let mut stream = c
                .fetch_x509svid(req(X509svidRequest {}))
                .await?
                .into_inner();
            let resp = stream
                .message()
                .await?
                .ok_or_else(|| tonic::Status::unavailable("stream ended"))?;
            if let Some(dir) = write {
                write_x509(&dir, &resp)?;
            }
            print_x509(out, &resp);
        }
        Command::Api(ApiCommand::Fetch(FetchCommand::Jwt {
            socket_path,
            audience,
            spiffe_id,
        })) => {
            let mut c = client(socket_path).await?;
            let r = c
                .fetch_jwtsvid(req(JwtsvidRequest {
                    audience,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                }))
                .await?
                .into_inner();
            match out {
                Output::Json => println!(
                    "{}",
                    json!({ "svids": r.svids.iter().map(|s| json!({"spiffe_id": s.spiffe_id, "svid": s.svid, "hint": s.hint})).collect::<Vec<_>>() })
                ),
                Output::Text => {
                    for s in &r.svids {
                        println!("token({}):\n\t{}", s.spiffe_id, s.svid);
                    }
                }
            }
        }
        Command::Api(ApiCommand::Validate(ValidateCommand::Jwt {
            socket_path,
            audience,
            svid,
        })) => {
            let mut c = client(socket_path).await?;
            let r = c
                .validate_jwtsvid(req(ValidateJwtsvidRequest { audience, svid }))
                .await?
                .into_inner();
            let claims = r.claims.map(struct_json).unwrap_or_default();
            match out {
                Output::Json => println!("{}", json!({"spiffe_id": r.spiffe_id, "claims": claims})),
                Output::Text => println!(
                    "SVID is valid.\nSPIFFE ID : {}\nClaims    : {}",
                    r.spiffe_id, claims
                ),
            }
        }
        Command::Api(ApiCommand::Watch { socket_path }) => {
            let mut c = client(socket_path).await?;
            let mut stream = c
                .fetch_x509svid(req(X509svidRequest {}))
                .await?
                .into_inner();
            while let Some(resp) = stream.message().await? {
                print_x509(out, &resp);
            }
        }
    }
    Ok(())
}

fn struct_json(s: prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .into_iter()
            .map(|(k, v)| (k, value_json(v)))
            .collect(),
    )
}

fn value_json(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match v.kind {
        Some(Kind::BoolValue(b)) => b.into(),
        Some(Kind::NumberValue(n)) => {
            serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, |x| {
                if n.fract() == 0.0 && n.abs() < 9e15 {
                    (n as i64).into()
                } else {
                    serde_json::Value::Number(x)
                }
            })
        }
        Some(Kind::StringValue(s)) => s.into(),
        Some(Kind::ListValue(l)) => l.values.into_iter().map(value_json).collect(),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::NullValue(_)) | None => serde_json::Value::Null,
    }
}
