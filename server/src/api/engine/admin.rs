//! The admin side of Engines: the `EngineAdmin` service (Engines, keys, versions, secrets,
//! incarnations) and the `AuditAdmin` service, on the admin socket.

use continuity_proto::admin::audit_admin_server::AuditAdmin;
use continuity_proto::admin::engine_admin_server::EngineAdmin;
use continuity_proto::admin::{self as pb_admin};
use continuity_proto::types;
use tonic::{Request, Response, Status};

use super::engine_status;
use crate::api::admin::AdminService;
use crate::api::to_completion;
use crate::audit::ExportedCheckpoint;
use crate::engines::ImportVersion;
use crate::engines::VersionAction;
use crate::keys::import_wrap::ImportMethod;
use crate::model::engine::{
    Algorithm, Custody, Engine as EngineModel, EngineKey, ImportJob,
    Incarnation as IncarnationModel, KeyVersion, Purpose,
};

fn engine_pb(e: &EngineModel) -> pb_admin::Engine {
    pb_admin::Engine {
        name: e.name.clone(),
        spiffe_id: e.spiffe_id.clone(),
        tier: e.tier,
        custody: e.custody.as_str().into(),
        exposure_override: e.exposure_override,
        created_at: e.created_at,
    }
}

fn key_pb(k: &EngineKey, versions: &[KeyVersion]) -> pb_admin::EngineKey {
    pb_admin::EngineKey {
        engine: k.engine.clone(),
        name: k.name.clone(),
        purpose: k.algorithm.purpose().as_str().into(),
        algorithm: k.algorithm.as_str().into(),
        custody: k.custody.as_str().into(),
        primary_version: k.primary_version,
        rotation_period: k.rotation_period,
        destroy_grace: k.destroy_grace,
        versions: versions
            .iter()
            .map(|v| pb_admin::KeyVersion {
                version: v.version,
                state: v.state.as_str().into(),
                kid: v.kid.clone(),
                created_at: v.created_at,
                destroy_at: v.destroy_at,
                encryptions: v.encryptions,
                imported: v.imported,
            })
            .collect(),
    }
}

fn import_job_pb(j: &ImportJob) -> pb_admin::ImportJob {
    pb_admin::ImportJob {
        id: j.id.clone(),
        engine: j.engine.clone(),
        method: j.method.as_str().into(),
        custody: j.custody.as_str().into(),
        public_key_pem: super::public_key_pem(&j.public_key),
        state: j.state.as_str().into(),
        created_at: j.created_at,
        expires_at: j.expires_at,
    }
}

fn incarnation_pb(i: IncarnationModel) -> pb_admin::IncarnationRecord {
    pb_admin::IncarnationRecord {
        engine: i.engine,
        entry_id: i.entry_id,
        agent_id: i.agent_id,
        workload_id: i.workload_id,
        pid: i.pid,
        uid: i.uid,
        selectors: i
            .selectors
            .into_iter()
            .map(|s| types::Selector {
                r#type: s.kind,
                value: s.value,
            })
            .collect(),
        first_seen: i.first_seen,
        last_seen: i.last_seen,
    }
}

fn parse<T: std::str::FromStr<Err = String>>(s: &str) -> Result<T, Status> {
    s.parse().map_err(Status::invalid_argument)
}

