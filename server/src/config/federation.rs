//! `[federation]`: `bundle_endpoint`, where this trust domain's SPIFFE bundle is served to
//! other trust domains (SPIRE's `federation.bundle_endpoint`). Absent: not served.

use std::net::SocketAddr;
use std::path::PathBuf;

use continuity_common::config::{ConfigError, invalid};
use serde::Deserialize;

/// `[federation]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFederation {
    /// `[federation.bundle_endpoint]`.
    pub bundle_endpoint: Option<FileBundleEndpoint>,
    /// Shortest wait between two fetches of a peer's bundle endpoint (default 30s).
    pub refresh_min_interval: Option<String>,
    /// PEM CA certificates that authenticate `https_web` bundle endpoints.
    pub web_ca_file: Option<PathBuf>,
}

/// Default shortest wait between two fetches of one bundle endpoint.
pub const DEFAULT_REFRESH_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// How the federation refresher fetches peers' bundle endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefresherConfig {
    /// `federation.refresh_min_interval`.
    pub min_interval: std::time::Duration,
    /// `federation.web_ca_file` (None: `https_web` relationships cannot be refreshed).
    pub web_ca_file: Option<PathBuf>,
}

impl RefresherConfig {
    /// Validates the refresher keys of `[federation]`; every error names its key.
    pub fn from_file(f: Option<&FileFederation>) -> Result<Self, ConfigError> {
        let min_interval = match f.and_then(|f| f.refresh_min_interval.as_deref()) {
            None => DEFAULT_REFRESH_MIN_INTERVAL,
            Some(raw) => {
                let d = continuity_common::duration::parse(raw)
                    .map_err(|e| invalid("federation.refresh_min_interval", e))?;
                if d.is_zero() || d > std::time::Duration::from_secs(3600) {
                    return Err(invalid(
                        "federation.refresh_min_interval",
                        "must be between 1s and 1h",
                    ));
                }
                d
            }
        };
        Ok(Self {
            min_interval,
            web_ca_file: f.and_then(|f| f.web_ca_file.clone()),
        })
    }
}

/// `[federation.bundle_endpoint]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBundleEndpoint {
    /// host:port to listen on (required).
    pub bind_address: Option<String>,
    /// `https_spiffe` (the server's own SVID, default) or `https_web` (cert_file, key_file).
    pub profile: Option<String>,
    /// Certificate chain, PEM (https_web only).
    pub cert_file: Option<PathBuf>,
    /// Private key, PEM PKCS#8 (https_web only).
    pub key_file: Option<PathBuf>,
    /// `spiffe_refresh_hint` served instead of the CA's (a duration, 1s to 1h).
    pub refresh_hint: Option<String>,
}

/// How the bundle endpoint authenticates itself to its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointProfile {
    /// TLS with the server's SVID (`spiffe://<td>/continuity/server`); clients trust this
    /// trust domain's bundle.
    HttpsSpiffe,
    /// TLS with a Web PKI certificate read at start.
    HttpsWeb {
        /// Certificate chain, PEM.
        cert_file: PathBuf,
        /// Private key, PEM.
        key_file: PathBuf,
    },
}

/// The validated bundle endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEndpointConfig {
    /// Listener.
    pub bind_address: SocketAddr,
    /// TLS profile.
    pub profile: EndpointProfile,
    /// Served `spiffe_refresh_hint`, seconds (None: the CA's).
    pub refresh_hint: Option<u64>,
}

impl BundleEndpointConfig {
    /// Validates `[federation]` (None: no bundle endpoint); every error names its key.
    pub fn from_file(f: Option<FileFederation>) -> Result<Option<Self>, ConfigError> {
        let Some(e) = f.and_then(|f| f.bundle_endpoint) else {
            return Ok(None);
        };
        let key = "federation.bundle_endpoint.bind_address";
        let raw = e.bind_address.ok_or_else(|| invalid(key, "is required"))?;
        let bind_address = raw.parse().map_err(|_| {
            invalid(
                key,
                format!("{raw:?} is not host:port (e.g. \"0.0.0.0:8443\")"),
            )
        })?;
        let profile = match e.profile.as_deref().unwrap_or("https_spiffe") {
            "https_spiffe" => {
                if e.cert_file.is_some() || e.key_file.is_some() {
                    return Err(invalid(
                        "federation.bundle_endpoint.cert_file",
                        "only the https_web profile takes cert_file and key_file",
                    ));
                }
                EndpointProfile::HttpsSpiffe
            }
            "https_web" => EndpointProfile::HttpsWeb {
                cert_file: e.cert_file.ok_or_else(|| {
                    invalid(
                        "federation.bundle_endpoint.cert_file",
                        "is required with https_web",
                    )
                })?,
                key_file: e.key_file.ok_or_else(|| {
                    invalid(
                        "federation.bundle_endpoint.key_file",
                        "is required with https_web",
                    )
                })?,
            },
            other => {
                return Err(invalid(
                    "federation.bundle_endpoint.profile",
                    format!("{other:?}: expected https_spiffe or https_web"),
                ));
            }
        };
        let refresh_hint = match e.refresh_hint.as_deref() {
            None => None,
            Some(raw) => {
                let key = "federation.bundle_endpoint.refresh_hint";
                let d = continuity_common::duration::parse(raw).map_err(|e| invalid(key, e))?;
                if d.as_secs() == 0 || d.as_secs() > 3600 {
                    return Err(invalid(key, "must be between 1s and 1h"));
                }
                Some(d.as_secs())
            }
        };
        Ok(Some(Self {
            bind_address,
            profile,
            refresh_hint,
        }))
    }
}
