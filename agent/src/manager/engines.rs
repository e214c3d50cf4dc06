//! Engine JWKS: fetched for the Engines this node's entries are bound to, cached in the
//! state so verification works while the server is down.

use super::{Broker, Manager};
use crate::client::ClientError;
use crate::state::{EngineJwks, EnginePublicKey, Svid};

impl Manager {
    /// Refreshes Engine JWKS and reports incarnations (failures are logged, never fatal);
    /// true if the JWKS changed.
    pub(super) async fn sync_engines(&self, agent_svid: &Svid) -> bool {
        let mut broker = match self.client.broker(agent_svid).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "Engine broker unavailable");
                return false;
            }
        };
        let changed = match self.refresh_engine_jwks(&mut broker).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "refreshing Engine JWKS failed; keeping the cached ones");
                false
            }
        };
        if let Err(e) = self.flush_incarnations(&mut broker).await {
            tracing::warn!(error = %e, "reporting incarnations failed; will retry");
        }
        changed
    }

    /// Fetches the JWKS of every Engine this node's entries are bound to.
    async fn refresh_engine_jwks(&self, broker: &mut Broker) -> Result<bool, ClientError> {
        let mut by_engine: std::collections::BTreeMap<String, String> = Default::default();
        for e in self
            .state()
            .entries
            .values()
            .filter(|e| !e.engine.is_empty())
        {
            by_engine
                .entry(e.engine.clone())
                .or_insert_with(|| e.id.clone());
        }
        let mut fresh = std::collections::BTreeMap::new();
        for (engine, entry_id) in by_engine {
            let r = broker
                .get_engine_jwks(continuity_proto::engine::BrokerJwks { entry_id })
                .await?
                .into_inner();
            let jwks = EngineJwks {
                jwks: String::from_utf8_lossy(&r.jwks).into_owned(),
                keys: r
                    .keys
                    .into_iter()
                    .map(|k| EnginePublicKey {
                        key: k.key,
                        version: k.version,
                        kid: k.kid,
                        algorithm: k.algorithm,
                        spki: k.public_key,
                    })
                    .collect(),
            };
            fresh.insert(engine, jwks);
        }
        let mut st = self.state();
        if fresh != st.engine_jwks {
            st.engine_jwks = fresh;
            return Ok(true);
        }
        Ok(false)
    }
}