#[tonic::async_trait]
impl EngineAdmin for AdminService {
    async fn create_engine(
        &self,
        req: Request<pb_admin::CreateEngineRequest>,
    ) -> Result<Response<pb_admin::Engine>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let custody = match r.custody.as_str() {
            "" => None,
            c => Some(parse::<Custody>(c)?),
        };
        let engines = self.engines.clone();
        let e = to_completion(async move {
            let spiffe_id = Some(r.spiffe_id.as_str()).filter(|s| !s.is_empty());
            engines
                .create_engine(
                    &r.name,
                    r.tier,
                    custody,
                    spiffe_id,
                    r.allow_exposure,
                    &actor,
                )
                .await
                .map_err(engine_status)
        })
        .await?;
        Ok(Response::new(engine_pb(&e)))
    }

    async fn get_engine(
        &self,
        req: Request<pb_admin::GetEngineRequest>,
    ) -> Result<Response<pb_admin::Engine>, Status> {
        self.authorize(&req)?;
        let e = self
            .engines
            .engine(&req.get_ref().name)
            .map_err(engine_status)?;
        Ok(Response::new(engine_pb(&e)))
    }

    async fn list_engines(
        &self,
        req: Request<pb_admin::ListEnginesRequest>,
    ) -> Result<Response<pb_admin::ListEnginesResponse>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(pb_admin::ListEnginesResponse {
            engines: self.engines.engines().iter().map(engine_pb).collect(),
        }))
    }

    async fn list_incarnations(
        &self,
        req: Request<pb_admin::ListIncarnationsRequest>,
    ) -> Result<Response<pb_admin::ListIncarnationsResponse>, Status> {
        self.authorize(&req)?;
        let list = self
            .engines
            .incarnations(&req.get_ref().engine)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(pb_admin::ListIncarnationsResponse {
            incarnations: list.into_iter().map(incarnation_pb).collect(),
        }))
    }

    async fn create_key(
        &self,
        req: Request<pb_admin::CreateKeyRequest>,
    ) -> Result<Response<pb_admin::EngineKey>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let purpose = parse::<Purpose>(&r.purpose)?;
        let algorithm = match r.algorithm.as_str() {
            "" => None,
            a => Some(parse::<Algorithm>(a)?),
        };
        let engines = self.engines.clone();
        let k = to_completion(async move {
            engines
                .create_key(
                    &r.engine,
                    &r.name,
                    purpose,
                    algorithm,
                    r.rotation_period,
                    r.destroy_grace,
                    &actor,
                )
                .await
                .map_err(engine_status)
        })
        .await?;
        let (k, v) = self
            .engines
            .key(&k.engine, &k.name)
            .map_err(engine_status)?;
        Ok(Response::new(key_pb(&k, &v)))
    }

    async fn list_keys(
        &self,
        req: Request<pb_admin::ListKeysRequest>,
    ) -> Result<Response<pb_admin::ListKeysResponse>, Status> {
        self.authorize(&req)?;
        let keys = self
            .engines
            .keys(&req.get_ref().engine)
            .map_err(engine_status)?;
        Ok(Response::new(pb_admin::ListKeysResponse {
            keys: keys.iter().map(|(k, v)| key_pb(k, v)).collect(),
        }))
    }

    async fn rotate_key(
        &self,
        req: Request<pb_admin::RotateKeyRequest>,
    ) -> Result<Response<pb_admin::EngineKey>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let (engines, target) = (self.engines.clone(), r.clone());
        to_completion(async move {
            engines
                .rotate(&target.engine, &target.name, &actor)
                .await
                .map_err(engine_status)
        })
        .await?;
        let (k, v) = self
            .engines
            .key(&r.engine, &r.name)
            .map_err(engine_status)?;
        Ok(Response::new(key_pb(&k, &v)))
    }

    async fn set_key_version_state(
        &self,
        req: Request<pb_admin::SetKeyVersionStateRequest>,
    ) -> Result<Response<pb_admin::EngineKey>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let action = parse::<VersionAction>(&r.action)?;
        let (engines, target) = (self.engines.clone(), r.clone());
        to_completion(async move {
            engines
                .set_state(&target.engine, &target.name, target.version, action, &actor)
                .await
                .map_err(engine_status)
        })
        .await?;
        let (k, v) = self
            .engines
            .key(&r.engine, &r.name)
            .map_err(engine_status)?;
        Ok(Response::new(key_pb(&k, &v)))
    }

    async fn create_import_job(
        &self,
        req: Request<pb_admin::CreateImportJobRequest>,
    ) -> Result<Response<pb_admin::ImportJob>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let method = match r.method.as_str() {
            "" => None,
            m => Some(parse::<ImportMethod>(m)?),
        };
        let engines = self.engines.clone();
        let job = to_completion(async move {
            engines
                .create_import_job(&r.engine, method, &actor)
                .await
                .map_err(engine_status)
        })
        .await?;
        Ok(Response::new(import_job_pb(&job)))
    }

    async fn get_import_job(
        &self,
        req: Request<pb_admin::GetImportJobRequest>,
    ) -> Result<Response<pb_admin::ImportJob>, Status> {
        self.authorize(&req)?;
        let id = req.into_inner().id;
        let job = self.engines.import_job(&id).await.map_err(engine_status)?;
        Ok(Response::new(import_job_pb(&job)))
    }

    async fn list_import_jobs(
        &self,
        req: Request<pb_admin::ListImportJobsRequest>,
    ) -> Result<Response<pb_admin::ListImportJobsResponse>, Status> {
        self.authorize(&req)?;
        let engine = req.into_inner().engine;
        let jobs = self
            .engines
            .import_jobs(Some(engine.as_str()).filter(|e| !e.is_empty()))
            .await
            .map_err(engine_status)?;
        Ok(Response::new(pb_admin::ListImportJobsResponse {
            jobs: jobs.iter().map(import_job_pb).collect(),
        }))
    }

    async fn import_key_version(
        &self,
        req: Request<pb_admin::ImportKeyVersionRequest>,
    ) -> Result<Response<pb_admin::EngineKey>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let (engine, name) = (r.engine.clone(), r.name.clone());
        let import = ImportVersion {
            engine: r.engine,
            key: r.name,
            job: r.import_job,
            wrapped: r.wrapped_key,
            public_key: Some(r.public_key).filter(|p| !p.is_empty()),
        };
        let engines = self.engines.clone();
        to_completion(async move {
            engines
                .import_version(import, &actor)
                .await
                .map_err(engine_status)
        })
        .await?;
        let (k, v) = self.engines.key(&engine, &name).map_err(engine_status)?;
        Ok(Response::new(key_pb(&k, &v)))
    }

    async fn put_secret(
        &self,
        req: Request<pb_admin::PutSecretRequest>,
    ) -> Result<Response<pb_admin::PutSecretResponse>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let engines = self.engines.clone();
        let version = to_completion(async move {
            engines
                .put_secret(&r.engine, &r.name, &r.value, &actor)
                .await
                .map_err(engine_status)
        })
        .await?;
        Ok(Response::new(pb_admin::PutSecretResponse { version }))
    }
}

