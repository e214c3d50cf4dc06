//! Continuity proofs: every new version of a sign key is endorsed by the key's primary
//! version at the time (a compact JWS in the format of `continuity_common::endorsement`),
//! committed and audited with the version, kept after either version is destroyed, and
//! published with the Engine's JWKS.

use std::sync::Arc;

use continuity_common::endorsement::{Statement, compact};
use serde_json::{Value, json};

use super::material::Material;
use super::registry::Pick;
use super::{EngineError, Engines, Result};
use crate::audit::AuditEvent;
use crate::keys::KeyError;
use crate::model::engine::{Algorithm, Endorsement, EngineKey, KeyVersion, Purpose, VersionState};

/// What endorsing a new version produced: the endorsement (None when the previous primary's
/// material is gone, so nothing can endorse it) and the audit record saying which.
pub(super) struct Proof {
    /// The endorsement to commit with the version.
    pub(super) endorsement: Option<Endorsement>,
    /// Its audit record (`key.endorse`).
    pub(super) event: AuditEvent,
}

/// The public JWK of a version as the JWKS publishes it (with `kid`, `alg`, `use`).
pub(super) fn public_jwk(
    spki: &[u8],
    kid: &str,
    algorithm: Algorithm,
) -> Result<serde_json::Map<String, Value>> {
    let mut jwk =
        continuity_common::jwk::from_spki(spki).map_err(|e| EngineError::Invalid(e.to_string()))?;
    jwk.insert("kid".into(), kid.into());
    jwk.insert("alg".into(), algorithm.jws_alg().into());
    jwk.insert("use".into(), "sig".into());
    Ok(jwk)
}

/// A signature in its JWS form: ECDSA DER becomes r‖s.
fn jose_signature(algorithm: Algorithm, der: Vec<u8>) -> Result<Vec<u8>> {
    match algorithm {
        Algorithm::EcP256 => continuity_common::der::ecdsa_der_to_fixed(&der, 32)
            .map_err(|e| EngineError::Key(KeyError::Crypto(e.to_string()))),
        _ => Ok(der),
    }
}

impl Engines {
    /// The endorsement of `new`, a new version of `key`, by `key`'s primary version (the key
    /// as it was before `new`). None for an encrypt key. Every path that adds a version of a
    /// sign key calls this before it commits, and commits the proof with the version.
    pub(super) async fn endorse(
        &self,
        key: &EngineKey,
        new: &KeyVersion,
        actor: &str,
    ) -> Result<Option<Proof>> {
        if key.algorithm.purpose() != Purpose::Sign {
            return Ok(None);
        }
        let target = format!("{}/{}", key.engine, key.name);
        let event = AuditEvent::ok(actor, "key.endorse", &target).version(new.version);
        let (_, prev) = self.resolve(
            &key.engine,
            &key.name,
            Pick::Exact(key.primary_version),
            |_| Ok(()),
        )?;
        if prev.state == VersionState::Destroyed {
            let reason = format!(
                "not endorsed: the previous primary v{} is DESTROYED",
                prev.version
            );
            tracing::warn!(key = %target, version = new.version, "{reason}");
            return Ok(Some(Proof {
                endorsement: None,
                event: event.result(reason),
            }));
        }
        let statement = Statement {
            trust_domain: self.trust_domain.name().to_string(),
            engine: key.engine.clone(),
            key: key.name.clone(),
            version: new.version,
            kid: new.kid.clone(),
            jwk: public_jwk(&new.public_key, &new.kid, key.algorithm)?,
            previous_version: prev.version,
            previous_kid: prev.kid.clone(),
            iat: new.created_at,
        };
        let input = statement
            .signing_input(key.algorithm.jws_alg())
            .map_err(EngineError::Invalid)?;
        let Material::Signer(signer, _) = self.material(key, &prev).await? else {
            return Err(EngineError::Precondition(format!(
                "{target} is not a sign key"
            )));
        };
        let message = input.clone().into_bytes();
        let der = tokio::task::spawn_blocking(move || signer.sign(&message))
            .await
            .map_err(|e| KeyError::Crypto(e.to_string()))??;
        let jws = compact(&input, &jose_signature(key.algorithm, der)?);
        Ok(Some(Proof {
            endorsement: Some(Endorsement {
                engine: key.engine.clone(),
                key: key.name.clone(),
                version: new.version,
                previous_version: prev.version,
                jws,
                created_at: new.created_at,
            }),
            event: event.result(format!("ok; endorsed by v{}", prev.version)),
        }))
    }

    /// Puts an endorsement into the index (after it was committed).
    pub(super) fn index_endorsement(&self, e: Endorsement) {
        self.write()
            .endorsements
            .insert((e.engine.clone(), e.key.clone(), e.version), Arc::new(e));
    }

    /// The `endorsements` array of an Engine's JWKS: every endorsement of its keys, with the
    /// endorsed version's kid and state (a destroyed version's stays, marked DESTROYED).
    pub(super) fn published_endorsements(&self, engine: &str) -> Value {
        let idx = self.read();
        let list: Vec<Value> = idx
            .endorsements
            .values()
            .filter(|e| e.engine == engine)
            .map(|e| {
                let v = idx
                    .versions
                    .get(&(e.engine.clone(), e.key.clone(), e.version));
                json!({
                    "key": e.key,
                    "version": e.version,
                    "kid": v.map(|v| v.kid.as_str()).unwrap_or_default(),
                    "state": v.map_or("UNKNOWN", |v| v.state.as_str()),
                    "previous_version": e.previous_version,
                    "jws": e.jws,
                })
            })
            .collect();
        Value::Array(list)
    }
}
