//! `IntegrityAdmin` on the admin socket: `integrity verify`.

use std::sync::Arc;

use continuity_proto::admin::integrity_admin_server::IntegrityAdmin;
use continuity_proto::admin::{BadRow, VerifyIntegrityRequest, VerifyIntegrityResponse};
use tonic::{Request, Response, Status};

use crate::api::admin::AdminService;
use crate::datastore::DataStore;

/// The integrity admin service: the admin API's caller check, and the datastore.
#[derive(Clone)]
pub struct IntegrityService {
    /// Authorizes callers (the server's uid or root).
    pub admin: AdminService,
    /// The datastore to verify.
    pub store: Arc<dyn DataStore>,
}

#[tonic::async_trait]
impl IntegrityAdmin for IntegrityService {
    async fn verify_integrity(
        &self,
        req: Request<VerifyIntegrityRequest>,
    ) -> Result<Response<VerifyIntegrityResponse>, Status> {
        self.admin.authorize(&req)?;
        let report = super::verify(&*self.store)
            .await
            .map_err(|e| crate::api::store_status(&e))?;
        Ok(Response::new(VerifyIntegrityResponse {
            rows: report.rows,
            bad_rows: report
                .bad
                .into_iter()
                .map(|b| BadRow {
                    table: b.table,
                    key: b.key,
                    reason: b.reason,
                })
                .collect(),
        }))
    }
}
