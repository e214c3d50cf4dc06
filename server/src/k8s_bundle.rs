//! The bundle publisher: keeps a Kubernetes ConfigMap holding the trust bundle (its X.509
//! authorities as PEM) up to date through the API server, as SPIRE's k8sbundle notifier does, so
//! agents bootstrap from a mounted file that never goes stale.
//!
//! It publishes on start and on every bundle change the CA reports (a rotation here, or one
//! another server made, read through the change feed): a merge PATCH of the one key, creating
//! the ConfigMap when the API server says it is missing. A failure is retried with back-off
//! (0.5 s doubling to 30 s); a newer bundle arriving meanwhile is published at once instead.
//! Without a change it publishes again every `refresh_interval`, so a ConfigMap someone edited
//! or deleted holds the bundle again within that period.

use std::sync::Arc;
use std::time::Duration;

use continuity_common::https::{self, ServerTrust};
use tokio::sync::watch;

use crate::ca::Bundle;
use crate::config::K8sBundleConfig;

/// First retry delay after a failed publish.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Timeout of one API request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest API server response read (a ConfigMap holding a bundle is a few kB).
const MAX_RESPONSE: usize = 1 << 20;

/// Why one publish failed (retried).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The CA or token file could not be read or used.
    #[error("k8s_bundle: {0}")]
    Credentials(String),
    /// The request did not complete.
    #[error("k8s_bundle: {0}")]
    Http(#[from] https::HttpError),
    /// The blocking publish task did not finish (it panicked or was cancelled).
    #[error("k8s_bundle: publish task: {0}")]
    Task(String),
    /// The API server refused the request.
    #[error("k8s_bundle: {method} {path}: API server answered {status}")]
    Status {
        /// The HTTP method.
        method: &'static str,
        /// The request path.
        path: String,
        /// The status code.
        status: u16,
    },
}

/// Starts the publisher task for `bundles` (the CA's watch); it ends when the CA is dropped.
pub fn spawn(
    cfg: K8sBundleConfig,
    bundles: watch::Receiver<Arc<Bundle>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(publish_changes(Arc::new(cfg), bundles))
}

/// Publishes the current bundle, then each change, retrying failures with back-off.
async fn publish_changes(cfg: Arc<K8sBundleConfig>, mut bundles: watch::Receiver<Arc<Bundle>>) {
    let mut backoff = FIRST_BACKOFF;
    let mut published: Option<String> = None;
    // What the last successful publish wrote (the refresh clears `published`, not this).
    let mut announced: Option<String> = None;
    loop {
        let pem = bundle_pem(&bundles.borrow_and_update());
        // Unchanged X.509 authorities (a JWT key change) or none yet: nothing to write until
        // the next change or, once published, the refresh that restores an edited ConfigMap.
        if pem.is_empty() || published.as_deref() == Some(pem.as_str()) {
            tokio::select! {
                r = bundles.changed() => if r.is_err() { return },
                () = tokio::time::sleep(cfg.refresh_interval), if !pem.is_empty() => {
                    published = None;
                }
            }
            continue;
        }
        let (c, p) = (cfg.clone(), pem.clone());
        let outcome = tokio::task::spawn_blocking(move || publish(&c, &p))
            .await
            .unwrap_or_else(|e| Err(PublishError::Task(e.to_string())));
        match outcome {
            Ok(()) => {
                if announced.as_deref() == Some(pem.as_str()) {
                    tracing::debug!(namespace = %cfg.namespace, config_map = %cfg.config_map, "ConfigMap refreshed");
                } else {
                    tracing::info!(namespace = %cfg.namespace, config_map = %cfg.config_map, "bundle published to the ConfigMap");
                    announced = Some(pem.clone());
                }
                published = Some(pem);
                backoff = FIRST_BACKOFF;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "bundle not published; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    r = bundles.changed() => if r.is_err() { return },
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// The bundle's X.509 authorities as concatenated PEM certificates (as `bundle show` prints).
pub fn bundle_pem(b: &Bundle) -> String {
    b.x509_authorities
        .iter()
        .map(|c| continuity_common::x509::pem_encode("CERTIFICATE", c))
        .collect()
}

/// One publish: merge-PATCH the key; on 404 create the ConfigMap; on 409 (created meanwhile)
/// PATCH again once.
fn publish(cfg: &K8sBundleConfig, pem: &str) -> Result<(), PublishError> {
    let ca = std::fs::read_to_string(&cfg.ca_path).map_err(|e| {
        PublishError::Credentials(format!("ca_path {}: {e}", cfg.ca_path.display()))
    })?;
    let roots = continuity_common::x509::pem_decode_all("CERTIFICATE", &ca).map_err(|e| {
        PublishError::Credentials(format!("ca_path {}: {e}", cfg.ca_path.display()))
    })?;
    if roots.is_empty() {
        return Err(PublishError::Credentials(format!(
            "ca_path {}: no certificate",
            cfg.ca_path.display()
        )));
    }
    let token = std::fs::read_to_string(&cfg.token_path).map_err(|e| {
        PublishError::Credentials(format!("token_path {}: {e}", cfg.token_path.display()))
    })?;
    let api = Api {
        cfg,
        trust: ServerTrust::Roots(roots),
        token: token.trim(),
    };
    let patch = serde_json::json!({"data": {cfg.key.as_str(): pem}});
    match api.send(
        "PATCH",
        &api.item_path(),
        "application/merge-patch+json",
        &patch,
    )? {
        200 | 201 => return Ok(()),
        404 => {}
        status => return Err(refused("PATCH", api.item_path(), status)),
    }
    let object = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": cfg.config_map, "namespace": cfg.namespace},
        "data": {cfg.key.as_str(): pem},
    });
    let collection = format!("/api/v1/namespaces/{}/configmaps", cfg.namespace);
    match api.send("POST", &collection, "application/json", &object)? {
        200 | 201 => Ok(()),
        409 => match api.send(
            "PATCH",
            &api.item_path(),
            "application/merge-patch+json",
            &patch,
        )? {
            200 | 201 => Ok(()),
            status => Err(refused("PATCH", api.item_path(), status)),
        },
        status => Err(refused("POST", collection, status)),
    }
}

/// The API server as one publish sees it.
struct Api<'a> {
    cfg: &'a K8sBundleConfig,
    trust: ServerTrust,
    token: &'a str,
}

impl Api<'_> {
    /// The ConfigMap's path.
    fn item_path(&self) -> String {
        format!(
            "/api/v1/namespaces/{}/configmaps/{}",
            self.cfg.namespace, self.cfg.config_map
        )
    }

    /// Sends `body` and returns the status (the response body is not needed).
    fn send(
        &self,
        method: &'static str,
        path: &str,
        content_type: &str,
        body: &serde_json::Value,
    ) -> Result<u16, PublishError> {
        let bytes = body.to_string().into_bytes();
        let r = https::request_capped(
            method,
            &format!("{}{path}", self.cfg.api_server),
            &self.trust,
            Some(self.token),
            Some((content_type, &bytes)),
            REQUEST_TIMEOUT,
            MAX_RESPONSE,
        )?;
        Ok(r.status)
    }
}

/// A refusal of `method path` with `status`.
fn refused(method: &'static str, path: String, status: u16) -> PublishError {
    PublishError::Status {
        method,
        path,
        status,
    }
}
