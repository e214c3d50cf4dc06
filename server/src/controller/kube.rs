//! The few Kubernetes API server calls the controller makes: list a collection, and watch it
//! from a resourceVersion. Blocking (the small HTTPS client); the caller runs them on the
//! blocking pool. Every object is JSON from the network, checked by the caller's types.

use std::path::PathBuf;
use std::time::Duration;

use continuity_common::https::{self, ServerTrust};
use continuity_common::https_stream::{self, StreamEnd};
use serde::Deserialize;
use serde_json::Value;

use super::ControllerError;
use crate::config::ControllerConfig;

/// How long a list may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the API server keeps one watch open (it then ends it; the controller resumes).
const WATCH_SECONDS: u64 = 300;
/// Largest watch event accepted.
const MAX_EVENT: usize = 4 * 1024 * 1024;

/// A collection the controller follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `/api/v1/pods`.
    Pods,
    /// `/api/v1/namespaces`.
    Namespaces,
    /// `/apis/continuity.dev/v1alpha1/clusterspiffeids`.
    ClusterSpiffeIds,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 3] = [Kind::Pods, Kind::Namespaces, Kind::ClusterSpiffeIds];

    fn path(self) -> &'static str {
        match self {
            Kind::Pods => "/api/v1/pods",
            Kind::Namespaces => "/api/v1/namespaces",
            Kind::ClusterSpiffeIds => "/apis/continuity.dev/v1alpha1/clusterspiffeids",
        }
    }
}

/// One change seen on a watch.
#[derive(Debug)]
pub enum Event {
    /// ADDED or MODIFIED.
    Upsert(Value),
    /// DELETED.
    Delete(Value),
}

/// How a watch ended without a transport error.
#[derive(Debug, PartialEq, Eq)]
pub enum WatchEnd {
    /// The server ended it: resume from the last resourceVersion.
    Ended,
    /// 410 Gone: that resourceVersion is too old; list again.
    Gone,
}

/// A list response's envelope.
#[derive(Deserialize)]
struct List {
    #[serde(default)]
    metadata: ListMeta,
    #[serde(default)]
    items: Vec<Value>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    #[serde(default)]
    resource_version: String,
}

/// One watch line.
#[derive(Deserialize)]
struct WatchLine {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    object: Value,
}

/// Talks to one API server with one service account token.
#[derive(Debug)]
pub struct Client {
    base: String,
    trust: ServerTrust,
    token_file: PathBuf,
}

impl Client {
    /// Reads the CA bundle named by `cfg`.
    pub fn new(cfg: &ControllerConfig) -> Result<Self, ControllerError> {
        let pem = std::fs::read_to_string(&cfg.ca_file).map_err(|e| {
            ControllerError::Setup(format!("controller.ca_file {}: {e}", cfg.ca_file.display()))
        })?;
        let roots = continuity_common::x509::pem_decode_all("CERTIFICATE", &pem)
            .map_err(|e| ControllerError::Setup(format!("controller.ca_file: {e}")))?;
        if roots.is_empty() {
            return Err(ControllerError::Setup(
                "controller.ca_file holds no CERTIFICATE".into(),
            ));
        }
        Ok(Self {
            base: cfg.api_server.clone(),
            trust: ServerTrust::Roots(roots),
            token_file: cfg.token_file.clone(),
        })
    }

    /// The token, read again each time (projected tokens are rotated by the kubelet).
    fn token(&self) -> Result<String, ControllerError> {
        let t = std::fs::read_to_string(&self.token_file).map_err(|e| {
            ControllerError::Api(format!("token_file {}: {e}", self.token_file.display()))
        })?;
        Ok(t.trim().to_string())
    }

    /// Lists `kind`: its items and the list's resourceVersion.
    pub fn list(&self, kind: Kind) -> Result<(Vec<Value>, String), ControllerError> {
        let url = format!("{}{}", self.base, kind.path());
        let token = self.token()?;
        let r = https::request("GET", &url, &self.trust, Some(&token), None, LIST_TIMEOUT)
            .map_err(|e| ControllerError::Api(e.to_string()))?;
        if r.status != 200 {
            return Err(ControllerError::Api(format!(
                "GET {}: status {}",
                kind.path(),
                r.status
            )));
        }
        let list: List = serde_json::from_slice(&r.body)
            .map_err(|e| ControllerError::Api(format!("GET {}: {e}", kind.path())))?;
        Ok((list.items, list.metadata.resource_version))
    }

    /// Watches `kind` from `*rv`, calling `on_event` for each change and advancing `*rv` to
    /// the last resourceVersion seen (bookmarks included).
    pub fn watch(
        &self,
        kind: Kind,
        rv: &mut String,
        mut on_event: impl FnMut(Event) -> bool,
    ) -> Result<WatchEnd, ControllerError> {
        let url = format!(
            "{}{}?watch=true&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&resourceVersion={}",
            self.base,
            kind.path(),
            query_escape(rv)
        );
        let token = self.token()?;
        let mut gone = false;
        let mut bad = None;
        let idle = Duration::from_secs(WATCH_SECONDS + 30);
        let end = https_stream::get_lines(&url, &self.trust, Some(&token), idle, MAX_EVENT, |l| {
            match serde_json::from_slice::<WatchLine>(l) {
                Ok(w) => handle_line(w, rv, &mut gone, &mut on_event),
                Err(e) => {
                    bad = Some(e.to_string());
                    false
                }
            }
        })
        .map_err(|e| ControllerError::Api(e.to_string()))?;
        if let Some(e) = bad {
            return Err(ControllerError::Api(format!("watch {}: {e}", kind.path())));
        }
        match end {
            StreamEnd::Status(r) if r.status == 410 => Ok(WatchEnd::Gone),
            StreamEnd::Status(r) => Err(ControllerError::Api(format!(
                "watch {}: status {}",
                kind.path(),
                r.status
            ))),
            StreamEnd::Finished if gone => Ok(WatchEnd::Gone),
            StreamEnd::Finished => Ok(WatchEnd::Ended),
        }
    }
}

/// Applies one watch line; false stops the watch.
fn handle_line(
    w: WatchLine,
    rv: &mut String,
    gone: &mut bool,
    on_event: &mut impl FnMut(Event) -> bool,
) -> bool {
    if w.kind == "ERROR" {
        // A Status object; 410 means the resourceVersion was compacted away.
        *gone = w.object.get("code").and_then(Value::as_u64) == Some(410);
        return false;
    }
    if let Some(v) = w
        .object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        *rv = v.to_string();
    }
    match w.kind.as_str() {
        "ADDED" | "MODIFIED" => on_event(Event::Upsert(w.object)),
        "DELETED" => on_event(Event::Delete(w.object)),
        _ => true,
    }
}

/// A resourceVersion is opaque: escape everything but unreserved characters.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_lines_advance_the_resource_version_and_spot_410() {
        let (mut rv, mut gone, mut seen) = (String::from("1"), false, 0);
        let line = |j: Value| serde_json::from_value::<WatchLine>(j).unwrap();
        let mut count = |_: Event| {
            seen += 1;
            true
        };
        let ok = handle_line(
            line(
                serde_json::json!({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "7"}}}),
            ),
            &mut rv,
            &mut gone,
            &mut count,
        );
        assert!(ok && rv == "7" && !gone);
        let ok = handle_line(
            line(serde_json::json!({"type": "ERROR", "object": {"kind": "Status", "code": 410}})),
            &mut rv,
            &mut gone,
            &mut count,
        );
        assert!(!ok && gone);
        assert_eq!(seen, 0);
        assert_eq!(query_escape("12&x=1"), "12%26x%3D1");
    }
}
