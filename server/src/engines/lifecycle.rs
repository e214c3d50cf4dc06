//! The key lifecycle: creating a key with its first version, rotating, and moving versions
//! through their states. Which state may go to which is one table, [`TRANSITIONS`], that
//! every state change (admin actions and the scheduled destruction) goes through.

use std::sync::Arc;

use super::endorse::Proof;
use super::registry::{Pick, valid_name};
use super::{DEFAULT_DESTROY_GRACE, EngineError, Engines, Result};
use crate::audit::AuditEvent;
use crate::datastore::Write;
use crate::model::engine::{Algorithm, Engine, EngineKey, KeyVersion, Purpose, VersionState};

/// Lifecycle actions on a key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionAction {
    /// DISABLED → ENABLED.
    Enable,
    /// ENABLED → DISABLED.
    Disable,
    /// ENABLED/DISABLED → DESTROY_SCHEDULED.
    Destroy,
    /// DESTROY_SCHEDULED → DISABLED.
    Restore,
}

impl VersionAction {
    /// The audit action recording it.
    fn audit_action(self) -> &'static str {
        match self {
            Self::Enable => "key.enable",
            Self::Disable => "key.disable",
            Self::Destroy => "key.destroy",
            Self::Restore => "key.restore",
        }
    }
}

impl std::str::FromStr for VersionAction {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "enable" => Ok(Self::Enable),
            "disable" => Ok(Self::Disable),
            "destroy" => Ok(Self::Destroy),
            "restore" => Ok(Self::Restore),
            o => Err(format!(
                "action {o:?} is not one of enable, disable, destroy, restore"
            )),
        }
    }
}

/// What changes a version's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// An admin action.
    Admin(VersionAction),
    /// The destroy grace of a DESTROY_SCHEDULED version has passed (the scheduler).
    GraceElapsed,
}

/// Every allowed change of a version's state: (cause, from, to). Nothing else is allowed: a
/// version is born ENABLED, and a DESTROYED one never changes again.
pub const TRANSITIONS: [(Cause, VersionState, VersionState); 6] = {
    use Cause::*;
    use VersionAction::*;
    use VersionState::*;
    [
        (Admin(Enable), Disabled, Enabled),
        (Admin(Disable), Enabled, Disabled),
        (Admin(Destroy), Enabled, DestroyScheduled),
        (Admin(Destroy), Disabled, DestroyScheduled),
        (Admin(Restore), DestroyScheduled, Disabled),
        (GraceElapsed, DestroyScheduled, Destroyed),
    ]
};

/// The state `cause` moves a version in state `from` to, if the table allows it.
pub fn next_state(from: VersionState, cause: Cause) -> Option<VersionState> {
    TRANSITIONS
        .iter()
        .find(|(c, f, _)| *c == cause && *f == from)
        .map(|(_, _, to)| *to)
}

/// Whether a version in this state may be used (sign, encrypt, decrypt, deliver).
pub fn usable(state: VersionState) -> bool {
    state == VersionState::Enabled
}

/// The algorithm of a new key (the purpose's default unless given), checked with its periods.
fn key_algorithm(
    purpose: Purpose,
    algorithm: Option<Algorithm>,
    (rotation_period, destroy_grace): (i64, i64),
) -> Result<Algorithm> {
    let algorithm = algorithm.unwrap_or(match purpose {
        Purpose::Sign => Algorithm::EcP256,
        Purpose::Encrypt => Algorithm::Aes256Gcm,
    });
    if algorithm.purpose() != purpose {
        return Err(EngineError::Invalid(format!(
            "algorithm {} is for {}, not {}",
            algorithm.as_str(),
            algorithm.purpose().as_str(),
            purpose.as_str()
        )));
    }
    if rotation_period < 0 || destroy_grace < 0 {
        return Err(EngineError::Invalid("periods must not be negative".into()));
    }
    Ok(algorithm)
}

/// A new key of Engine `e` at `now`, its first version primary.
fn new_key(
    e: &Engine,
    name: &str,
    algorithm: Algorithm,
    (rotation_period, destroy_grace): (i64, i64),
    now: i64,
) -> EngineKey {
    EngineKey {
        engine: e.name.clone(),
        name: name.into(),
        algorithm,
        custody: e.custody,
        primary_version: 1,
        rotation_period,
        destroy_grace: if destroy_grace == 0 {
            DEFAULT_DESTROY_GRACE
        } else {
            destroy_grace
        },
        next_rotation_at: if rotation_period > 0 {
            now + rotation_period
        } else {
            0
        },
        created_at: now,
    }
}

