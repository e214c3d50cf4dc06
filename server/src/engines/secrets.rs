//! KV custody: named secrets of an Engine (stored sealed under the KEK, latest version
//! wins) and delivery of secrets or exportable key material into a workload.

use super::registry::{Pick, valid_name};
use super::{EngineError, Engines, Result, custody};
use crate::audit::AuditEvent;
use crate::datastore::Write;
use crate::model::engine::Secret;

/// What binds a sealed secret to its Engine, name and version.
fn secret_binding(engine: &str, name: &str, version: u32) -> String {
    format!("continuity/engine/{engine}/secret/{name}/v{version}")
}

impl Engines {
    /// Stores a new version of a named secret (KV custody Engines only).
    pub async fn put_secret(
        &self,
        engine: &str,
        name: &str,
        value: &[u8],
        actor: &str,
    ) -> Result<u32> {
        valid_name("secret", name)?;
        custody::check_named_secrets(&self.engine(engine)?)?;
        let _w = self.writes.lock().await;
        self.follow().await?;
        let version = self
            .read()
            .secrets
            .get(&(engine.into(), name.into()))
            .map_or(1, |s| s.version + 1);
        let (sealed, mechanism) = self
            .seal(value, secret_binding(engine, name, version))
            .await?;
        let secret = Secret {
            engine: engine.into(),
            name: name.into(),
            version,
            sealed,
            mechanism,
            created_at: self.clock.unix(),
        };
        let event =
            AuditEvent::ok(actor, "secret.put", &format!("{engine}/{name}")).version(version);
        self.audit
            .commit(&[Write::PutSecret(secret.clone())], &[event])
            .await?;
        self.write()
            .secrets
            .insert((engine.into(), name.into()), secret);
        Ok(version)
    }

    /// A named secret, or the primary material of a KV-custody key, for delivery into a
    /// workload. Refused for transit and hsm custody.
    pub async fn fetch_secret(
        &self,
        engine: &str,
        name: &str,
        actor: &str,
    ) -> Result<(u32, Vec<u8>)> {
        let target = format!("{engine}/{name}");
        let op = async {
            custody::check_delivery(&self.engine(engine)?)?;
            let secret = self
                .read()
                .secrets
                .get(&(engine.to_string(), name.to_string()))
                .map(|s| (s.version, s.sealed.clone()));
            if let Some((version, sealed)) = secret {
                let value = self
                    .open(&sealed, secret_binding(engine, name, version))
                    .await?;
                return Ok((version, value.to_vec()));
            }
            self.fetch_key_material(engine, name, &target).await
        };
        self.audited(actor, "secret.fetch", &target, |o| o.0, op)
            .await
    }

    /// The primary material of key `engine/name` if its custody lets it leave the server.
    async fn fetch_key_material(
        &self,
        engine: &str,
        name: &str,
        target: &str,
    ) -> Result<(u32, Vec<u8>)> {
        let (key, v) = self
            .usable(engine, name, Pick::Primary, None)
            .map_err(|_| {
                EngineError::NotFound(format!(
                    "engine {engine} has no secret or usable key named {name}"
                ))
            })?;
        custody::check_key_export(target, key.custody)?;
        match self.material(&key, &v).await?.export() {
            Some(raw) => Ok((v.version, raw.to_vec())),
            None => Err(EngineError::Denied(format!(
                "key {target} cannot be exported"
            ))),
        }
    }
}
