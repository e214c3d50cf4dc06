//! The broker's CRC32C checks (Cloud KMS's integrity fields: a request checksum that does not
//! match is refused before anything happens) and its data-key and Rewrap calls.

use continuity_common::checksum::{crc32c, verify};
use continuity_common::engine_limits::{MAX_AAD, MAX_CIPHERTEXT, MAX_PLAINTEXT};
use continuity_proto::engine::*;
use tonic::{Request, Status};

use super::{BrokerService, engine_status, required};
use crate::engines::check_key_spec;

/// Checks an optional request checksum: whether it was given (and matched), or
/// InvalidArgument naming the field.
pub(super) fn checked(field: &str, data: &[u8], given: Option<u32>) -> Result<bool, Status> {
    verify(field, data, given).map_err(Status::invalid_argument)
}

/// Refuses a payload over `max` bytes (InvalidArgument naming the field): the agent checks
/// the same, but a hostile agent may not.
pub(super) fn within(field: &str, data: &[u8], max: usize) -> Result<(), Status> {
    if data.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; at most {max}",
            data.len()
        )));
    }
    Ok(())
}

/// The checksums a Sign request carries: (message verified, digest verified).
pub(super) fn sign_checks(r: &SignRequest) -> Result<(bool, bool), Status> {
    Ok((
        checked("message", &r.message, r.message_crc32c)?,
        checked("digest", &r.digest, r.digest_crc32c)?,
    ))
}

/// The checksums an Encrypt request carries: (plaintext verified, aad verified).
pub(super) fn encrypt_checks(r: &EncryptRequest) -> Result<(bool, bool), Status> {
    within("plaintext", &r.plaintext, MAX_PLAINTEXT)?;
    within("aad", &r.aad, MAX_AAD)?;
    Ok((
        checked("plaintext", &r.plaintext, r.plaintext_crc32c)?,
        checked("aad", &r.aad, r.aad_crc32c)?,
    ))
}

/// The checksums a Decrypt request carries: (ciphertext verified, aad verified).
pub(super) fn decrypt_checks(r: &DecryptRequest) -> Result<(bool, bool), Status> {
    within("ciphertext", &r.ciphertext, MAX_CIPHERTEXT)?;
    within("aad", &r.aad, MAX_AAD)?;
    Ok((
        checked("ciphertext", &r.ciphertext, r.ciphertext_crc32c)?,
        checked("aad", &r.aad, r.aad_crc32c)?,
    ))
}

impl BrokerService {
    /// GenerateDataKey: checks, authorizes, wraps a fresh AES-256 key under the primary version.
    pub(super) async fn data_key(
        &self,
        req: Request<BrokerGenerateDataKey>,
    ) -> Result<GenerateDataKeyResponse, Status> {
        let r = req.get_ref();
        let inner = required(&r.request)?;
        let spec = check_key_spec(&inner.key_spec).map_err(engine_status)?;
        within("aad", &inner.aad, MAX_AAD)?;
        let aad_ok = checked("aad", &inner.aad, inner.aad_crc32c)?;
        let (engine, actor) = self
            .authorize(&req, &r.entry_id, &inner.engine, r.workload.as_ref())
            .await?;
        let dk = self
            .engines
            .generate_data_key(&engine, &inner.key, inner.wrapped_only, &inner.aad, &actor)
            .await
            .map_err(engine_status)?;
        let plaintext = dk
            .plaintext
            .as_ref()
            .map(|p| p.to_vec())
            .unwrap_or_default();
        Ok(GenerateDataKeyResponse {
            key: inner.key.clone(),
            version: dk.version,
            ciphertext_crc32c: crc32c(&dk.ciphertext),
            ciphertext: dk.ciphertext,
            plaintext_crc32c: dk.plaintext.as_ref().map_or(0, |p| crc32c(p)),
            plaintext,
            verified_aad_crc32c: aad_ok,
            key_spec: spec.into(),
        })
    }

    /// Rewrap: checks, authorizes, moves the ciphertext to the primary version.
    pub(super) async fn rewrap_call(
        &self,
        req: Request<BrokerRewrap>,
    ) -> Result<RewrapResponse, Status> {
        let r = req.get_ref();
        let inner = required(&r.request)?;
        within("ciphertext", &inner.ciphertext, MAX_CIPHERTEXT)?;
        within("aad", &inner.aad, MAX_AAD)?;
        let ct_ok = checked("ciphertext", &inner.ciphertext, inner.ciphertext_crc32c)?;
        let aad_ok = checked("aad", &inner.aad, inner.aad_crc32c)?;
        let (engine, actor) = self
            .authorize(&req, &r.entry_id, &inner.engine, r.workload.as_ref())
            .await?;
        let rw = self
            .engines
            .rewrap(&engine, &inner.key, &inner.ciphertext, &inner.aad, &actor)
            .await
            .map_err(engine_status)?;
        Ok(RewrapResponse {
            key: inner.key.clone(),
            ciphertext_crc32c: crc32c(&rw.ciphertext),
            ciphertext: rw.ciphertext,
            version: rw.version,
            source_version: rw.source_version,
            verified_ciphertext_crc32c: ct_ok,
            verified_aad_crc32c: aad_ok,
        })
    }
}
