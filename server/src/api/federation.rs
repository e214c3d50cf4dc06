//! `FederatedBundleAdmin` on the admin socket: `bundle set|list|show --id|delete`.

use std::sync::Arc;

use continuity_common::TrustDomain;
use continuity_proto::admin::federated_bundle_admin_server::{
    FederatedBundleAdmin, FederatedBundleAdminServer,
};
use continuity_proto::admin::{
    BundleDocumentFormat, DeleteFederatedBundleRequest, DeleteFederatedBundleResponse,
    GetFederatedBundleRequest, ListFederatedBundlesRequest, ListFederatedBundlesResponse,
    SetFederatedBundleRequest,
};
use continuity_proto::types;
use tonic::{Request, Response, Status};

use crate::api::admin::AdminService;
use crate::api::{bundle_to_proto, store_status, to_completion};
use crate::federation::{BundleFormat, Federation, FederationError, parse_bundle};

/// The foreign-bundle admin service: the admin API's caller check, entries (to refuse deleting
/// a bundle in use) and the bundles.
#[derive(Clone)]
pub struct FederatedBundleService {
    /// Authorizes callers and knows the entries.
    pub admin: AdminService,
    /// The foreign bundles.
    pub federation: Arc<Federation>,
}

impl FederatedBundleService {
    /// The tonic server of this service.
    pub fn server(self) -> FederatedBundleAdminServer<Self> {
        FederatedBundleAdminServer::new(self)
    }
}

/// A trust domain from a request field, or InvalidArgument naming the field.
pub fn trust_domain(s: &str) -> Result<TrustDomain, Status> {
    TrustDomain::new(s).map_err(|e| Status::invalid_argument(format!("trust_domain: {e}")))
}

/// Maps a refused federation change to its gRPC status.
pub fn federation_status(e: FederationError) -> Status {
    match e {
        FederationError::OwnTrustDomain(_) => Status::invalid_argument(e.to_string()),
        FederationError::NotFound(_) => Status::not_found(e.to_string()),
        FederationError::InUse { .. } | FederationError::StaleSequence { .. } => {
            Status::failed_precondition(e.to_string())
        }
        FederationError::RelationshipExists(_) => Status::already_exists(e.to_string()),
        FederationError::NoRelationship(_) => Status::not_found(e.to_string()),
        FederationError::NeedsBundle(_) => Status::invalid_argument(e.to_string()),
        FederationError::Store(s) => store_status(&s),
    }
}

#[tonic::async_trait]
impl FederatedBundleAdmin for FederatedBundleService {
    async fn set_federated_bundle(
        &self,
        req: Request<SetFederatedBundleRequest>,
    ) -> Result<Response<types::Bundle>, Status> {
        let actor = self.admin.authorize(&req)?;
        let r = req.into_inner();
        let td = trust_domain(&r.trust_domain)?;
        let format = match BundleDocumentFormat::try_from(r.format) {
            Ok(BundleDocumentFormat::Pem) => BundleFormat::Pem,
            Ok(BundleDocumentFormat::Spiffe) => BundleFormat::Spiffe,
            Err(_) => return Err(Status::invalid_argument("format: unknown bundle format")),
        };
        let bundle = parse_bundle(&td, &r.document, format)
            .map_err(|e| Status::invalid_argument(format!("bundle of {td}: {e}")))?;
        let federation = self.federation.clone();
        let stored = to_completion(async move {
            federation
                .set(bundle, &actor)
                .await
                .map_err(federation_status)
        })
        .await?;
        tracing::info!(trust_domain = %td, "foreign bundle set");
        Ok(Response::new(bundle_to_proto(&stored)))
    }

    async fn list_federated_bundles(
        &self,
        req: Request<ListFederatedBundlesRequest>,
    ) -> Result<Response<ListFederatedBundlesResponse>, Status> {
        self.admin.authorize(&req)?;
        Ok(Response::new(ListFederatedBundlesResponse {
            bundles: self
                .federation
                .bundles()
                .iter()
                .map(|b| bundle_to_proto(b))
                .collect(),
        }))
    }

    async fn get_federated_bundle(
        &self,
        req: Request<GetFederatedBundleRequest>,
    ) -> Result<Response<types::Bundle>, Status> {
        self.admin.authorize(&req)?;
        let td = trust_domain(&req.get_ref().trust_domain)?;
        let b = self
            .federation
            .bundle(&td)
            .ok_or_else(|| federation_status(FederationError::NotFound(td)))?;
        Ok(Response::new(bundle_to_proto(&b)))
    }

    async fn delete_federated_bundle(
        &self,
        req: Request<DeleteFederatedBundleRequest>,
    ) -> Result<Response<DeleteFederatedBundleResponse>, Status> {
        let actor = self.admin.authorize(&req)?;
        let td = trust_domain(&req.get_ref().trust_domain)?;
        let federating: Vec<String> = self
            .admin
            .registry
            .entries(|e| federates_with(&e.federates_with, &td))
            .iter()
            .map(|e| e.id.clone())
            .collect();
        let (federation, target) = (self.federation.clone(), td.clone());
        to_completion(async move {
            federation
                .delete(&target, federating, &actor)
                .await
                .map_err(federation_status)
        })
        .await?;
        tracing::info!(trust_domain = %td, "foreign bundle deleted");
        Ok(Response::new(DeleteFederatedBundleResponse {}))
    }
}

/// Whether a `federates_with` list names `td` (in either spelling).
pub fn federates_with(list: &[String], td: &TrustDomain) -> bool {
    list.iter()
        .any(|s| TrustDomain::new(s).is_ok_and(|t| t == *td))
}
