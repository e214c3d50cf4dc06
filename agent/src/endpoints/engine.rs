//! `continuity.engine.v1.EngineAPI` on the workload socket. The caller's Engine comes from
//! its attested entry; the agent forwards to the server (which re-checks that this agent
//! hosts the entry), except `Verify` and `WatchEngineJWKS`, answered from the cached Engine
//! JWKS so they keep working while the server is down. Forwarded calls count against the
//! caller's rate limit (ResourceExhausted beyond it); local ones do not.

use std::pin::Pin;
use std::sync::Arc;

use continuity_proto::engine::engine_api_server::EngineApi;
use continuity_proto::engine::*;
use futures_util::Stream;
use tonic::{Request, Response, Status};

use super::workload::{Caller, attest_caller};
use crate::attestor::WorkloadAttestor;
use crate::limits::RateLimiter;
use crate::manager::Manager;
use crate::manager::cache::{EngineJwks, Snapshot};

pub use continuity_common::engine_limits::{MAX_CIPHERTEXT, MAX_PLAINTEXT};

/// The EngineAPI service.
pub struct EngineHandler {
    manager: Arc<Manager>,
    attestor: Arc<dyn WorkloadAttestor>,
    limiter: Arc<RateLimiter>,
}

/// The Engine a call acts for.
struct Bound {
    caller: Caller,
    entry_id: String,
    engine: String,
}

impl EngineHandler {
    /// A handler over the cache manager and the attestor; forwarded calls go through `limiter`.
    pub fn new(
        manager: Arc<Manager>,
        attestor: Arc<dyn WorkloadAttestor>,
        limiter: Arc<RateLimiter>,
    ) -> Self {
        Self {
            manager,
            attestor,
            limiter,
        }
    }

    /// Attests the caller and finds the Engine its entries bind it to (`requested` picks one
    /// when there are several; naming an Engine the caller is not bound to is refused).
    async fn bind<T>(&self, req: &Request<T>, requested: &str) -> Result<Bound, Status> {
        let caller = attest_caller(req, &self.attestor).await?;
        let snap = self.manager.snapshot();
        let mut bound: Vec<(String, String)> = snap
            .matching(&caller.selectors)
            .into_iter()
            .filter_map(|i| i.engine.clone().map(|e| (e, i.entry_id.clone())))
            .collect();
        bound.sort();
        bound.dedup_by(|a, b| a.0 == b.0);
        let chosen = match (requested, bound.as_slice()) {
            (_, []) => {
                return Err(Status::permission_denied(
                    "no Engine is bound to this workload's registration entries",
                ));
            }
            ("", [one]) => one.clone(),
            ("", many) => {
                let names: Vec<_> = many.iter().map(|(e, _)| e.as_str()).collect();
                return Err(Status::invalid_argument(format!(
                    "this workload is bound to several Engines ({}); name one in the request",
                    names.join(", ")
                )));
            }
            (want, all) => all
                .iter()
                .find(|(e, _)| e == want)
                .cloned()
                .ok_or_else(|| {
                    Status::permission_denied(format!(
                        "this workload is not bound to Engine {want}"
                    ))
                })?,
        };
        self.manager
            .report_incarnation(&chosen.1, &caller.workload_id, &|| caller.workload());
        Ok(Bound {
            caller,
            entry_id: chosen.1,
            engine: chosen.0,
        })
    }

    /// The broker, for a call of `b` that is about to reach the server (rate-limited).
    async fn forward(
        &self,
        b: &Bound,
    ) -> Result<
        continuity_proto::engine::engine_broker_client::EngineBrokerClient<
            tonic::transport::Channel,
        >,
        Status,
    > {
        admit(&self.limiter, b)?;
        self.broker().await
    }

    async fn broker(
        &self,
    ) -> Result<
        continuity_proto::engine::engine_broker_client::EngineBrokerClient<
            tonic::transport::Channel,
        >,
        Status,
    > {
        self.manager
            .broker()
            .await
            .map_err(|e| Status::unavailable(format!("the server is unreachable: {e}")))
    }
}

