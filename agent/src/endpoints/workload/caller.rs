//! Who is calling: the caller of a Workload API (or EngineAPI) request, attested once per
//! connection, and the gate that bounds how many attestations run at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use continuity_attestors::Selector;
use tonic::{Request, Status};

use crate::attestor::WorkloadAttestor;
use crate::endpoints::WorkloadConnInfo;
use crate::endpoints::conns::StreamGuard;
use crate::limits::CallerKey;

/// The attested caller of one request: its selectors and its process.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Selectors from attestation.
    pub selectors: Arc<HashSet<Selector>>,
    /// The process.
    pub peer: Arc<crate::peer::Peer>,
    /// Stable id of the process (pid + start time).
    pub workload_id: Arc<str>,
    /// Keeps the connection counted busy while this call (or its response stream) lives.
    pub call: Option<Arc<StreamGuard>>,
}

impl Caller {
    /// The pod UID from the `k8s:pod-uid` selector, if the caller runs in a pod.
    fn pod_uid(&self) -> Option<&str> {
        self.selectors
            .iter()
            .find(|s| s.kind == "k8s" && s.value.starts_with("pod-uid:"))
            .map(|s| &s.value["pod-uid:".len()..])
    }

    /// Who the rate limits count this caller as: its pod if it has one, else its uid.
    pub fn rate_key(&self) -> CallerKey {
        match self.pod_uid() {
            Some(p) => CallerKey::Pod(p.to_string()),
            None => CallerKey::Uid(self.peer.uid),
        }
    }

    /// The workload description sent to the server (audit, incarnations).
    pub fn workload(&self) -> continuity_proto::engine::Workload {
        let mut selectors: Vec<_> = self.selectors.iter().cloned().collect();
        selectors.sort();
        continuity_proto::engine::Workload {
            // A pod is named by its UID (it is the runtime unit); other processes by pid + start.
            id: self
                .pod_uid()
                .map_or_else(|| self.workload_id.to_string(), |p| format!("pod:{p}")),
            pid: self.peer.pid,
            uid: self.peer.uid,
            selectors: selectors
                .into_iter()
                .map(|s| continuity_proto::types::Selector {
                    r#type: s.kind,
                    value: s.value,
                })
                .collect(),
        }
    }
}

/// Attests the caller of `req` once per connection (Unavailable when attestation fails).
pub async fn attest_caller<T>(
    req: &Request<T>,
    attestor: &Arc<dyn WorkloadAttestor>,
) -> Result<Caller, Status> {
    let conn = req
        .extensions()
        .get::<WorkloadConnInfo>()
        .cloned()
        .ok_or_else(|| Status::unavailable("workload attestation failed: no peer information"))?;
    let call = Arc::new(conn.calls.open());
    let info = conn.info;
    let peer = info.peer.clone().ok_or_else(|| {
        Status::unavailable("workload attestation failed: peer credentials unavailable")
    })?;
    let attestor = attestor.clone();
    let p = peer.clone();
    let uid = peer.uid;
    let selectors = info
        .selectors
        .get_or_try_init(|| async move {
            // A process seen before is confirmed in place; only a fresh attestation (or one
            // the cache cannot confirm) takes a permit and a blocking thread.
            if let Some(s) = attestor.attest_cached(&p) {
                return Ok(s);
            }
            let result = ATTEST_GATE.run(uid, move || attestor.attest(&p)).await?;
            match result {
                Ok(s) => Ok(s),
                Err(e) => {
                    tracing::info!(error = %e, "workload attestation failed");
                    Err(Status::unavailable(format!(
                        "workload attestation failed: {e}"
                    )))
                }
            }
        })
        .await?
        .clone();
    let workload_id = info.workload_id.clone();
    Ok(Caller {
        selectors,
        peer,
        workload_id,
        call: Some(call),
    })
}

/// Attestations running at once, in all.
pub const MAX_ATTESTATIONS: usize = 64;
/// Attestations running at once for one uid.
pub const MAX_ATTESTATIONS_PER_UID: usize = 8;
/// Longest an attestation may take, waiting for its turn included (then Unavailable).
pub const ATTESTATION_TIMEOUT: Duration = Duration::from_secs(10);

static ATTEST_GATE: std::sync::LazyLock<AttestGate> = std::sync::LazyLock::new(|| {
    AttestGate::new(
        MAX_ATTESTATIONS,
        MAX_ATTESTATIONS_PER_UID,
        ATTESTATION_TIMEOUT,
    )
});

/// Bounds blocking attestations: in all, per uid, and in time. A permit is held by the
/// blocking task itself, so one stuck past the timeout still counts until it returns.
/// Invariant: a uid's entry lives while `users` (counted under the lock) is above zero.
pub(super) struct AttestGate {
    global: Arc<tokio::sync::Semaphore>,
    max: usize,
    per_uid: usize,
    timeout: Duration,
    pub(super) uids: Arc<Mutex<UidSemaphores>>,
}

type UidSemaphores = HashMap<u32, (Arc<tokio::sync::Semaphore>, usize)>;

/// One caller's use of its uid's semaphore (held until its attestation returns); the last
/// one out removes the entry.
struct UidUse {
    uids: Arc<Mutex<UidSemaphores>>,
    uid: u32,
    sem: Arc<tokio::sync::Semaphore>,
}

impl Drop for UidUse {
    fn drop(&mut self) {
        let mut uids = self.uids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = uids.get_mut(&self.uid) {
            e.1 = e.1.saturating_sub(1);
            if e.1 == 0 {
                uids.remove(&self.uid);
            }
        }
    }
}

impl AttestGate {
    pub(super) fn new(global: usize, per_uid: usize, timeout: Duration) -> Self {
        Self {
            global: Arc::new(tokio::sync::Semaphore::new(global)),
            max: global,
            per_uid,
            timeout,
            uids: Arc::default(),
        }
    }

    fn join(&self, uid: u32) -> UidUse {
        let mut uids = self.uids.lock().unwrap_or_else(|e| e.into_inner());
        let e = uids
            .entry(uid)
            .or_insert_with(|| (Arc::new(tokio::sync::Semaphore::new(self.per_uid)), 0));
        e.1 += 1;
        UidUse {
            uids: self.uids.clone(),
            uid,
            sem: e.0.clone(),
        }
    }

    /// Runs `f` on a blocking thread once both a uid and a global permit are free, or fails
    /// with Unavailable when that and `f` together take longer than the timeout.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        uid: u32,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        let busy = || {
            Status::unavailable(format!(
                "workload attestation timed out after {:?} (at most {} at once, {} per uid)",
                self.timeout, self.max, self.per_uid
            ))
        };
        let work = async {
            let u = self.join(uid);
            let mine = u.sem.clone().acquire_owned().await;
            let all = self.global.clone().acquire_owned().await;
            let (Ok(mine), Ok(all)) = (mine, all) else {
                return Err(Status::unavailable("workload attestation is shutting down"));
            };
            tokio::task::spawn_blocking(move || {
                let _held = (mine, all, u);
                f()
            })
            .await
            .map_err(|e| Status::unavailable(format!("workload attestation failed: {e}")))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| Err(busy()))
    }
}
