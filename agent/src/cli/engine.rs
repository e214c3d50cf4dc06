//! `engine`: the caller's Engine keys through the EngineAPI on the agent's socket.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::{Args, Subcommand};
use continuity_common::checksum::crc32c;
use continuity_proto::engine::engine_api_client::EngineApiClient;
use continuity_proto::engine::{
    DecryptRequest, EncryptRequest, FetchSecretRequest, GetPublicKeyRequest, SignRequest,
    VerifyRequest, WatchEngineJwksRequest,
};
use serde::Serialize;
use tonic::transport::Channel;

use super::connect::{channel, req};
use super::error::CliError;
use super::files;
use super::output::{Output, View, raw, show};

/// `engine` and the options every subcommand shares.
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// The Engine, when the caller is bound to several.
    #[arg(long, global = true)]
    pub engine: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: EngineCommand,
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
    },
    /// Encrypt a file (AES-256-GCM; the ciphertext names its key version).
    Encrypt(CryptArgs),
    /// Decrypt a file made by `engine encrypt`.
    Decrypt(CryptArgs),
    /// A fresh AES-256 data key wrapped under an encrypt key (envelope encryption).
    DataKey(super::envelope::DataKeyArgs),
    /// Re-encrypt a file made by `engine encrypt` (or a wrapped data key) under the key's
    /// primary version; the plaintext stays in the server.
    Rewrap(CryptArgs),
    /// Print a sign key's public key (PEM).
    PublicKey {
        /// Key name.
        #[arg(long)]
        key: String,
        /// Version (default: primary).
        #[arg(long)]
        version: Option<u32>,
    },
    /// Print the caller's Engine JWKS.
    Jwks,
    /// Walk a key's continuity proofs from a pinned public key to its newest version.
    VerifyChain(super::verify_chain::VerifyChainArgs),
    /// Print a KV-custody secret (or key material).
    Secret {
        /// Secret name.
        name: String,
        /// Write it to this file (0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// The files of `engine encrypt` and `engine decrypt`.
#[derive(Debug, Args)]
pub struct CryptArgs {
    /// Key name.
    #[arg(long)]
    pub key: String,
    /// Input file.
    #[arg(long = "in")]
    pub input: PathBuf,
    /// Output file (0600 for `decrypt`).
    #[arg(long)]
    pub out: PathBuf,
}

type Client = EngineApiClient<Channel>;

/// Runs an `engine` command against the socket `socket` (see [`super::socket_path`]).
pub async fn run(socket: Option<String>, out: Output, args: EngineArgs) -> Result<(), CliError> {
    let c = &mut EngineApiClient::new(channel(socket).await?);
    let engine = args.engine.unwrap_or_default();
    match args.command {
        EngineCommand::Sign {
            key,
            message_file,
            digest,
            version,
            out: raw_out,
        } => {
            let request = SignRequest {
                key,
                message: message_file.as_deref().map_or(Ok(vec![]), files::read)?,
                digest: digest.as_deref().map_or(Ok(vec![]), hex_digest)?,
                version: version.unwrap_or(0),
                engine,
                ..Default::default()
            };
            sign(c, out, request, raw_out.as_deref()).await
        }
        EngineCommand::Verify {
            key,
            message_file,
            signature_file,
            version,
        } => {
            let request = VerifyRequest {
                key,
                signature: signature(&files::read(&signature_file)?),
                message: files::read(&message_file)?,
                version: version.unwrap_or(0),
                engine,
            };
            verify(c, out, request).await
        }
        EngineCommand::Encrypt(a) => encrypt(c, out, a, engine).await,
        EngineCommand::Decrypt(a) => decrypt(c, out, a, engine).await,
        EngineCommand::DataKey(a) => super::envelope::data_key(c, out, a, engine).await,
        EngineCommand::Rewrap(a) => {
            let files = (a.key, a.input.as_path(), a.out.as_path());
            super::envelope::rewrap(c, out, files, engine).await
        }
        EngineCommand::PublicKey { key, version } => {
            public_key(c, out, key, version.unwrap_or(0), engine).await
        }
        EngineCommand::Jwks => jwks(c, out, engine).await,
        EngineCommand::VerifyChain(a) => verify_chain(c, out, &a, engine).await,
        EngineCommand::Secret { name, out: path } => secret(c, out, name, engine, path).await,
    }
}

async fn public_key(
    c: &mut Client,
    out: Output,
    key: String,
    version: u32,
    engine: String,
) -> Result<(), CliError> {
    let request = req(GetPublicKeyRequest {
        key,
        version,
        engine,
    });
    let r = c.get_public_key(request).await?.into_inner();
    let view = PublicKeyView {
        pem: r.pem,
        version: r.version,
        kid: r.kid,
        algorithm: r.algorithm,
    };
    show(out, &view)
}

async fn sign(
    c: &mut Client,
    out: Output,
    request: SignRequest,
    raw_out: Option<&Path>,
) -> Result<(), CliError> {
    let r = c.sign(req(request)).await?.into_inner();
    if let Some(p) = raw_out {
        files::write(p, &r.signature)?;
    }
    let view = Signed {
        key: r.key,
        version: r.version,
        signature: STANDARD.encode(&r.signature),
        kid: r.kid,
        algorithm: r.algorithm,
    };
    show(out, &view)
}

/// A `--digest` in hex.
fn hex_digest(h: &str) -> Result<Vec<u8>, CliError> {
    hex::decode(h.trim()).map_err(|e| CliError::Io(format!("--digest: not hex: {e}")))
}

/// The signature in a `--signature-file`: raw DER / PKCS#1, or its base64.
fn signature(raw: &[u8]) -> Vec<u8> {
    match STANDARD.decode(String::from_utf8_lossy(raw).trim()) {
        Ok(decoded) if !raw.starts_with(&[0x30]) => decoded,
        _ => raw.to_vec(),
    }
}

async fn verify(c: &mut Client, out: Output, request: VerifyRequest) -> Result<(), CliError> {
    let r = c.verify(req(request)).await?.into_inner();
    show(
        out,
        &Verified {
            valid: r.valid,
            version: r.version,
        },
    )?;
    if !r.valid {
        return Err(CliError::Io("signature does not verify".into()));
    }
    Ok(())
}

async fn encrypt(
    c: &mut Client,
    out: Output,
    a: CryptArgs,
    engine: String,
) -> Result<(), CliError> {
    let plaintext = files::read(&a.input)?;
    let request = req(EncryptRequest {
        key: a.key,
        plaintext_crc32c: Some(crc32c(&plaintext)),
        plaintext,
        aad: vec![],
        engine,
        aad_crc32c: None,
    });
    let r = c.encrypt(request).await?.into_inner();
    super::envelope::check("ciphertext", &r.ciphertext, r.ciphertext_crc32c)?;
    files::write(&a.out, &r.ciphertext)?;
    show(out, &Crypted::new("Encrypted", r.version, &a.out))
}

async fn decrypt(
    c: &mut Client,
    out: Output,
    a: CryptArgs,
    engine: String,
) -> Result<(), CliError> {
    let ciphertext = files::read(&a.input)?;
    let request = req(DecryptRequest {
        key: a.key,
        ciphertext_crc32c: Some(crc32c(&ciphertext)),
        ciphertext,
        aad: vec![],
        engine,
        aad_crc32c: None,
    });
    let r = c.decrypt(request).await?.into_inner();
    super::envelope::check("plaintext", &r.plaintext, r.plaintext_crc32c)?;
    files::write_mode(&a.out, &r.plaintext, 0o600)?;
    show(out, &Crypted::new("Decrypted", r.version, &a.out))
}

/// `engine jwks`: the caller's Engine JWKS as the agent caches it.
async fn jwks(c: &mut Client, out: Output, engine: String) -> Result<(), CliError> {
    let (engine, jwks) = engine_jwks(c, engine).await?;
    show(out, &Jwks { engine, jwks })
}

/// `engine verify-chain` over `--jwks` (offline; of `--engine` when given) or the agent's
/// cached Engine JWKS (of the Engine the agent names).
async fn verify_chain(
    c: &mut Client,
    out: Output,
    a: &super::verify_chain::VerifyChainArgs,
    engine: String,
) -> Result<(), CliError> {
    let (engine, doc) = match &a.jwks {
        Some(p) => (
            engine,
            serde_json::from_slice(&files::read(p)?)
                .map_err(|e| CliError::Io(format!("--jwks {}: {e}", p.display())))?,
        ),
        // The agent names the caller's Engine: the chain must be that Engine's.
        None => engine_jwks(c, engine).await?,
    };
    super::verify_chain::run(out, a, &doc, &engine)
}

/// The caller's Engine (name) and its JWKS as the agent caches it (the watch's first message).
async fn engine_jwks(
    c: &mut Client,
    engine: String,
) -> Result<(String, serde_json::Value), CliError> {
    let request = req(WatchEngineJwksRequest { engine });
    let mut s = c.watch_engine_jwks(request).await?.into_inner();
    let m = s
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unavailable("stream ended"))?;
    let jwks = serde_json::from_slice(&m.jwks).unwrap_or(serde_json::Value::Null);
    Ok((m.engine, jwks))
}

