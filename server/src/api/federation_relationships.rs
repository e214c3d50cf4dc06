//! `FederationAdmin` on the admin socket: `federation create|list|show|update|delete|refresh`.

use std::sync::Arc;

use continuity_proto::admin::federation_admin_server::{FederationAdmin, FederationAdminServer};
use continuity_proto::admin::{
    BundleDocumentFormat, DeleteFederationRelationshipResponse, FederationRelationship,
    GetFederationRelationshipRequest, ListFederationRelationshipsRequest,
    ListFederationRelationshipsResponse, RefreshFederationRelationshipResponse,
};
use tonic::{Request, Response, Status};

use crate::api::admin::AdminService;
use crate::api::federation::{federates_with, federation_status, trust_domain};
use crate::api::{bundle_to_proto, to_completion};
use crate::ca::Bundle;
use crate::federation::refresher::{RefreshError, Refresher};
use crate::federation::{BundleFormat, Federation, FederationError, parse_bundle};
use crate::trust_bundle::Relationship;

/// Most federating entries named in a delete's warning.
const MAX_WARNED: usize = 20;

/// The relationship admin service.
#[derive(Clone)]
pub struct FederationService {
    /// Authorizes callers and knows the entries.
    pub admin: AdminService,
    /// The bundles and relationships.
    pub federation: Arc<Federation>,
    /// Fetches endpoints (`federation refresh`).
    pub refresher: Arc<Refresher>,
}

impl FederationService {
    /// The tonic server of this service.
    pub fn server(self) -> FederationAdminServer<Self> {
        FederationAdminServer::new(self)
    }

    fn to_proto(&self, r: &Relationship) -> FederationRelationship {
        FederationRelationship {
            trust_domain: r.trust_domain.name().to_string(),
            bundle_endpoint_url: r.bundle_endpoint_url.clone(),
            bundle_endpoint_profile: r.auth.profile().to_string(),
            endpoint_spiffe_id: r.auth.endpoint_spiffe_id(),
            trust_domain_bundle: Vec::new(),
            trust_domain_bundle_format: 0,
            bundle: self
                .federation
                .bundle(&r.trust_domain)
                .map(|b| bundle_to_proto(&b)),
        }
    }

    /// Validates a request into a relationship and its optional initial bundle.
    fn parse(r: &FederationRelationship) -> Result<(Relationship, Option<Bundle>), Status> {
        let rel = Relationship::new(
            &r.trust_domain,
            &r.bundle_endpoint_url,
            &r.bundle_endpoint_profile,
            &r.endpoint_spiffe_id,
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.trust_domain_bundle.is_empty() {
            return Ok((rel, None));
        }
        let format = match BundleDocumentFormat::try_from(r.trust_domain_bundle_format) {
            Ok(BundleDocumentFormat::Pem) => BundleFormat::Pem,
            Ok(BundleDocumentFormat::Spiffe) => BundleFormat::Spiffe,
            Err(_) => {
                return Err(Status::invalid_argument(
                    "trust_domain_bundle_format: unknown bundle format",
                ));
            }
        };
        let b = parse_bundle(&rel.trust_domain, &r.trust_domain_bundle, format).map_err(|e| {
            Status::invalid_argument(format!(
                "trust_domain_bundle: bundle of {}: {e}",
                rel.trust_domain
            ))
        })?;
        Ok((rel, Some(b)))
    }

    async fn put(
        &self,
        req: Request<FederationRelationship>,
        create: bool,
    ) -> Result<Response<FederationRelationship>, Status> {
        let actor = self.admin.authorize(&req)?;
        let (rel, initial) = Self::parse(req.get_ref())?;
        let (federation, stored) = (self.federation.clone(), rel.clone());
        to_completion(async move {
            let r = if create {
                federation
                    .create_relationship(stored, initial, &actor)
                    .await
            } else {
                federation
                    .update_relationship(stored, initial, &actor)
                    .await
            };
            r.map_err(federation_status)
        })
        .await?;
        self.refresher.reschedule(&rel.trust_domain);
        tracing::info!(trust_domain = %rel.trust_domain, url = %rel.bundle_endpoint_url, create, "federation relationship stored");
        Ok(Response::new(self.to_proto(&rel)))
    }
}

#[tonic::async_trait]
impl FederationAdmin for FederationService {
    async fn create_federation_relationship(
        &self,
        req: Request<FederationRelationship>,
    ) -> Result<Response<FederationRelationship>, Status> {
        self.put(req, true).await
    }

    async fn update_federation_relationship(
        &self,
        req: Request<FederationRelationship>,
    ) -> Result<Response<FederationRelationship>, Status> {
        self.put(req, false).await
    }

    async fn list_federation_relationships(
        &self,
        req: Request<ListFederationRelationshipsRequest>,
    ) -> Result<Response<ListFederationRelationshipsResponse>, Status> {
        self.admin.authorize(&req)?;
        Ok(Response::new(ListFederationRelationshipsResponse {
            relationships: self
                .federation
                .relationships()
                .iter()
                .map(|r| self.to_proto(r))
                .collect(),
        }))
    }

    async fn get_federation_relationship(
        &self,
        req: Request<GetFederationRelationshipRequest>,
    ) -> Result<Response<FederationRelationship>, Status> {
        self.admin.authorize(&req)?;
        let td = trust_domain(&req.get_ref().trust_domain)?;
        let r = self
            .federation
            .relationship(&td)
            .ok_or_else(|| federation_status(FederationError::NoRelationship(td)))?;
        Ok(Response::new(self.to_proto(&r)))
    }

    async fn delete_federation_relationship(
        &self,
        req: Request<GetFederationRelationshipRequest>,
    ) -> Result<Response<DeleteFederationRelationshipResponse>, Status> {
        let actor = self.admin.authorize(&req)?;
        let td = trust_domain(&req.get_ref().trust_domain)?;
        let federating: Vec<String> = self
            .admin
            .registry
            .entries(|e| federates_with(&e.federates_with, &td))
            .iter()
            .take(MAX_WARNED)
            .map(|e| e.id.clone())
            .collect();
        let (federation, target) = (self.federation.clone(), td.clone());
        to_completion(async move {
            federation
                .delete_relationship(&target, &actor)
                .await
                .map_err(federation_status)
        })
        .await?;
        tracing::info!(trust_domain = %td, federating = federating.len(), "federation relationship and its bundle deleted");
        Ok(Response::new(DeleteFederationRelationshipResponse {
            federating_entries: federating,
        }))
    }

    async fn refresh_federation_relationship(
        &self,
        req: Request<GetFederationRelationshipRequest>,
    ) -> Result<Response<RefreshFederationRelationshipResponse>, Status> {
        let actor = self.admin.authorize(&req)?;
        let td = trust_domain(&req.get_ref().trust_domain)?;
        let refresher = self.refresher.clone();
        let target = td.clone();
        let r = to_completion(async move {
            refresher
                .refresh(&target, &actor)
                .await
                .map_err(|e| match e {
                    RefreshError::NoRelationship(_) => Status::not_found(e.to_string()),
                    e => Status::unavailable(e.to_string()),
                })
        })
        .await?;
        let bundle = self.federation.bundle(&td).map(|b| bundle_to_proto(&b));
        Ok(Response::new(RefreshFederationRelationshipResponse {
            updated: r.updated,
            bundle,
            next_refresh_in: i64::try_from(r.next_in.as_secs()).unwrap_or(i64::MAX),
        }))
    }
}
