//! The `AuthorityAdmin` service: forced rotation of the trust domain's authorities
//! (`continuity-server authority x509|jwt ...`). Every change, and every refusal, is audited.

use continuity_proto::admin::authority_admin_server::AuthorityAdmin;
use continuity_proto::admin::{
    AuthorityChangeResponse, AuthorityIdRequest, GetAuthorityStateRequest,
    GetAuthorityStateResponse, PrepareAuthorityRequest,
};
use continuity_proto::admin::{AuthorityKind as WireKind, AuthorityState as WireState};
use tonic::{Request, Response, Status};

use super::admin::AdminService;
use crate::ca::{AuthorityError, AuthorityKind, AuthorityState};

fn kind_of(k: i32) -> Result<AuthorityKind, Status> {
    match WireKind::try_from(k) {
        Ok(WireKind::X509) => Ok(AuthorityKind::X509),
        Ok(WireKind::Jwt) => Ok(AuthorityKind::Jwt),
        _ => Err(Status::invalid_argument(
            "kind must be AUTHORITY_KIND_X509 or AUTHORITY_KIND_JWT",
        )),
    }
}

fn kind_name(k: AuthorityKind) -> &'static str {
    match k {
        AuthorityKind::X509 => "x509",
        AuthorityKind::Jwt => "jwt",
    }
}

fn to_wire(s: AuthorityState) -> WireState {
    WireState {
        authority_id: s.authority_id,
        expires_at: s.expires_at,
        state: s.state.into(),
    }
}

fn status_of(e: &AuthorityError) -> Status {
    match e {
        AuthorityError::MissingId | AuthorityError::Invalid(_) => {
            Status::invalid_argument(e.to_string())
        }
        AuthorityError::Unknown(..) => Status::not_found(e.to_string()),
        AuthorityError::Precondition(_) => Status::failed_precondition(e.to_string()),
        AuthorityError::Ca(_) => Status::unavailable(format!("authority change failed: {e}")),
    }
}

impl AdminService {
    /// Audits the outcome of `action` on `target` (its refusal reason when it failed) and maps
    /// it to the RPC answer.
    async fn audited(
        &self,
        actor: &str,
        action: String,
        target: &str,
        outcome: Result<AuthorityState, AuthorityError>,
    ) -> Result<Response<AuthorityChangeResponse>, Status> {
        let (result, answer) = match outcome {
            Ok(s) => ("ok".to_string(), Ok(s)),
            Err(e) => (format!("refused: {e}"), Err(status_of(&e))),
        };
        let target = match &answer {
            Ok(s) => s.authority_id.clone(),
            Err(_) => target.to_string(),
        };
        self.engines
            .audit()
            .record(actor, &action, &target, 0, &result)
            .await
            .map_err(|e| Status::unavailable(format!("audit log unavailable: {e}")))?;
        answer.map(|s| {
            Response::new(AuthorityChangeResponse {
                authority: Some(to_wire(s)),
            })
        })
    }

    /// Audits a request refused before it reached the CA (malformed) and answers `e`.
    async fn refuse(
        &self,
        actor: &str,
        action: String,
        target: &str,
        e: Status,
    ) -> Result<Response<AuthorityChangeResponse>, Status> {
        let outcome = Err(AuthorityError::Invalid(e.message().to_string()));
        self.audited(actor, action, target, outcome).await
    }

    /// Runs one ID-taking step (`activate`, `taint`, `revoke`), audited.
    async fn by_id(
        &self,
        req: Request<AuthorityIdRequest>,
        step: &'static str,
    ) -> Result<Response<AuthorityChangeResponse>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let kind = match kind_of(r.kind) {
            Ok(k) => k,
            Err(e) => {
                return self
                    .refuse(&actor, format!("authority.{step}"), "", e)
                    .await;
            }
        };
        let id = r.authority_id.trim();
        if id.len() > 256 {
            // Audited under its first 64 characters: the log is no place for a huge argument.
            let shown: String = id.chars().take(64).collect();
            let action = format!("authority.{}.{step}", kind_name(kind));
            let e = Status::invalid_argument("authority_id is longer than 256 bytes");
            return self.refuse(&actor, action, &shown, e).await;
        }
        let outcome = match step {
            "activate" => self.ca.activate_authority(kind, id).await,
            "taint" => self.ca.taint_authority(kind, id).await,
            _ => self.revoke(kind, id, r.force).await,
        };
        let mut action = format!("authority.{}.{step}", kind_name(kind));
        if step == "revoke" && r.force {
            action.push_str(".forced");
        }
        self.audited(&actor, action, id, outcome).await
    }

    /// Revokes `id` once no live agent may still serve what it signed (unless `force`): every
    /// agent must have reported, at the current bundle, SVIDs signed by other authorities only.
    async fn revoke(
        &self,
        kind: AuthorityKind,
        id: &str,
        force: bool,
    ) -> Result<AuthorityState, AuthorityError> {
        if !force && !id.is_empty() {
            let blockers = self
                .serving
                .blockers(
                    kind,
                    id,
                    &self.registry.agents(),
                    self.ca.bundle().sequence,
                    self.clock.unix(),
                )
                .await
                .map_err(|e| AuthorityError::Ca(e.into()))?;
            if !blockers.is_empty() {
                // Say first what else is wrong (unknown, untainted), then who blocks.
                self.ca.check_revocable(kind, id).await?;
                return Err(AuthorityError::Precondition(
                    blockers.describe(kind_name(kind), id),
                ));
            }
        }
        self.ca.revoke_authority(kind, id).await
    }
}

#[tonic::async_trait]
impl AuthorityAdmin for AdminService {
    async fn get_authority_state(
        &self,
        req: Request<GetAuthorityStateRequest>,
    ) -> Result<Response<GetAuthorityStateResponse>, Status> {
        self.authorize(&req)?;
        let kind = kind_of(req.get_ref().kind)?;
        let slots = self
            .ca
            .authority_slots(kind)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(GetAuthorityStateResponse {
            active: slots.active.map(to_wire),
            prepared: slots.prepared.map(to_wire),
            old: slots.old.map(to_wire),
        }))
    }

    async fn prepare_authority(
        &self,
        req: Request<PrepareAuthorityRequest>,
    ) -> Result<Response<AuthorityChangeResponse>, Status> {
        let actor = self.authorize(&req)?;
        let kind = match kind_of(req.get_ref().kind) {
            Ok(k) => k,
            Err(e) => return self.refuse(&actor, "authority.prepare".into(), "", e).await,
        };
        let outcome = self.ca.prepare_authority(kind).await;
        let action = format!("authority.{}.prepare", kind_name(kind));
        self.audited(&actor, action, "", outcome).await
    }

    async fn activate_authority(
        &self,
        req: Request<AuthorityIdRequest>,
    ) -> Result<Response<AuthorityChangeResponse>, Status> {
        self.by_id(req, "activate").await
    }

    async fn taint_authority(
        &self,
        req: Request<AuthorityIdRequest>,
    ) -> Result<Response<AuthorityChangeResponse>, Status> {
        self.by_id(req, "taint").await
    }

    async fn revoke_authority(
        &self,
        req: Request<AuthorityIdRequest>,
    ) -> Result<Response<AuthorityChangeResponse>, Status> {
        self.by_id(req, "revoke").await
    }
}