async fn secret(
    c: &mut Client,
    out: Output,
    name: String,
    engine: String,
    path: Option<PathBuf>,
) -> Result<(), CliError> {
    let request = req(FetchSecretRequest {
        name: name.clone(),
        engine,
    });
    let r = c.fetch_secret(request).await?.into_inner();
    match (path, out) {
        (Some(p), _) => files::write_mode(&p, &r.value, 0o600),
        (None, Output::Json) => {
            let value = STANDARD.encode(&r.value);
            let version = r.version;
            show(
                out,
                &SecretView {
                    name,
                    version,
                    value,
                },
            )
        }
        (None, Output::Text) => raw(&r.value),
    }
}

/// What `engine sign` prints.
#[derive(Debug, Serialize)]
struct Signed {
    key: String,
    version: u32,
    signature: String,
    kid: String,
    algorithm: String,
}

impl View for Signed {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        let Self {
            key,
            version,
            signature,
            kid,
            algorithm,
        } = self;
        writeln!(w, "Signed with {key} v{version} (kid {kid}, {algorithm})")?;
        writeln!(w, "{signature}")
    }
}

/// What `engine verify` prints; a bad signature prints nothing here (the error says it).
#[derive(Debug, Serialize)]
struct Verified {
    valid: bool,
    version: u32,
}

