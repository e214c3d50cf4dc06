//! Spending the nonce budget on encryption: take a nonce from the primary version, reserve
//! the next block in the datastore when the reserved one is used up, rotate the key when the
//! version has had its maximum (once, however many callers find it exhausted).

use std::sync::Arc;

use super::budget::Nonce;
use super::registry::Pick;
use super::{EngineError, Engines, Result};
use crate::model::engine::{EngineKey, KeyVersion, Purpose};

/// After an automatic rotation failed, callers are refused this long without trying again.
const ROTATION_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// When an automatic rotation failed, and the refusal given meanwhile. A monotonic
/// `Instant`, not the injected clock: it only spaces out retries (no wall-clock decision).
pub(super) type RotationFailure = (std::time::Instant, String);

impl Engines {
    /// Counts one encryption against the primary version's nonce budget and returns that
    /// version: reserves another block first when the reserved one is used up, and rotates
    /// the key when the version has had its maximum (refusing if rotation fails).
    pub(super) async fn take_nonce(
        &self,
        engine: &str,
        name: &str,
    ) -> Result<(Arc<EngineKey>, Arc<KeyVersion>)> {
        // Each round either takes a nonce or makes progress (a block reserved, a rotation);
        // a few rounds cover concurrent callers doing the same.
        for _ in 0..4 {
            let (key, v) = self.usable(engine, name, Pick::Primary, Some(Purpose::Encrypt))?;
            match self.budgets.try_take(&v) {
                Nonce::Taken => return Ok((key, v)),
                Nonce::Reserve => self.reserve_nonces(&v).await?,
                Nonce::Exhausted => self.rotate_for_nonce_budget(&v).await?,
            }
        }
        Err(EngineError::Precondition(format!(
            "{engine}/{name}: no encryption budget after rotating; retry"
        )))
    }

    /// Persists the next block of a version's budget (never past the maximum).
    async fn reserve_nonces(&self, v: &KeyVersion) -> Result<()> {
        let _r = self.reserve_lock.lock().await;
        let Some(block) = self.budgets.next_block(v) else {
            return Ok(());
        };
        let total = self
            .store
            .reserve_encryptions(&v.engine, &v.key, v.version, block)
            .await?;
        self.budgets.reserved(v, block, total);
        let mut idx = self.write();
        if let Some(iv) = idx
            .versions
            .get_mut(&(v.engine.clone(), v.key.clone(), v.version))
        {
            Arc::make_mut(iv).encryptions = iv.encryptions.max(total);
        }
        Ok(())
    }

    /// A refusal still standing from a rotation of `v` that failed recently.
    fn recent_rotation_failure(&self, v: &KeyVersion) -> Option<EngineError> {
        let failures = self
            .rotation_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        failures
            .get(&(v.engine.clone(), v.key.clone(), v.version))
            .filter(|(at, _)| at.elapsed() < ROTATION_RETRY)
            .map(|(_, msg)| EngineError::Precondition(msg.clone()))
    }

    /// Rotates a key whose primary version `v` has used its nonce budget (once, however many
    /// callers find it exhausted); audited as key.rotate with the reason.
    async fn rotate_for_nonce_budget(&self, v: &KeyVersion) -> Result<()> {
        // A rotation that just failed is not retried by every caller (each would queue on the
        // write lock, call the KEK or HSM and log): they are refused with its reason.
        if let Some(e) = self.recent_rotation_failure(v) {
            return Err(e);
        }
        let _w = self.writes.lock().await;
        if let Some(e) = self.recent_rotation_failure(v) {
            return Err(e);
        }
        self.follow().await?;
        if self.key_entry(&v.engine, &v.key)?.primary_version != v.version {
            return Ok(());
        }
        let max = self.budgets.max();
        let reason = format!(
            "ok; reason: nonce budget ({max} encryptions of v{})",
            v.version
        );
        match self
            .rotate_locked(&v.engine, &v.key, "server", &reason)
            .await
        {
            Ok(k) => {
                tracing::info!(engine = %v.engine, key = %v.key, version = k.primary_version, "key rotated: the previous version used its AES-GCM nonce budget");
                Ok(())
            }
            Err(e) => Err(self.rotation_failed(v, max, &e)),
        }
    }

    /// Logs and remembers a failed budget rotation of `v`; the refusal callers get meanwhile.
    fn rotation_failed(&self, v: &KeyVersion, max: u64, e: &EngineError) -> EngineError {
        tracing::error!(engine = %v.engine, key = %v.key, error = %e, "nonce budget used up and automatic rotation failed; encryption refused");
        let msg = format!(
            "version {} of {}/{} has used its nonce budget of {max} encryptions and automatic rotation failed ({e}); encryption is refused until the key is rotated",
            v.version, v.engine, v.key
        );
        self.rotation_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (v.engine.clone(), v.key.clone(), v.version),
                (std::time::Instant::now(), msg.clone()),
            );
        EngineError::Precondition(msg)
    }
}