impl Engines {
    /// Creates a key with its first version.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_key(
        &self,
        engine: &str,
        name: &str,
        purpose: Purpose,
        algorithm: Option<Algorithm>,
        rotation_period: i64,
        destroy_grace: i64,
        actor: &str,
    ) -> Result<EngineKey> {
        valid_name("key", name)?;
        let e = self.engine(engine)?;
        let periods = (rotation_period, destroy_grace);
        let algorithm = key_algorithm(purpose, algorithm, periods)?;
        let _w = self.writes.lock().await;
        self.follow().await?;
        if self
            .read()
            .keys
            .contains_key(&(engine.to_string(), name.to_string()))
        {
            return Err(EngineError::AlreadyExists(format!(
                "key {name} of engine {engine} already exists"
            )));
        }
        let now = self.clock.unix();
        let key = new_key(&e, name, algorithm, periods, now);
        let (version, material) = self.new_version(&key, 1, now).await?;
        let event = AuditEvent::ok(actor, "key.create", &format!("{engine}/{name}"))
            .version(1)
            .result(format!("ok; {} {}", key.algorithm.as_str(), key.custody));
        self.commit_key_version(&key, &version, event, None).await?;
        self.cache(&version, material);
        self.index_key_version(key.clone(), version);
        Ok(key)
    }

    /// Writes a key and a new version of it with the audit record of the change; the version
    /// is inserted, never replaced (another server that made it first wins, this one fails).
    /// The version's continuity proof ([`Engines::endorse`]), if any, goes in the same commit.
    pub(super) async fn commit_key_version(
        &self,
        key: &EngineKey,
        version: &KeyVersion,
        event: AuditEvent,
        proof: Option<Proof>,
    ) -> Result<()> {
        let mut writes = vec![
            Write::InsertKeyVersion(version.clone()),
            Write::PutEngineKey(key.clone()),
        ];
        let mut events = vec![event];
        let endorsement = proof.and_then(|p| {
            events.push(p.event);
            p.endorsement
        });
        if let Some(e) = &endorsement {
            writes.push(Write::InsertEndorsement(e.clone()));
        }
        self.audit.commit(&writes, &events).await?;
        if let Some(e) = endorsement {
            self.index_endorsement(e);
        }
        Ok(())
    }

    /// Adds a version and makes it primary.
    pub async fn rotate(&self, engine: &str, name: &str, actor: &str) -> Result<EngineKey> {
        let _w = self.writes.lock().await;
        self.rotate_locked(engine, name, actor, "ok").await
    }

    /// [`Engines::rotate`] with the write lock held; `result` goes to the audit record.
    pub(super) async fn rotate_locked(
        &self,
        engine: &str,
        name: &str,
        actor: &str,
        result: &str,
    ) -> Result<EngineKey> {
        self.follow().await?;
        let (key, next) = self.next_version(engine, name)?;
        let mut key = EngineKey::clone(&key);
        let now = self.clock.unix();
        let (version, material) = self.new_version(&key, next, now).await?;
        let proof = self.endorse(&key, &version, actor).await?;
        key.primary_version = next;
        if key.rotation_period > 0 {
            key.next_rotation_at = now + key.rotation_period;
        }
        let event = AuditEvent::ok(actor, "key.rotate", &format!("{engine}/{name}"))
            .version(next)
            .result(result);
        self.commit_key_version(&key, &version, event, proof)
            .await?;
        self.cache(&version, material);
        self.index_key_version(key.clone(), version);
        Ok(key)
    }

    /// A usable version of key `engine/name` (of `purpose`, when given): the key must have
    /// that purpose and the version a usable state.
    pub(super) fn usable(
        &self,
        engine: &str,
        name: &str,
        pick: Pick,
        purpose: Option<Purpose>,
    ) -> Result<(Arc<EngineKey>, Arc<KeyVersion>)> {
        let (key, v) = self.resolve(engine, name, pick, |key| match purpose {
            Some(p) if key.algorithm.purpose() != p => Err(EngineError::Precondition(format!(
                "key {engine}/{name} is a {} key, not {}",
                key.algorithm.purpose().as_str(),
                p.as_str()
            ))),
            _ => Ok(()),
        })?;
        if !usable(v.state) {
            return Err(EngineError::Precondition(format!(
                "version {} of {engine}/{name} is {}; only ENABLED versions can be used",
                v.version,
                v.state.as_str()
            )));
        }
        Ok((key, v))
    }

    /// Changes a version's state.
    pub async fn set_state(
        &self,
        engine: &str,
        name: &str,
        version: u32,
        action: VersionAction,
        actor: &str,
    ) -> Result<EngineKey> {
        let _w = self.writes.lock().await;
        self.follow().await?;
        let (key, v) = self.resolve(engine, name, Pick::Exact(version), |_| Ok(()))?;
        let Some(to) = next_state(v.state, Cause::Admin(action)) else {
            return Err(EngineError::Precondition(format!(
                "version {version} of {engine}/{name} is {}; cannot {action:?}",
                v.state.as_str()
            )));
        };
        let mut v = KeyVersion::clone(&v);
        v.state = to;
        v.destroy_at = if to == VersionState::DestroyScheduled {
            self.clock.unix() + key.destroy_grace
        } else {
            0
        };
        let result = if to == VersionState::DestroyScheduled {
            format!("ok; destroyed at {}", v.destroy_at)
        } else {
            "ok".into()
        };
        let event = AuditEvent::ok(actor, action.audit_action(), &format!("{engine}/{name}"))
            .version(version)
            .result(result);
        self.audit
            .commit(&[Write::PutKeyVersion(v.clone())], &[event])
            .await?;
        self.index_version(v);
        Ok(EngineKey::clone(&key))
    }

    /// Destroys the material of versions whose grace has passed, expires import jobs past
    /// their life, and rotates keys whose rotation period has elapsed. Returns how many
    /// versions were destroyed.
    pub async fn tick(&self) -> Result<usize> {
        self.reload().await?;
        // Expiring import jobs must never hold back scheduled destruction or rotation.
        if let Err(e) = self.expire_import_jobs().await {
            tracing::warn!(error = %e, "import job sweep failed; will retry at the next tick");
        }
        let now = self.clock.unix();
        let due: Vec<Arc<KeyVersion>> = self
            .read()
            .versions
            .values()
            .filter(|v| destruction_due(v, now))
            .cloned()
            .collect();
        let mut destroyed = 0;
        for v in due {
            let _w = self.writes.lock().await;
            if self.destroy_locked(&v, now).await? {
                destroyed += 1;
            }
        }
        let rotate: Vec<(String, String)> = self
            .read()
            .keys
            .values()
            .filter(|k| {
                k.rotation_period > 0 && k.next_rotation_at > 0 && k.next_rotation_at <= now
            })
            .map(|k| (k.engine.clone(), k.name.clone()))
            .collect();
        for (e, k) in rotate {
            let _w = self.writes.lock().await;
            // Read again under the lock (rotate_locked follows the datastore): rotated
            // meanwhile (through another server) means not due any more.
            self.follow().await?;
            let due = self.key_entry(&e, &k).is_ok_and(|k| {
                k.rotation_period > 0 && k.next_rotation_at > 0 && k.next_rotation_at <= now
            });
            if due {
                self.rotate_locked(&e, &k, "scheduler", "ok").await?;
            }
        }
        Ok(destroyed)
    }

    /// Erases the material of version `v` if its destruction is (still) due, with the write
    /// lock held. Returns whether it did.
    async fn destroy_locked(&self, v: &KeyVersion, now: i64) -> Result<bool> {
        // The state is read again under the lock: a restore may have come in between.
        let (_, current) = self.resolve(&v.engine, &v.key, Pick::Exact(v.version), |_| Ok(()))?;
        if !destruction_due(&current, now) {
            return Ok(false);
        }
        if !current.hsm_id.is_empty() {
            self.keys.delete(&current.hsm_id).await?;
        }
        let mut v = KeyVersion::clone(&current);
        v.sealed = None;
        v.state = VersionState::Destroyed;
        debug_assert_eq!(
            next_state(current.state, Cause::GraceElapsed),
            Some(v.state)
        );
        let event = AuditEvent::ok(
            "scheduler",
            "key.destroyed",
            &format!("{}/{}", v.engine, v.key),
        )
        .version(v.version)
        .result("ok; material erased");
        self.audit
            .commit(&[Write::PutKeyVersion(v.clone())], &[event])
            .await?;
        self.forget(&v);
        self.index_version(v);
        Ok(true)
    }
}

