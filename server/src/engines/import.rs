//! Key import (Cloud KMS import jobs): an Engine's import job holds an RSA-3072 wrapping key
//! where the imported keys will live (generated in the token for hsm custody, sealed under the
//! KEK otherwise) for three days; `import` unwraps a blob made for the job into a new primary
//! version of a key. hsm custody unwraps inside the token, so the material never reaches the
//! server's memory; transit and kv custody unwrap here, check the material against the key's
//! algorithm, and seal it as generated versions are. An imported version records that it was
//! imported, and an imported sign-key version is endorsed by the previous primary as a
//! rotation's is. Every refusal is audited and leaves nothing behind.

use continuity_common::secret::Zeroizing;

use super::custody::Rules;
use super::material::{Material, binding, software};
use super::{EngineError, Engines, Result};
use crate::audit::AuditEvent;
use crate::datastore::Write;
use crate::keys::import_wrap::{ImportMethod, MAX_BLOB, WrappingKey, spki_raw};
use crate::keys::software::SoftwareKey;
use crate::keys::{ImportRequest, ImportTarget, Imported, KeyError, KeyHandle};
use crate::model::engine::{EngineKey, ImportJob, ImportJobState, KeyVersion};

/// How long an import job accepts imports (Cloud KMS: three days).
pub const IMPORT_JOB_LIFETIME: i64 = 3 * 24 * 3600;

/// One import: blob `wrapped`, made for job `job`, into key `engine`/`key`.
#[derive(Debug, Clone)]
pub struct ImportVersion {
    /// The Engine.
    pub engine: String,
    /// The key that gets the new version.
    pub key: String,
    /// The import job the blob was wrapped for.
    pub job: String,
    /// `RSA-OAEP(ephemeral) || KWP(ephemeral, material)`.
    pub wrapped: Vec<u8>,
    /// The public half (SPKI DER) of an imported private key, for a token that cannot read
    /// it from the key (checked against the key either way).
    pub public_key: Option<Vec<u8>>,
}

/// The key manager id of a job's wrapping key (hsm custody).
fn wrapping_id(job: &str) -> String {
    format!("import-job/{job}")
}

/// What binds a job's sealed wrapping key to it.
fn job_binding(job: &str) -> String {
    format!("continuity/import-job/{job}")
}

/// Whether `job` is past its life at `now` (expired in the datastore or not yet swept).
fn expired(job: &ImportJob, now: i64) -> bool {
    job.state == ImportJobState::Expired || job.expires_at <= now
}

/// A job as callers see it: past its expiry it shows EXPIRED even before the sweep.
fn shown(mut job: ImportJob, now: i64) -> ImportJob {
    if expired(&job, now) {
        job.state = ImportJobState::Expired;
    }
    job
}

/// Refusals of the caller's material are the caller's error (InvalidArgument).
fn caller(e: KeyError) -> EngineError {
    match e {
        KeyError::Rejected(m) => EngineError::Invalid(m),
        e => EngineError::Key(e),
    }
}

impl Engines {
    /// Makes an import job for Engine `engine` (method: the custody's default unless given).
    pub async fn create_import_job(
        &self,
        engine: &str,
        method: Option<ImportMethod>,
        actor: &str,
    ) -> Result<ImportJob> {
        let e = self.engine(engine)?;
        let inside_hsm = Rules::of(e.custody).inside_hsm;
        // SoftHSM2, the token this is tested with, does RSA-OAEP with SHA-1 only.
        let method = method.unwrap_or(if inside_hsm {
            ImportMethod::RsaOaep3072Sha1Aes256
        } else {
            ImportMethod::RsaOaep3072Sha256Aes256
        });
        let id = continuity_common::rand::array::<8>()
            .map(|b| format!("ij-{}", hex::encode(b)))
            .map_err(|e| KeyError::Crypto(e.to_string()))?;
        let (public_key, private_ref) = if inside_hsm {
            let spki = self
                .keys
                .generate_wrapping_key(&wrapping_id(&id), method.hash())
                .await
                .map_err(|e| match e {
                    KeyError::Unsupported(m) => EngineError::Precondition(m),
                    e => EngineError::Key(e),
                })?;
            (spki, wrapping_id(&id).into_bytes())
        } else {
            let key = tokio::task::spawn_blocking(WrappingKey::generate)
                .await
                .map_err(|e| KeyError::Crypto(e.to_string()))??;
            let (sealed, _) = self.seal(&key.pkcs8()?, job_binding(&id)).await?;
            (key.spki_der()?, sealed)
        };
        let now = self.clock.unix();
        let job = ImportJob {
            id: id.clone(),
            engine: engine.into(),
            method,
            custody: e.custody,
            public_key,
            private_ref,
            state: ImportJobState::Active,
            created_at: now,
            expires_at: now + IMPORT_JOB_LIFETIME,
        };
        let event = AuditEvent::ok(actor, "key.import_job.create", engine).result(format!(
            "ok; {id} {method} {} expires at {}",
            e.custody, job.expires_at
        ));
        if let Err(err) = self
            .audit
            .commit(&[Write::PutImportJob(job.clone())], &[event])
            .await
        {
            if inside_hsm {
                let _ = self.keys.delete(&wrapping_id(&id)).await;
            }
            return Err(err.into());
        }
        Ok(job)
    }

