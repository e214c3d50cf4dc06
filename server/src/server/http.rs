//! The server's optional HTTP listeners: health (`/live`, `/ready`), Prometheus metrics and
//! Engine JWKS for relying parties, and the OIDC discovery provider.

use std::sync::Arc;

use continuity_common::http::Reply;

use super::{Core, RunError};
use crate::config::Config;
use crate::datastore::DataStore;
use crate::engines::Engines;
use crate::integrity;
use crate::metrics::Metrics;

/// The optional HTTP listeners: health (`/live`, `/ready`), metrics and Engine JWKS.
pub(super) async fn http_listeners(cfg: &Config, core: &Core) -> Result<(), RunError> {
    let bind = |key: &str, addr: std::net::SocketAddr| {
        let what = format!("{key} {addr}");
        move |source| RunError::Bind { what, source }
    };
    if let Some(addr) = cfg.health_address {
        let store = core.store.clone();
        continuity_common::http::serve(addr, move |path| health_reply(store.clone(), path))
            .await
            .map_err(bind("health.bind_address", addr))?;
    }
    if let Some(addr) = cfg.metrics_address {
        let metrics = core.metrics.clone();
        continuity_common::http::serve(addr, move |path| {
            std::future::ready(metrics_reply(&metrics, &path))
        })
        .await
        .map_err(bind("metrics.bind_address", addr))?;
    }
    if let Some(addr) = cfg.jwks_address {
        let engines = core.engines.clone();
        continuity_common::http::serve(addr, move |path| {
            std::future::ready(jwks_reply(&engines, &path))
        })
        .await
        .map_err(bind("jwks.bind_address", addr))?;
    }
    if let Some(oidc) = cfg.oidc_discovery.clone() {
        let ca = core.ca.clone();
        let addr = oidc.bind_address;
        continuity_common::http::serve(addr, move |path| {
            std::future::ready(super::oidc::reply(&oidc, &ca, &path))
        })
        .await
        .map_err(bind("oidc_discovery.bind_address", addr))?;
    }
    Ok(())
}

/// `/live` always; `/ready` while the datastore answers and no row is known to have failed
/// its record MAC.
async fn health_reply(store: Arc<dyn DataStore>, path: String) -> Reply {
    match path.as_str() {
        "/live" => (200, "text/plain", "live\n".into()),
        "/ready" => match store.ping().await {
            Ok(()) => match integrity::degraded(&store.bad_rows()) {
                None => (200, "text/plain", "ready\n".into()),
                Some(why) => (503, "text/plain", why),
            },
            Err(e) => (503, "text/plain", format!("datastore unavailable: {e}\n")),
        },
        _ => (404, "text/plain", "not found\n".into()),
    }
}

/// `/metrics` in the Prometheus text format.
fn metrics_reply(metrics: &Metrics, path: &str) -> Reply {
    match path {
        "/metrics" => (200, "text/plain; version=0.0.4", metrics.render()),
        _ => (404, "text/plain", "not found\n".into()),
    }
}

/// `/engines/<name>/jwks.json`: an Engine's public signing keys.
fn jwks_reply(engines: &Engines, path: &str) -> Reply {
    match path
        .strip_prefix("/engines/")
        .and_then(|p| p.strip_suffix("/jwks.json"))
    {
        Some(name) => match engines.jwks(name) {
            Ok(j) => (200, "application/json", j.to_string()),
            Err(e) => (404, "text/plain", format!("{e}\n")),
        },
        None => (404, "text/plain", "GET /engines/<name>/jwks.json\n".into()),
    }
}
