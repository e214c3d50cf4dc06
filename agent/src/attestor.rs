//! Workload attestation: the configured attestors (today: unix) run against a connection's
//! peer, and the result stands only if the peer is still the process that connected.

use std::collections::HashSet;
use std::sync::Arc;

use continuity_attestors::Selector;
use continuity_attestors::unix::UnixAttestor;

use crate::endpoints::peer::Peer;

/// Turns a connected peer into selectors (the Workload API's view of attestation).
pub trait WorkloadAttestor: Send + Sync + 'static {
    /// Selectors of the peer; an error means attestation failed (the caller gets Unavailable).
    fn attest(&self, peer: &Peer) -> Result<HashSet<Selector>, String>;
}

/// The attestors enabled in agent.toml.
#[derive(Debug)]
pub struct Attestors {
    unix: Option<UnixAttestor>,
}

impl Attestors {
    /// Attestors from config.
    pub fn new(unix: Option<continuity_attestors::unix::UnixConfig>) -> Arc<Self> {
        Arc::new(Self {
            unix: unix.map(UnixAttestor::new),
        })
    }
}

impl WorkloadAttestor for Attestors {
    fn attest(&self, peer: &Peer) -> Result<HashSet<Selector>, String> {
        let mut out = HashSet::new();
        if let Some(unix) = &self.unix {
            out.extend(
                unix.attest(peer.pid, peer.uid, peer.gid)
                    .map_err(|e| e.to_string())?,
            );
        }
        if !peer.still_same_process() {
            return Err(format!(
                "process {} exited or was replaced during attestation",
                peer.pid
            ));
        }
        Ok(out)
    }
}