    /// The import job `id`.
    pub async fn import_job(&self, id: &str) -> Result<ImportJob> {
        let job = self
            .store
            .get_import_job(id)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("import job {id} not found")))?;
        Ok(shown(job, self.clock.unix()))
    }

    /// The import jobs (of Engine `engine`, when given), oldest first.
    pub async fn import_jobs(&self, engine: Option<&str>) -> Result<Vec<ImportJob>> {
        if let Some(e) = engine {
            self.engine(e)?;
        }
        let now = self.clock.unix();
        Ok(self
            .store
            .list_import_jobs()
            .await?
            .into_iter()
            .filter(|j| engine.is_none_or(|e| j.engine == e))
            .map(|j| shown(j, now))
            .collect())
    }

    /// Imports the material of `req` as a new primary version of its key; the refusal, if
    /// any, is audited.
    pub async fn import_version(&self, req: ImportVersion, actor: &str) -> Result<EngineKey> {
        let target = format!("{}/{}", req.engine, req.key);
        let outcome = self.import_checked(&req, actor).await;
        if let Err(e) = &outcome {
            self.audit
                .record(actor, "key.import", &target, 0, &format!("refused: {e}"))
                .await?;
        }
        outcome
    }

    async fn import_checked(&self, req: &ImportVersion, actor: &str) -> Result<EngineKey> {
        if req.wrapped.len() > MAX_BLOB {
            return Err(EngineError::Invalid(format!(
                "the wrapped blob is {} bytes; at most {MAX_BLOB}",
                req.wrapped.len()
            )));
        }
        let _w = self.writes.lock().await;
        self.follow().await?;
        let (key, next) = self.next_version(&req.engine, &req.key)?;
        let job = self.usable_job(req, &key).await?;
        let mut key = EngineKey::clone(&key);
        let now = self.clock.unix();
        let mut v = super::material::blank_version(&key, next, now);
        v.imported = true;
        let material = self.unwrap_material(&key, &mut v, &job, req).await?;
        let committed = self.commit_import(&mut key, &v, &job, actor).await;
        if let Err(e) = committed {
            if !v.hsm_id.is_empty() {
                let _ = self.keys.delete(&v.hsm_id).await;
            }
            return Err(e);
        }
        self.cache(&v, material);
        self.index_key_version(key.clone(), v);
        Ok(key)
    }

    /// The job of `req`, which must belong to the key's Engine and custody and be active.
    async fn usable_job(&self, req: &ImportVersion, key: &EngineKey) -> Result<ImportJob> {
        let job =
            self.store.get_import_job(&req.job).await?.ok_or_else(|| {
                EngineError::NotFound(format!("import job {} not found", req.job))
            })?;
        if job.engine != key.engine {
            return Err(EngineError::Invalid(format!(
                "import job {} belongs to engine {}, not {}",
                job.id, job.engine, key.engine
            )));
        }
        if job.custody != key.custody {
            return Err(EngineError::Precondition(format!(
                "import job {} was made for {} custody; key {}/{} has {} custody",
                job.id, job.custody, key.engine, key.name, key.custody
            )));
        }
        if expired(&job, self.clock.unix()) {
            return Err(EngineError::Precondition(format!(
                "import job {} expired at {}; create a new one",
                job.id, job.expires_at
            )));
        }
        Ok(job)
    }

    /// Unwraps the blob into version `v`'s material: in the token (hsm), else here, checked
    /// and sealed under the KEK.
    async fn unwrap_material(
        &self,
        key: &EngineKey,
        v: &mut KeyVersion,
        job: &ImportJob,
        req: &ImportVersion,
    ) -> Result<Material> {
        let kt = key.algorithm.key_type();
        let rules = Rules::of(key.custody);
        if rules.inside_hsm {
            return self.unwrap_in_token(key, v, job, req).await;
        }
        let raw = self.unwrap_here(job, &req.wrapped).await?;
        if let Some(kt) = kt {
            let id = binding(&v.engine, &v.key, v.version);
            let sk = SoftwareKey::from_pkcs8(&id, kt, raw.to_vec()).map_err(|_| {
                EngineError::Invalid(format!(
                    "the imported material is not a PKCS#8 {} private key (openssl pkcs8 -topk8 -nocrypt -outform DER makes one)",
                    key.algorithm.as_str()
                ))
            })?;
            if let Some(given) = &req.public_key
                && spki_raw(given, kt).map_err(caller)? != sk.public_key_raw()
            {
                return Err(EngineError::Invalid(
                    "the public key given is not the imported private key's".into(),
                ));
            }
            v.public_key = sk.spki_der();
        } else if raw.len() != 32 {
            return Err(EngineError::Invalid(format!(
                "the imported material is {} bytes; an AES-256 key is 32",
                raw.len()
            )));
        }
        let (sealed, mechanism) = self
            .seal(&raw, binding(&v.engine, &v.key, v.version))
            .await?;
        v.sealed = Some(sealed);
        v.mechanism = mechanism;
        software(v, kt, raw, rules.export)
    }

    /// Unwraps the blob inside the token into a new object of version `v`'s own.
    async fn unwrap_in_token(
        &self,
        key: &EngineKey,
        v: &mut KeyVersion,
        job: &ImportJob,
        req: &ImportVersion,
    ) -> Result<Material> {
        let target = key
            .algorithm
            .key_type()
            .map_or(ImportTarget::Aes, ImportTarget::Signer);
        // An id of this import alone: a failed commit (another server made this version
        // number first) removes only its own object, never a committed key's.
        let nonce =
            continuity_common::rand::array::<6>().map_err(|e| KeyError::Crypto(e.to_string()))?;
        v.hsm_id = format!(
            "engine/{}/{}/v{}/imported-{}",
            v.engine,
            v.key,
            v.version,
            hex::encode(nonce)
        );
        v.mechanism = "pkcs11".into();
        let request = ImportRequest {
            wrapping_id: String::from_utf8_lossy(&job.private_ref).into_owned(),
            id: v.hsm_id.clone(),
            target,
            hash: job.method.hash(),
            blob: req.wrapped.clone(),
            public: req.public_key.clone(),
        };
        Ok(
            match self.keys.unwrap_import(request).await.map_err(caller)? {
                Imported::Signer(h) => {
                    v.public_key = h.spki_der();
                    Material::Signer(h, None)
                }
                Imported::Aes(a) => Material::Aes(a, None),
            },
        )
    }

    /// Unwraps a blob with a software job's wrapping key (unsealed for this call only).
    async fn unwrap_here(&self, job: &ImportJob, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let pkcs8 = self.open(&job.private_ref, job_binding(&job.id)).await?;
        let (blob, hash) = (blob.to_vec(), job.method.hash());
        tokio::task::spawn_blocking(move || WrappingKey::from_pkcs8(&pkcs8)?.unwrap(&blob, hash))
            .await
            .map_err(|e| KeyError::Crypto(e.to_string()))?
            .map_err(caller)
    }

    /// Endorses (sign keys) and commits the imported version `v` as the key's primary.
    async fn commit_import(
        &self,
        key: &mut EngineKey,
        v: &KeyVersion,
        job: &ImportJob,
        actor: &str,
    ) -> Result<()> {
        let proof = self.endorse(key, v, actor).await?;
        key.primary_version = v.version;
        if key.rotation_period > 0 {
            key.next_rotation_at = v.created_at + key.rotation_period;
        }
        let event = AuditEvent::ok(actor, "key.import", &format!("{}/{}", key.engine, key.name))
            .version(v.version)
            .result(format!("ok; imported through {} ({})", job.id, job.method));
        self.commit_key_version(key, v, event, proof).await
    }

    /// Expires the import jobs past their life: their wrapping keys are destroyed (token
    /// object, or the sealed copy) and imports through them refused. Returns how many. A job
    /// whose expiry fails (the token refuses the delete, a commit fails) is logged and left
    /// for the next sweep; the others, and the rest of the tick, go on.
    pub(super) async fn expire_import_jobs(&self) -> Result<usize> {
        let now = self.clock.unix();
        let due: Vec<ImportJob> = self
            .store
            .list_import_jobs()
            .await?
            .into_iter()
            .filter(|j| j.state == ImportJobState::Active && j.expires_at <= now)
            .collect();
        let mut expired = 0;
        for job in &due {
            match self.expire_import_job(job).await {
                Ok(done) => expired += usize::from(done),
                Err(e) => tracing::warn!(
                    job = %job.id, engine = %job.engine, error = %e,
                    "import job expiry failed; its wrapping key stays until the next sweep"
                ),
            }
        }
        Ok(expired)
    }

    /// Destroys `job`'s wrapping key and marks it expired, under the write lock (so no import
    /// through it is between its checks and its unwrap meanwhile); false if it was no longer
    /// active.
    async fn expire_import_job(&self, job: &ImportJob) -> Result<bool> {
        let _w = self.writes.lock().await;
        // Read again under the lock: another server may have expired it meanwhile.
        let Some(job) = self.store.get_import_job(&job.id).await? else {
            return Ok(false);
        };
        if job.state != ImportJobState::Active {
            return Ok(false);
        }
        if Rules::of(job.custody).inside_hsm {
            self.keys.delete(&wrapping_id(&job.id)).await?;
        }
        let gone = ImportJob {
            state: ImportJobState::Expired,
            private_ref: vec![],
            ..job.clone()
        };
        let event = AuditEvent::ok("scheduler", "key.import_job.expire", &job.engine)
            .result(format!("ok; {} wrapping key destroyed", job.id));
        self.audit
            .commit(&[Write::PutImportJob(gone)], &[event])
            .await?;
        Ok(true)
    }
}