#[tonic::async_trait]
impl AuditAdmin for AdminService {
    async fn show_audit(
        &self,
        req: Request<pb_admin::ShowAuditRequest>,
    ) -> Result<Response<pb_admin::ShowAuditResponse>, Status> {
        self.authorize(&req)?;
        let records = self
            .engines
            .audit()
            .records(req.get_ref().limit)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb_admin::ShowAuditResponse {
            records: records
                .into_iter()
                .map(|r| pb_admin::AuditRecord {
                    seq: r.seq,
                    time: r.time,
                    actor: r.actor,
                    action: r.action,
                    target: r.target,
                    key_version: r.key_version,
                    result: r.result,
                    hash: r.hash,
                })
                .collect(),
        }))
    }

    async fn verify_audit(
        &self,
        req: Request<pb_admin::VerifyAuditRequest>,
    ) -> Result<Response<pb_admin::VerifyAuditResponse>, Status> {
        self.authorize(&req)?;
        let exported: Vec<ExportedCheckpoint> = req
            .into_inner()
            .checkpoints
            .into_iter()
            .map(|c| ExportedCheckpoint {
                name: c.name,
                text: c.text,
            })
            .collect();
        let v = self
            .engines
            .audit()
            .verify(&exported)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let first = v.findings.first();
        Ok(Response::new(pb_admin::VerifyAuditResponse {
            ok: v.intact(),
            records: v.records,
            bad_seq: first.map_or(0, |f| f.seq),
            reason: first.map(|f| f.detail.clone()).unwrap_or_default(),
            checkpoints: v.checkpoints as i64,
            findings: v
                .findings
                .iter()
                .map(|f| pb_admin::AuditFinding {
                    seq: f.seq,
                    kind: f.kind.as_str().into(),
                    detail: f.detail.clone(),
                })
                .collect(),
        }))
    }

    async fn checkpoint_audit(
        &self,
        req: Request<pb_admin::CheckpointAuditRequest>,
    ) -> Result<Response<pb_admin::AuditCheckpoint>, Status> {
        self.authorize(&req)?;
        let (cp, file) = self
            .engines
            .audit()
            .checkpoint()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb_admin::AuditCheckpoint {
            json: cp.to_json(),
            seq: cp.seq,
            head: cp.head,
            time: cp.time,
            key_id: cp.key_id,
            public_key: cp.public_key,
            signature: cp.signature,
            file: file.display().to_string(),
        }))
    }
}
