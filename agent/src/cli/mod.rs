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
    /// Use the caller's Engine keys through the EngineAPI.
    #[command(subcommand)]
    Engine(EngineCommand),
}

/// Options shared by every `engine` command.
#[derive(Debug, clap::Args)]
pub struct EngineTarget {
    /// Workload API socket.
    #[arg(long)]
    pub socket_path: Option<String>,
    /// The Engine, when the caller is bound to several.
    #[arg(long)]
    pub engine: Option<String>,
}

/// `engine` subcommands.
#[derive(Debug, Subcommand)]
pub enum EngineCommand {
    /// Sign a message (SHA-256 inside) or a SHA-256 digest.
    Sign {
        /// Key name.
        #[arg(long)]
        key: String,
        /// File holding the message.
        #[arg(long, conflicts_with = "digest", required_unless_present = "digest")]
        message_file: Option<PathBuf>,
        /// SHA-256 digest, hex.
        #[arg(long)]
        digest: Option<String>,
        /// Key version (default: primary).
        #[arg(long)]
        version: Option<u32>,
        /// Also write the raw signature (DER / PKCS#1) here, for `openssl dgst -verify`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Target.
        #[command(flatten)]
        target: EngineTarget,
    },
    /// Verify a signature against the cached Engine JWKS (works while the server is down).
    Verify {
        /// Key name.
        #[arg(long)]
        key: String,
        /// File holding the message.
        #[arg(long)]
        message_file: PathBuf,
        /// File holding the raw signature (or its base64).
        #[arg(long)]
        signature_file: PathBuf,
        /// Only this version (default: any enabled one).
        #[arg(long)]
        version: Option<u32>,
        /// Target.
        #[command(flatten)]
        target: EngineTarget,
    },
    /// Encrypt a file (AES-256-GCM; the ciphertext names its key version).
    Encrypt {
        /// Key name.
        #[arg(long)]
        key: String,
        /// Input file.
        #[arg(long = "in")]
        input: PathBuf,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Target.
        #[command(flatten)]
        target: EngineTarget,
    },
    /// Decrypt a file made by `engine encrypt`.
    Decrypt {
        /// Key name.
        #[arg(long)]
        key: String,
        /// Input file.
        #[arg(long = "in")]
        input: PathBuf,
        /// Output file (0600).
        #[arg(long)]
        out: PathBuf,
        /// Target.
        #[command(flatten)]
        target: EngineTarget,
    },
    /// Print a sign key's public key (PEM).
    PublicKey {
        /// Key name.
        #[arg(long)]
        key: String,
        /// Version (default: primary).
        #[arg(long)]
        version: Option<u32>,
        /// Target.
        #[command(flatten)]
        target: EngineTarget,
    },
    /// Print the caller's Engine JWKS.
    Jwks {
        /// Target.
        #[command(flatten)]
        target: EngineTarget,
    },
    /// Print a KV-custody secret (or key material).
    Secret {
        /// Secret name.
        name: String,
        /// Write it to this file (0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Target.
        #[command(flatten)]
        target: EngineTarget,
    },
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
        Command::Engine(cmd) => engine_command(out, cmd).await?,
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

fn read_file(p: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(p).map_err(|e| CliError::Io(format!("{}: {e}", p.display())))
}

fn write_private(p: &Path, data: &[u8]) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .map_err(|e| CliError::Io(format!("{}: {e}", p.display())))?;
    f.write_all(data)
        .map_err(|e| CliError::Io(format!("{}: {e}", p.display())))
}

async fn engine_client(
    target: &EngineTarget,
) -> Result<continuity_proto::engine::engine_api_client::EngineApiClient<Channel>, CliError> {
    let path = socket_path(target.socket_path.clone());
    let ch = continuity_common::grpc::uds_channel(Path::new(&path))
        .await
        .map_err(|source| CliError::Connect { path, source })?;
    Ok(continuity_proto::engine::engine_api_client::EngineApiClient::new(ch))
}