/// Takes one of `b`'s caller's tokens for a call reaching the server (ResourceExhausted if none).
fn admit(limiter: &RateLimiter, b: &Bound) -> Result<(), Status> {
    let who = b.caller.rate_key();
    limiter.admit(&who).map_err(|e| {
        tracing::debug!(caller = %who, engine = %b.engine, "EngineAPI call refused: rate limit");
        Status::resource_exhausted(format!("Engine {}: {e}", b.engine))
    })
}

/// Verifies `signature` over `message` with an SPKI of the given algorithm spelling.
pub fn verify_signature(algorithm: &str, spki: &[u8], message: &[u8], signature: &[u8]) -> bool {
    use x509_parser::prelude::FromDer;
    let alg: &'static dyn aws_lc_rs::signature::VerificationAlgorithm = match algorithm {
        "ec-p256" => &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        "rsa-2048" | "rsa-3072" => &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        _ => return false,
    };
    let Ok((_, parsed)) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki) else {
        return false;
    };
    aws_lc_rs::signature::UnparsedPublicKey::new(alg, parsed.subject_public_key.data.as_ref())
        .verify(message, signature)
        .is_ok()
}

fn jwks_of(snap: &Snapshot, engine: &str) -> EngineJwks {
    snap.engine_jwks.get(engine).cloned().unwrap_or_default()
}

