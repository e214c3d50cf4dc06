//! The custody policy: what each custody level allows. Every custody decision of the Engine
//! service (which custody an Engine gets, where a version's material is generated, whether it
//! may leave the server) is made here and nowhere else.

use super::{EngineError, Result};
use crate::keys::KeyManager;
use crate::model::engine::{Custody, Engine};

/// What one custody level allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rules {
    /// Material is generated and used inside the HSM (the server never holds it).
    pub(super) inside_hsm: bool,
    /// Material may be delivered into a workload (FetchSecret of keys), so the server keeps
    /// an exportable copy of it.
    pub(super) export: bool,
    /// The Engine may hold named KV secrets (stored sealed, delivered by FetchSecret).
    pub(super) named_secrets: bool,
}

impl Rules {
    /// The rules of one custody level.
    pub(super) fn of(custody: Custody) -> Self {
        match custody {
            Custody::Hsm => Self {
                inside_hsm: true,
                export: false,
                named_secrets: false,
            },
            Custody::Transit => Self {
                inside_hsm: false,
                export: false,
                named_secrets: false,
            },
            Custody::Kv => Self {
                inside_hsm: false,
                export: true,
                named_secrets: true,
            },
        }
    }
}

/// The custody of a new Engine of `tier`, and whether it is an exposure override: custody
/// defaults from the tier; more exposure than the tier's alignment needs `allow_exposure`,
/// and HSM custody needs a key manager that is an HSM.
pub(super) fn for_new_engine(
    tier: i32,
    requested: Option<Custody>,
    allow_exposure: bool,
    keys: &dyn KeyManager,
) -> Result<(Custody, bool)> {
    let aligned = Custody::for_tier(tier)
        .ok_or_else(|| EngineError::Invalid(format!("tier {tier} is not 0, 1 or 2")))?;
    let custody = requested.unwrap_or(aligned);
    let exposure_override = custody > aligned;
    if exposure_override && !allow_exposure {
        return Err(EngineError::Invalid(format!(
            "custody {custody} exposes key material more than tier {tier}'s alignment ({aligned}); pass --allow-exposure to override (the override is audited)"
        )));
    }
    if Rules::of(custody).inside_hsm && !keys.is_hsm() {
        return Err(EngineError::Precondition(format!(
            "hsm custody needs an HSM: this server's key manager is {:?} (set [key_manager] kind = \"pkcs11\")",
            keys.kind()
        )));
    }
    Ok((custody, exposure_override))
}

/// Whether anything of Engine `e` may be delivered into a workload.
pub(super) fn check_delivery(e: &Engine) -> Result<()> {
    if Rules::of(e.custody).export {
        return Ok(());
    }
    let engine = &e.name;
    Err(EngineError::Denied(match e.custody {
        Custody::Hsm => format!(
            "engine {engine} has hsm custody: its keys are generated and used inside the HSM and can never be exported"
        ),
        _ => format!(
            "engine {engine} has transit custody: its key material never leaves the server; ask the server to sign or encrypt instead"
        ),
    }))
}

/// Whether the material of key `target` (of `custody`) may be delivered into a workload.
pub(super) fn check_key_export(target: &str, custody: Custody) -> Result<()> {
    if Rules::of(custody).export {
        Ok(())
    } else {
        Err(EngineError::Denied(format!(
            "key {target} has {custody} custody and cannot be exported"
        )))
    }
}

/// Whether Engine `e` may hold named secrets.
pub(super) fn check_named_secrets(e: &Engine) -> Result<()> {
    if Rules::of(e.custody).named_secrets {
        Ok(())
    } else {
        Err(EngineError::Precondition(format!(
            "named secrets are delivered into workloads (KV custody); engine {} has {} custody",
            e.name, e.custody
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kv_custody_lets_material_leave_and_only_hsm_keeps_it_in_the_token() {
        let all = [Custody::Hsm, Custody::Transit, Custody::Kv];
        let export: Vec<_> = all.iter().map(|c| Rules::of(*c).export).collect();
        assert_eq!(export, [false, false, true]);
        let hsm: Vec<_> = all.iter().map(|c| Rules::of(*c).inside_hsm).collect();
        assert_eq!(hsm, [true, false, false]);
        for c in all {
            assert_eq!(Rules::of(c).named_secrets, Rules::of(c).export, "{c}");
        }
    }
}
