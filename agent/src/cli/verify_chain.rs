//! `engine verify-chain`: a continuity proof checked by the relying party — the endorsements
//! of a key walked from a pinned public key to the newest version, offline (`--jwks`) or from
//! the agent's cached Engine JWKS, then optionally a signature checked with the reached key.

use std::io::{self, Write};
use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::Args;
use continuity_common::endorsement::{Chain, Step, verify_chain, verify_signature};
use serde::Serialize;

use super::error::CliError;
use super::files;
use super::output::{Output, View, show};

/// The arguments of `engine verify-chain`.
#[derive(Debug, Args)]
pub struct VerifyChainArgs {
    /// Key name.
    #[arg(long)]
    pub key: String,
    /// The pinned public key: a PEM SubjectPublicKeyInfo or a JWK (JSON) file.
    #[arg(long)]
    pub pinned: PathBuf,
    /// The published Engine JWKS document (offline); default: the agent's cached one.
    #[arg(long)]
    pub jwks: Option<PathBuf>,
    /// The trust domain the chain must name (every link does).
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// A signature (raw DER / PKCS#1, or its base64) to check with the reached version.
    #[arg(long, requires = "message_file")]
    pub signature_file: Option<PathBuf>,
    /// The message the signature is over.
    #[arg(long, requires = "signature_file")]
    pub message_file: Option<PathBuf>,
}

/// The SubjectPublicKeyInfo DER of a pinned key file (PEM `PUBLIC KEY` or a JWK).
fn pinned_spki(raw: &[u8], path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    let bad = |why: String| CliError::Io(format!("--pinned {}: {why}", path.display()));
    let text = String::from_utf8_lossy(raw);
    if text.contains("-----BEGIN PUBLIC KEY-----") {
        let (_, pem) = x509_parser::pem::parse_x509_pem(raw).map_err(|e| bad(e.to_string()))?;
        return Ok(pem.contents);
    }
    let jwk: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("neither a PEM public key nor a JWK: {e}")))?;
    continuity_common::jwk::to_spki(&jwk).map_err(|e| bad(e.to_string()))
}

/// The signature in a `--signature-file`: raw bytes, or their base64.
fn signature_bytes(raw: &[u8]) -> Vec<u8> {
    match STANDARD.decode(String::from_utf8_lossy(raw).trim()) {
        Ok(decoded) if !raw.starts_with(&[0x30]) => decoded,
        _ => raw.to_vec(),
    }
}

/// Refuses a chain naming another Engine or trust domain than the expected ones (empty:
/// not checked): the same key material imported into two Engines must not let one Engine's
/// endorsements pass for the other's.
fn check_scope(chain: &Chain, engine: &str, trust_domain: Option<&str>) -> Result<(), CliError> {
    if chain.path.len() < 2 {
        return Ok(());
    }
    let wrong = |what: &str, named: &str, want: &str| {
        Err(CliError::Io(format!(
            "continuity chain names {what} {named:?}, not {want:?}: it is not this {what}'s key"
        )))
    };
    if !engine.is_empty() && chain.engine != engine {
        return wrong("engine", &chain.engine, engine);
    }
    match trust_domain {
        Some(td) if chain.trust_domain != td => wrong("trust domain", &chain.trust_domain, td),
        _ => Ok(()),
    }
}

/// Runs `engine verify-chain` over `doc` (the Engine JWKS with its endorsements), which must be
/// of `engine` (empty: any) and of `--trust-domain` when given.
pub fn run(
    out: Output,
    a: &VerifyChainArgs,
    doc: &serde_json::Value,
    engine: &str,
) -> Result<(), CliError> {
    let pinned = pinned_spki(&files::read(&a.pinned)?, &a.pinned)?;
    let chain = verify_chain(doc, &a.key, &pinned).map_err(|e| {
        CliError::Io(format!(
            "continuity chain of {} does not verify: {e}",
            a.key
        ))
    })?;
    check_scope(&chain, engine, a.trust_domain.as_deref())?;
    let reached = chain.path.last().cloned();
    let mut view = ChainView {
        trust_domain: chain.trust_domain.clone(),
        engine: chain.engine.clone(),
        key: a.key.clone(),
        path: chain.path.iter().map(StepView::from).collect(),
        signature_valid: None,
    };
    if let (Some(s), Some(m)) = (&a.signature_file, &a.message_file) {
        let sig = signature_bytes(&files::read(s)?);
        let valid = verify_signature(
            &chain.reached_spki,
            chain.reached_alg,
            &files::read(m)?,
            &sig,
            true,
        );
        view.signature_valid = Some(valid);
        if !valid {
            show(out, &view)?;
            let at = reached.map_or_else(String::new, |r| format!("v{} ({})", r.version, r.kid));
            return Err(CliError::Io(format!(
                "signature: does not verify with the reached version {at}"
            )));
        }
    }
    show(out, &view)
}

/// One version of the printed path.
#[derive(Debug, Serialize)]
struct StepView {
    version: u32,
    kid: String,
    state: String,
    thumbprint: String,
}

impl From<&Step> for StepView {
    fn from(s: &Step) -> Self {
        Self {
            version: s.version,
            kid: s.kid.clone(),
            state: s.state.clone(),
            thumbprint: s.thumbprint.clone(),
        }
    }
}

/// What `engine verify-chain` prints.
#[derive(Debug, Serialize)]
struct ChainView {
    /// The trust domain and Engine the links name (empty without a link).
    trust_domain: String,
    engine: String,
    key: String,
    path: Vec<StepView>,
    signature_valid: Option<bool>,
}

impl View for ChainView {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        for (i, s) in self.path.iter().enumerate() {
            let how = if i == 0 {
                "pinned"
            } else {
                "endorsed by the previous"
            };
            writeln!(
                w,
                "v{} {} {} {} ({how})",
                s.version, s.kid, s.state, s.thumbprint
            )?;
        }
        match self.signature_valid {
            Some(true) => writeln!(w, "signature: valid"),
            Some(false) => writeln!(w, "signature: INVALID"),
            None => Ok(()),
        }
    }
}
