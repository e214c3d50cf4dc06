//! `engine key import-job` and `engine key import`: key import as Cloud KMS import jobs do it.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use continuity_proto::admin::engine_admin_client::EngineAdminClient;
use continuity_proto::admin::{
    CreateImportJobRequest, EngineKey, GetImportJobRequest, ImportJob, ImportKeyVersionRequest,
    ListImportJobsRequest,
};
use serde::Serialize;
use tonic::transport::Channel;

use super::error::CliError;
use super::output::{Output, View, show};

/// Largest file read for `--wrapped` or `--public-key` (a wrapped RSA-4096 key is under 3 KiB).
const MAX_FILE: u64 = 64 * 1024;

/// `engine key import-job` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImportJobCommand {
    /// Make an import job: prints its id and the RSA-3072 wrapping public key (PEM) to wrap
    /// key material for (valid three days).
    Create {
        /// Engine whose keys it imports into.
        engine: String,
        /// RSA_OAEP_3072_SHA256_AES_256 | RSA_OAEP_3072_SHA1_AES_256 (default: SHA-1 for
        /// hsm custody, whose token does OAEP with SHA-1 only; SHA-256 otherwise).
        #[arg(long)]
        method: Option<String>,
    },
    /// Show one import job.
    Show {
        /// Job id.
        id: String,
    },
    /// List import jobs.
    List {
        /// Only this Engine's.
        engine: Option<String>,
    },
}

/// `engine key import`: a wrapped blob becomes the key's new primary version.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Engine.
    pub engine: String,
    /// Key.
    pub key: String,
    /// The import job the material was wrapped for.
    #[arg(long)]
    pub job: String,
    /// File holding RSA-OAEP(ephemeral AES-256 key) || AES-KWP(ephemeral, material).
    #[arg(long)]
    pub wrapped: PathBuf,
    /// The imported private key's public key (PEM or DER SubjectPublicKeyInfo); needed for a
    /// sign key of hsm custody when the token cannot read it from the key.
    #[arg(long)]
    pub public_key: Option<PathBuf>,
}

type Client = EngineAdminClient<Channel>;

/// Runs an `engine key import-job` command.
pub async fn run_job(c: &mut Client, out: Output, cmd: ImportJobCommand) -> Result<(), CliError> {
    let job = match cmd {
        ImportJobCommand::Create { engine, method } => {
            let request = CreateImportJobRequest {
                engine,
                method: method.unwrap_or_default(),
            };
            c.create_import_job(request).await?.into_inner()
        }
        ImportJobCommand::Show { id } => c
            .get_import_job(GetImportJobRequest { id })
            .await?
            .into_inner(),
        ImportJobCommand::List { engine } => {
            let request = ListImportJobsRequest {
                engine: engine.unwrap_or_default(),
            };
            let jobs = c.list_import_jobs(request).await?.into_inner().jobs;
            let jobs = jobs.iter().map(JobView::from).collect();
            return show(out, &JobList { jobs });
        }
    };
    show(out, &JobView::from(&job))
}

/// Runs `engine key import`; returns the key as it is now.
pub async fn run_import(c: &mut Client, a: ImportArgs) -> Result<EngineKey, CliError> {
    let wrapped = read_small("--wrapped", &a.wrapped)?;
    let public_key = match &a.public_key {
        Some(p) => public_key_der(&read_small("--public-key", p)?, p)?,
        None => vec![],
    };
    let request = ImportKeyVersionRequest {
        engine: a.engine,
        name: a.key,
        import_job: a.job,
        wrapped_key: wrapped,
        public_key,
    };
    Ok(c.import_key_version(request).await?.into_inner())
}

/// The bytes of a small file named by `flag`.
fn read_small(flag: &str, path: &Path) -> Result<Vec<u8>, CliError> {
    let arg = |e: String| CliError::Argument(format!("{flag} {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| arg(e.to_string()))?;
    let mut bytes = vec![];
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| arg(e.to_string()))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(arg(format!("larger than {MAX_FILE} bytes")));
    }
    Ok(bytes)
}

/// A public key file as DER: PEM `PUBLIC KEY` is decoded, anything else is taken as DER.
fn public_key_der(bytes: &[u8], path: &Path) -> Result<Vec<u8>, CliError> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Ok(bytes.to_vec());
    };
    if !text.contains("-----BEGIN") {
        return Ok(bytes.to_vec());
    }
    let blocks = continuity_common::x509::pem_decode_all("PUBLIC KEY", text)
        .map_err(|e| CliError::Argument(format!("--public-key {}: {e}", path.display())))?;
    match <[Vec<u8>; 1]>::try_from(blocks) {
        Ok([der]) => Ok(der),
        Err(b) => Err(CliError::Argument(format!(
            "--public-key {}: {} PUBLIC KEY blocks; one is needed",
            path.display(),
            b.len()
        ))),
    }
}

/// An import job as printed.
#[derive(Debug, Serialize)]
struct JobView<'a> {
    id: &'a str,
    engine: &'a str,
    method: &'a str,
    custody: &'a str,
    state: &'a str,
    created_at: i64,
    expires_at: i64,
    public_key_pem: &'a str,
}

impl<'a> From<&'a ImportJob> for JobView<'a> {
    fn from(j: &'a ImportJob) -> Self {
        Self {
            id: &j.id,
            engine: &j.engine,
            method: &j.method,
            custody: &j.custody,
            state: &j.state,
            created_at: j.created_at,
            expires_at: j.expires_at,
            public_key_pem: &j.public_key_pem,
        }
    }
}

impl View for JobView<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        writeln!(
            w,
            "Import job {} for engine {} ({}, {} custody), {}, expires at {}",
            self.id, self.engine, self.method, self.custody, self.state, self.expires_at
        )?;
        write!(w, "{}", self.public_key_pem)
    }
}

/// What `engine key import-job list` prints.
#[derive(Debug, Serialize)]
struct JobList<'a> {
    jobs: Vec<JobView<'a>>,
}

impl View for JobList<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        for j in &self.jobs {
            writeln!(
                w,
                "{} engine {} {} {} custody {} expires at {}",
                j.id, j.engine, j.method, j.custody, j.state, j.expires_at
            )?;
        }
        Ok(())
    }
}
