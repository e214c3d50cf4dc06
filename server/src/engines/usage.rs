//! Audit glue for key uses: every sign, encrypt, decrypt and delivery is recorded (the
//! version used, or the refusal) before its answer leaves the service.

use std::future::Future;

use super::{EngineError, Engines, Result};

impl Engines {
    /// Runs the key use `op` and records its outcome as `action` on `target` by `actor`;
    /// `version` names the key version a success used. A failed record fails the use.
    pub(super) async fn audited<T>(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        version: impl FnOnce(&T) -> u32,
        op: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let outcome = op.await;
        self.audit_use(actor, action, target, outcome.as_ref().map(version))
            .await?;
        outcome
    }

    /// Records one key use: the version used and "ok", or version 0 and the refusal.
    async fn audit_use(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        outcome: std::result::Result<u32, &EngineError>,
    ) -> Result<()> {
        let (version, result) = match outcome {
            Ok(v) => (v, "ok".to_string()),
            Err(e) => (0, format!("refused: {e}")),
        };
        self.audit
            .record(actor, action, target, version, &result)
            .await?;
        Ok(())
    }
}
