//! `engine data-key` and `engine rewrap`: envelope encryption through the EngineAPI, with
//! CRC32C checksums sent for what goes out and checked on what comes back (as Cloud KMS
//! client libraries do).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::Args;
use continuity_common::checksum::crc32c;
use continuity_proto::engine::engine_api_client::EngineApiClient;
use continuity_proto::engine::{GenerateDataKeyRequest, RewrapRequest};
use serde::Serialize;
use tonic::transport::Channel;

use super::connect::req;
use super::error::CliError;
use super::files;
use super::output::{Output, View, show};

/// `engine data-key` arguments.
#[derive(Debug, Args)]
pub struct DataKeyArgs {
    /// Encrypt key wrapping the data key (its primary version).
    #[arg(long)]
    pub key: String,
    /// Ask only for the wrapped data key (the plaintext never reaches this machine).
    #[arg(long)]
    pub wrapped_only: bool,
    /// Write the data key (32 bytes) here, mode 0600, instead of printing it.
    #[arg(long, conflicts_with = "wrapped_only")]
    pub out_plaintext: Option<PathBuf>,
    /// Write the wrapped data key here instead of printing it.
    #[arg(long)]
    pub out_wrapped: Option<PathBuf>,
}

/// Refuses a response payload whose checksum does not match.
pub(super) fn check(field: &str, data: &[u8], crc: u32) -> Result<(), CliError> {
    if crc32c(data) == crc {
        Ok(())
    } else {
        Err(CliError::Io(format!(
            "the response's {field}_crc32c does not match its {field}: corrupted in transit"
        )))
    }
}

/// Runs `engine data-key`.
pub async fn data_key(
    c: &mut EngineApiClient<Channel>,
    out: Output,
    a: DataKeyArgs,
    engine: String,
) -> Result<(), CliError> {
    let request = req(GenerateDataKeyRequest {
        key: a.key.clone(),
        key_spec: "AES_256".into(),
        wrapped_only: a.wrapped_only,
        aad: vec![],
        aad_crc32c: None,
        engine,
    });
    let r = c.generate_data_key(request).await?.into_inner();
    check("ciphertext", &r.ciphertext, r.ciphertext_crc32c)?;
    if !a.wrapped_only {
        check("plaintext", &r.plaintext, r.plaintext_crc32c)?;
    }
    let wrapped = match &a.out_wrapped {
        Some(p) => files::write(p, &r.ciphertext).map(|()| None)?,
        None => Some(STANDARD.encode(&r.ciphertext)),
    };
    let plaintext = match (&a.out_plaintext, a.wrapped_only) {
        (_, true) => None,
        (Some(p), false) => files::write_mode(p, &r.plaintext, 0o600).map(|()| None)?,
        (None, false) => Some(STANDARD.encode(&r.plaintext)),
    };
    show(
        out,
        &DataKeyView {
            key: r.key,
            version: r.version,
            key_spec: r.key_spec,
            wrapped,
            plaintext,
        },
    )
}

/// Runs `engine rewrap`: the file's ciphertext moved to the key's primary version.
pub async fn rewrap(
    c: &mut EngineApiClient<Channel>,
    out: Output,
    (key, input, output): (String, &Path, &Path),
    engine: String,
) -> Result<(), CliError> {
    let ciphertext = files::read(input)?;
    let request = req(RewrapRequest {
        key,
        ciphertext_crc32c: Some(crc32c(&ciphertext)),
        ciphertext,
        aad: vec![],
        aad_crc32c: None,
        engine,
    });
    let r = c.rewrap(request).await?.into_inner();
    if !r.verified_ciphertext_crc32c {
        return Err(CliError::Io(
            "the server did not verify the ciphertext's checksum".into(),
        ));
    }
    check("ciphertext", &r.ciphertext, r.ciphertext_crc32c)?;
    files::write(output, &r.ciphertext)?;
    show(
        out,
        &RewrapView {
            key: r.key,
            from_version: r.source_version,
            version: r.version,
            out: output.display().to_string(),
        },
    )
}

/// What `engine data-key` prints: base64 of what was not written to a file.
#[derive(Debug, Serialize)]
struct DataKeyView {
    key: String,
    version: u32,
    key_spec: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    wrapped: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext: Option<String>,
}

impl View for DataKeyView {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        let Self {
            key,
            version,
            key_spec,
            ..
        } = self;
        writeln!(w, "{key_spec} data key wrapped by {key} v{version}")?;
        if let Some(b) = &self.wrapped {
            writeln!(w, "wrapped: {b}")?;
        }
        if let Some(b) = &self.plaintext {
            writeln!(w, "plaintext: {b}")?;
        }
        Ok(())
    }
}

/// What `engine rewrap` prints.
#[derive(Debug, Serialize)]
struct RewrapView {
    key: String,
    from_version: u32,
    version: u32,
    out: String,
}

impl View for RewrapView {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        let Self {
            key,
            from_version,
            version,
            out,
        } = self;
        writeln!(
            w,
            "Rewrapped from {key} v{from_version} to v{version} into {out}"
        )
    }
}