async fn engine_command(out: Output, cmd: EngineCommand) -> Result<(), CliError> {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use continuity_proto::engine::*;
    match cmd {
        EngineCommand::Sign {
            key,
            message_file,
            digest,
            version,
            out: raw_out,
            target,
        } => {
            let mut c = engine_client(&target).await?;
            let message = match &message_file {
                Some(p) => read_file(p)?,
                None => vec![],
            };
            let digest = match digest {
                Some(h) => hex::decode(h.trim())
                    .map_err(|e| CliError::Io(format!("--digest: not hex: {e}")))?,
                None => vec![],
            };
            let r = c
                .sign(req(SignRequest {
                    key,
                    message,
                    digest,
                    version: version.unwrap_or(0),
                    engine: target.engine.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner();
            if let Some(p) = raw_out {
                std::fs::write(&p, &r.signature)
                    .map_err(|e| CliError::Io(format!("{}: {e}", p.display())))?;
            }
            let sig = STANDARD.encode(&r.signature);
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"key": r.key, "version": r.version, "signature": sig, "kid": r.kid, "algorithm": r.algorithm})
                ),
                Output::Text => println!(
                    "Signed with {} v{} (kid {}, {})\n{sig}",
                    r.key, r.version, r.kid, r.algorithm
                ),
            }
        }
        EngineCommand::Verify {
            key,
            message_file,
            signature_file,
            version,
            target,
        } => {
            let mut c = engine_client(&target).await?;
            let raw = read_file(&signature_file)?;
            let signature = match STANDARD.decode(String::from_utf8_lossy(&raw).trim()) {
                Ok(decoded) if !raw.starts_with(&[0x30]) => decoded,
                _ => raw,
            };
            let r = c
                .verify(req(VerifyRequest {
                    key,
                    message: read_file(&message_file)?,
                    signature,
                    version: version.unwrap_or(0),
                    engine: target.engine.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner();
            match out {
                Output::Json => println!("{}", json!({"valid": r.valid, "version": r.version})),
                Output::Text if r.valid => println!("Signature valid (version {}).", r.version),
                Output::Text => {}
            }
            if !r.valid {
                return Err(CliError::Io("signature does not verify".into()));
            }
        }
        EngineCommand::Encrypt {
            key,
            input,
            out: path,
            target,
        } => {
            let mut c = engine_client(&target).await?;
            let r = c
                .encrypt(req(EncryptRequest {
                    key,
                    plaintext: read_file(&input)?,
                    aad: vec![],
                    engine: target.engine.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner();
            std::fs::write(&path, &r.ciphertext)
                .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))?;
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"version": r.version, "out": path.display().to_string()})
                ),
                Output::Text => println!(
                    "Encrypted with key version {} into {}",
                    r.version,
                    path.display()
                ),
            }
        }
        EngineCommand::Decrypt {
            key,
            input,
            out: path,
            target,
        } => {
            let mut c = engine_client(&target).await?;
            let r = c
                .decrypt(req(DecryptRequest {
                    key,
                    ciphertext: read_file(&input)?,
                    aad: vec![],
                    engine: target.engine.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner();
            write_private(&path, &r.plaintext)?;
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"version": r.version, "out": path.display().to_string()})
                ),
                Output::Text => println!(
                    "Decrypted with key version {} into {}",
                    r.version,
                    path.display()
                ),
            }
        }
        EngineCommand::PublicKey {
            key,
            version,
            target,
        } => {
            let mut c = engine_client(&target).await?;
            let r = c
                .get_public_key(req(GetPublicKeyRequest {
                    key,
                    version: version.unwrap_or(0),
                    engine: target.engine.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner();
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"pem": r.pem, "version": r.version, "kid": r.kid, "algorithm": r.algorithm})
                ),
                Output::Text => print!("{}", r.pem),
            }
        }
        EngineCommand::Jwks { target } => {
            let mut c = engine_client(&target).await?;
            let mut s = c
                .watch_engine_jwks(req(WatchEngineJwksRequest {
                    engine: target.engine.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner();
            let m = s
                .message()
                .await?
                .ok_or_else(|| tonic::Status::unavailable("stream ended"))?;
            let jwks: serde_json::Value =
                serde_json::from_slice(&m.jwks).unwrap_or(serde_json::Value::Null);
            match out {
                Output::Json => println!("{}", json!({"engine": m.engine, "jwks": jwks})),
                Output::Text => println!(
                    "{}",
                    serde_json::to_string_pretty(&jwks).unwrap_or_default()
                ),
            }
        }
        EngineCommand::Secret {
            name,
            out: path,
            target,
        } => {
            let mut c = engine_client(&target).await?;
            let r = c
                .fetch_secret(req(FetchSecretRequest {
                    name: name.clone(),
                    engine: target.engine.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner();
            match (&path, out) {
                (Some(p), _) => write_private(p, &r.value)?,
                (None, Output::Json) => println!(
                    "{}",
                    json!({"name": name, "version": r.version, "value": STANDARD.encode(&r.value)})
                ),
                (None, Output::Text) => {
                    use std::io::Write;
                    let _ = std::io::stdout().write_all(&r.value);
                }
            }
        }
    }
    Ok(())
}
