//! JWT-SVIDs: a bounded cache by (entry, audiences), served until half-life; misses go to the
//! server once per key (single-flight), with their own timeout, and never wait on the state.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use continuity_common::lru::Lru;
use continuity_proto::agent::NewJwtsvidRequest;

use super::Manager;
use crate::client::{ClientError, ServerClient};
use crate::limits::RateLimited;
use crate::state::Svid;

/// Longest a JWT-SVID fetch from the server may take (connecting included).
pub const JWT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A cached JWT-SVID (a bearer token: redacted in `Debug`).
#[derive(Clone)]
pub(super) struct CachedJwt {
    token: String,
    /// The `kid` of its header (the JWT authority that signed it).
    kid: String,
    issued_at: i64,
    expires_at: i64,
}

impl std::fmt::Debug for CachedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedJwt")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Why a JWT-SVID could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JwtFetchError {
    /// The server refused, or could not be reached.
    #[error(transparent)]
    Server(Arc<ClientError>),
    /// No agent SVID to call the server with.
    #[error("the agent is not attested")]
    NotAttested,
    /// The caller's rate limit for calls reaching the server is used up.
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    /// The fetch task died (a bug); the next call tries again.
    #[error("the JWT-SVID fetch failed: {0}")]
    Failed(String),
}

/// The JWT-SVID cache key: entry id and sorted, deduplicated audiences.
pub(super) type JwtKey = (String, Vec<String>);
/// The outcome of one JWT-SVID fetch, shared by every caller that waited on it.
pub(super) type JwtResult = Result<CachedJwt, JwtFetchError>;

impl Manager {
    /// A JWT-SVID for `identity` and `audience`: from the cache until half-life, else from the
    /// server; while the server is unreachable (or the caller's rate limit is used up) a
    /// cached token is served until it expires. `admit` is asked before a call would reach the
    /// server; concurrent misses for one key wait on one call (and only the first is asked).
    pub async fn jwt_svid(
        &self,
        entry_id: &str,
        audience: &[String],
        admit: &(dyn Fn() -> Result<(), RateLimited> + Send + Sync),
    ) -> Result<String, JwtFetchError> {
        let mut aud = audience.to_vec();
        aud.sort();
        aud.dedup();
        let key: JwtKey = (entry_id.to_string(), aud);
        let now = self.clock.unix();
        let cached = {
            let mut jwts = self.jwts.lock().unwrap_or_else(|e| e.into_inner());
            let c = jwts.get(&key).cloned();
            if c.as_ref().is_some_and(|c| now >= c.expires_at) {
                jwts.remove(&key);
            }
            c.filter(|c| now < c.expires_at)
        };
        if let Some(c) = &cached
            && now
                < c.issued_at
                    .saturating_add(c.expires_at.saturating_sub(c.issued_at) / 2)
        {
            return Ok(c.token.clone());
        }
        let start = || {
            let agent_svid = self
                .agent_svid
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            fetch_jwt(
                self.client.clone(),
                agent_svid,
                self.jwts.clone(),
                key.clone(),
                now,
            )
        };
        let share = match self.jwt_fetches.join(&key, admit, start, |e| {
            Err(JwtFetchError::Failed(e.to_string()))
        }) {
            Ok(s) => s,
            Err(e) => return cached.map(|c| c.token).ok_or(e.into()),
        };
        match share.wait().await {
            Ok(c) => Ok(c.token),
            // Unreachable (not refused): serve the cached token while it lasts.
            Err(JwtFetchError::Server(e)) if e.is_unreachable() => {
                cached.map(|c| c.token).ok_or(JwtFetchError::Server(e))
            }
            Err(e) => Err(e),
        }
    }
}

/// The `kid` of a compact JWS's header (None if the header does not parse).
fn jwt_kid(token: &str) -> Option<String> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("kid")?.as_str().map(str::to_string)
}

impl Manager {
    /// The kids of the cached JWT-SVIDs, sorted, without duplicates.
    pub(super) fn cached_jwt_kids(&self) -> Vec<String> {
        let jwts = self.jwts.lock().unwrap_or_else(|e| e.into_inner());
        let mut kids: Vec<String> = jwts
            .values()
            .map(|c| c.kid.clone())
            .filter(|k| !k.is_empty())
            .collect();
        kids.sort();
        kids.dedup();
        kids
    }

    /// Drops the cached JWT-SVIDs signed by a `tainted` JWT authority: the next fetch of each
    /// gets a fresh one from the active authority.
    pub(super) fn drop_tainted_jwts(&self, tainted: &[String]) {
        if tainted.is_empty() {
            return;
        }
        let mut jwts = self.jwts.lock().unwrap_or_else(|e| e.into_inner());
        let before = jwts.len();
        jwts.retain(|_, c| !tainted.contains(&c.kid));
        let dropped = before - jwts.len();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "cached JWT-SVIDs signed by a tainted authority dropped"
            );
        }
    }
}

/// Asks the server for a JWT-SVID and caches it (runs as its own task: no caller cancels it).
async fn fetch_jwt(
    client: Arc<ServerClient>,
    agent_svid: Option<Svid>,
    jwts: Arc<Mutex<Lru<JwtKey, CachedJwt>>>,
    key: JwtKey,
    now: i64,
) -> JwtResult {
    let agent_svid = agent_svid.ok_or(JwtFetchError::NotAttested)?;
    let in_use = client.server();
    let server = |e: ClientError| {
        // Unreachable: the next call (this one's retry, or the sync loop) tries the next server.
        client.failed(in_use, &e);
        JwtFetchError::Server(Arc::new(e))
    };
    let call = async {
        let mut api = client.api(&agent_svid).await?;
        let req = NewJwtsvidRequest {
            entry_id: key.0.clone(),
            audience: key.1.clone(),
        };
        Ok::<_, ClientError>(api.new_jwtsvid(req).await?.into_inner())
    };
    // A stalled server fails this fetch (as unreachable: a cached token is served) instead of
    // holding every caller of this key.
    let r = tokio::time::timeout(JWT_FETCH_TIMEOUT, call)
        .await
        .map_err(|_| server(ClientError::Timeout(JWT_FETCH_TIMEOUT)))?
        .map_err(server)?;
    let c = CachedJwt {
        kid: jwt_kid(&r.token).unwrap_or_default(),
        token: r.token,
        issued_at: now,
        expires_at: r.expires_at,
    };
    jwts.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, c.clone());
    Ok(c)
}