impl View for Verified {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        if self.valid {
            writeln!(w, "Signature valid (version {}).", self.version)?;
        }
        Ok(())
    }
}

/// What `engine encrypt` and `engine decrypt` print.
#[derive(Debug, Serialize)]
struct Crypted {
    #[serde(skip)]
    done: &'static str,
    version: u32,
    out: String,
}

impl Crypted {
    fn new(done: &'static str, version: u32, out: &Path) -> Self {
        let out = out.display().to_string();
        Self { done, version, out }
    }
}

impl View for Crypted {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        let Self { done, version, out } = self;
        writeln!(w, "{done} with key version {version} into {out}")
    }
}

/// What `engine public-key` prints: the PEM alone as text.
#[derive(Debug, Serialize)]
struct PublicKeyView {
    pem: String,
    version: u32,
    kid: String,
    algorithm: String,
}

impl View for PublicKeyView {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(self.pem.as_bytes())
    }
}

/// What `engine jwks` prints: the JWKS alone, pretty, as text.
#[derive(Debug, Serialize)]
struct Jwks {
    engine: String,
    jwks: serde_json::Value,
}

impl View for Jwks {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        let pretty = serde_json::to_string_pretty(&self.jwks).map_err(io::Error::other)?;
        writeln!(w, "{pretty}")
    }
}

/// What `engine secret --output json` prints (the value in base64).
#[derive(Debug, Serialize)]
struct SecretView {
    name: String,
    version: u32,
    value: String,
}

impl View for SecretView {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        writeln!(w, "{}", self.value)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::output::rendered;
    use super::*;

    #[test]
    fn engine_output_is_what_it_always_was() {
        let signed = Signed {
            key: "k".into(),
            version: 2,
            signature: "c2ln".into(),
            kid: "k-v2".into(),
            algorithm: "ES256".into(),
        };
        let before = json!({"key": "k", "version": 2, "signature": "c2ln", "kid": "k-v2", "algorithm": "ES256"});
        assert_eq!(rendered(Output::Json, &signed), format!("{before}\n"));
        assert_eq!(
            rendered(Output::Text, &signed),
            "Signed with k v2 (kid k-v2, ES256)\nc2ln\n"
        );
        let valid = |valid| Verified { valid, version: 2 };
        assert_eq!(
            rendered(Output::Json, &valid(false)),
            "{\"valid\":false,\"version\":2}\n"
        );
        assert_eq!(
            rendered(Output::Text, &valid(true)),
            "Signature valid (version 2).\n"
        );
        assert_eq!(rendered(Output::Text, &valid(false)), "");
        let done = Crypted::new("Decrypted", 3, Path::new("/tmp/pt"));
        assert_eq!(
            rendered(Output::Json, &done),
            "{\"out\":\"/tmp/pt\",\"version\":3}\n"
        );
        assert_eq!(
            rendered(Output::Text, &done),
            "Decrypted with key version 3 into /tmp/pt\n"
        );
    }

    #[test]
    fn key_material_output_is_what_it_always_was() {
        let pk = PublicKeyView {
            pem: "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n".into(),
            version: 1,
            kid: "k-v1".into(),
            algorithm: "ES256".into(),
        };
        assert_eq!(rendered(Output::Text, &pk), pk.pem);
        let before = json!({"pem": pk.pem, "version": 1, "kid": "k-v1", "algorithm": "ES256"});
        assert_eq!(rendered(Output::Json, &pk), format!("{before}\n"));
        let jwks = Jwks {
            engine: "books".into(),
            jwks: json!({"keys": [{"kid": "k-v1"}]}),
        };
        let before = json!({"engine": "books", "jwks": {"keys": [{"kid": "k-v1"}]}});
        assert_eq!(rendered(Output::Json, &jwks), format!("{before}\n"));
        assert_eq!(
            rendered(Output::Text, &jwks),
            "{\n  \"keys\": [\n    {\n      \"kid\": \"k-v1\"\n    }\n  ]\n}\n"
        );
        let secret = SecretView {
            name: "db".into(),
            version: 4,
            value: "djI=".into(),
        };
        let before = json!({"name": "db", "version": 4, "value": "djI="});
        assert_eq!(rendered(Output::Json, &secret), format!("{before}\n"));
    }

    #[test]
    fn a_signature_file_is_raw_or_base64() {
        assert_eq!(signature(b"c2ln\n"), b"sig");
        assert_eq!(signature(&[0x30, 0x02, 1, 2]), vec![0x30, 0x02, 1, 2]);
        assert_eq!(signature(b"\xff\xfe"), b"\xff\xfe");
    }
}