/// Whether version `v` is scheduled for destruction and its grace has passed at `now`.
fn destruction_due(v: &KeyVersion, now: i64) -> bool {
    next_state(v.state, Cause::GraceElapsed).is_some() && v.destroy_at <= now
}

#[cfg(test)]
mod tests {
    use super::*;
    use VersionAction::*;
    use VersionState::*;

    const STATES: [VersionState; 4] = [Enabled, Disabled, DestroyScheduled, Destroyed];
    const CAUSES: [Cause; 5] = [
        Cause::Admin(Enable),
        Cause::Admin(Disable),
        Cause::Admin(Destroy),
        Cause::Admin(Restore),
        Cause::GraceElapsed,
    ];

    #[test]
    fn the_transition_table_is_the_whole_state_machine() {
        let mut moves = vec![];
        for cause in CAUSES {
            for from in STATES {
                if let Some(to) = next_state(from, cause) {
                    moves.push((cause, from.as_str(), to.as_str()));
                }
            }
        }
        assert_eq!(
            moves,
            [
                (Cause::Admin(Enable), "DISABLED", "ENABLED"),
                (Cause::Admin(Disable), "ENABLED", "DISABLED"),
                (Cause::Admin(Destroy), "ENABLED", "DESTROY_SCHEDULED"),
                (Cause::Admin(Destroy), "DISABLED", "DESTROY_SCHEDULED"),
                (Cause::Admin(Restore), "DESTROY_SCHEDULED", "DISABLED"),
                (Cause::GraceElapsed, "DESTROY_SCHEDULED", "DESTROYED"),
            ]
        );
        // DESTROYED is final.
        assert!(CAUSES.iter().all(|c| next_state(Destroyed, *c).is_none()));
        // Only ENABLED versions are used.
        let used: Vec<_> = STATES.iter().filter(|s| usable(**s)).collect();
        assert_eq!(used, [&Enabled]);
    }
}