type JwksStream = Pin<Box<dyn Stream<Item = Result<WatchEngineJwksResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EngineApi for EngineHandler {
    type WatchEngineJWKSStream = JwksStream;

    async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let b = self.bind(&req, &req.get_ref().engine).await?;
        let mut inner = req.into_inner();
        inner.engine = b.engine.clone();
        let r = self
            .forward(&b)
            .await?
            .sign(BrokerSign {
                entry_id: b.entry_id,
                request: Some(inner),
                workload: Some(b.caller.workload()),
            })
            .await?;
        Ok(r)
    }

    async fn verify(
        &self,
        req: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let b = self.bind(&req, &req.get_ref().engine).await?;
        let r = req.into_inner();
        let jwks = jwks_of(&self.manager.snapshot(), &b.engine);
        let candidates: Vec<_> = jwks
            .keys
            .iter()
            .filter(|k| k.key == r.key && (r.version == 0 || k.version == r.version))
            .collect();
        if candidates.is_empty() {
            return Err(Status::not_found(format!(
                "Engine {} has no enabled version{} of sign key {:?}",
                b.engine,
                if r.version == 0 {
                    String::new()
                } else {
                    format!(" {}", r.version)
                },
                r.key
            )));
        }
        let hit = candidates
            .iter()
            .find(|k| verify_signature(&k.algorithm, &k.spki, &r.message, &r.signature));
        Ok(Response::new(VerifyResponse {
            valid: hit.is_some(),
            version: hit.map_or(0, |k| k.version),
        }))
    }

    async fn encrypt(
        &self,
        req: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let len = req.get_ref().plaintext.len();
        if len > MAX_PLAINTEXT {
            return Err(Status::invalid_argument(format!(
                "plaintext is {len} bytes; at most {MAX_PLAINTEXT} (64 KiB, Cloud KMS's cap)"
            )));
        }
        let b = self.bind(&req, &req.get_ref().engine).await?;
        let mut inner = req.into_inner();
        inner.engine = b.engine.clone();
        self.forward(&b)
            .await?
            .encrypt(BrokerEncrypt {
                entry_id: b.entry_id,
                request: Some(inner),
                workload: Some(b.caller.workload()),
            })
            .await
    }

    async fn decrypt(
        &self,
        req: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let b = self.bind(&req, &req.get_ref().engine).await?;
        let mut inner = req.into_inner();
        inner.engine = b.engine.clone();
        self.forward(&b)
            .await?
            .decrypt(BrokerDecrypt {
                entry_id: b.entry_id,
                request: Some(inner),
                workload: Some(b.caller.workload()),
            })
            .await
    }

    async fn get_public_key(
        &self,
        req: Request<GetPublicKeyRequest>,
    ) -> Result<Response<GetPublicKeyResponse>, Status> {
        let b = self.bind(&req, &req.get_ref().engine).await?;
        let r = req.into_inner();
        // From the cache when possible (works offline), else from the server.
        let jwks = jwks_of(&self.manager.snapshot(), &b.engine);
        let cached = jwks
            .keys
            .iter()
            .filter(|k| k.key == r.key && (r.version == 0 || k.version == r.version))
            .max_by_key(|k| k.version);
        if let Some(k) = cached.filter(|_| r.version != 0) {
            return Ok(Response::new(GetPublicKeyResponse {
                pem: continuity_common::x509::pem_encode("PUBLIC KEY", &k.spki),
                version: k.version,
                algorithm: k.algorithm.clone(),
                kid: k.kid.clone(),
            }));
        }
        let mut inner = r;
        inner.engine = b.engine.clone();
        self.forward(&b)
            .await?
            .get_public_key(BrokerGetPublicKey {
                entry_id: b.entry_id,
                request: Some(inner),
            })
            .await
    }

    async fn generate_data_key(
        &self,
        req: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        let b = self.bind(&req, &req.get_ref().engine).await?;
        let mut inner = req.into_inner();
        inner.engine = b.engine.clone();
        self.forward(&b)
            .await?
            .generate_data_key(BrokerGenerateDataKey {
                entry_id: b.entry_id,
                request: Some(inner),
                workload: Some(b.caller.workload()),
            })
            .await
    }

    async fn rewrap(
        &self,
        req: Request<RewrapRequest>,
    ) -> Result<Response<RewrapResponse>, Status> {
        let len = req.get_ref().ciphertext.len();
        if len > MAX_CIPHERTEXT {
            return Err(Status::invalid_argument(format!(
                "ciphertext is {len} bytes; at most {MAX_CIPHERTEXT} (a ciphertext of 64 KiB)"
            )));
        }
        let b = self.bind(&req, &req.get_ref().engine).await?;
        let mut inner = req.into_inner();
        inner.engine = b.engine.clone();
        self.forward(&b)
            .await?
            .rewrap(BrokerRewrap {
                entry_id: b.entry_id,
                request: Some(inner),
                workload: Some(b.caller.workload()),
            })
            .await
    }

    async fn fetch_secret(
        &self,
        req: Request<FetchSecretRequest>,
    ) -> Result<Response<FetchSecretResponse>, Status> {
        let b = self.bind(&req, &req.get_ref().engine).await?;
        let mut inner = req.into_inner();
        inner.engine = b.engine.clone();
        self.forward(&b)
            .await?
            .fetch_secret(BrokerFetchSecret {
                entry_id: b.entry_id,
                request: Some(inner),
                workload: Some(b.caller.workload()),
            })
            .await
    }

    async fn watch_engine_jwks(
        &self,
        req: Request<WatchEngineJwksRequest>,
    ) -> Result<Response<Self::WatchEngineJWKSStream>, Status> {
        let b = self.bind(&req, &req.get_ref().engine).await?;
        let mut rx = self.manager.subscribe();
        let first = jwks_of(&rx.borrow_and_update(), &b.engine);
        let engine = b.engine.clone();
        let msg = |engine: &str, j: &EngineJwks| WatchEngineJwksResponse {
            engine: engine.to_string(),
            jwks: j.jwks.clone().into_bytes(),
        };
        let first_msg = msg(&engine, &first);
        // The stream holds the call's guard: the connection stays busy while it is watched.
        let call = b.caller.call.clone();
        let stream = futures_util::stream::unfold(
            (rx, Some(first_msg), first, call),
            move |(mut rx, pending, last, call)| {
                let engine = engine.clone();
                async move {
                    if let Some(m) = pending {
                        return Some((Ok(m), (rx, None, last, call)));
                    }
                    loop {
                        rx.changed().await.ok()?;
                        let now = jwks_of(&rx.borrow_and_update(), &engine);
                        if now != last {
                            let m = msg(&engine, &now);
                            return Some((Ok(m), (rx, None, now, call)));
                        }
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}
