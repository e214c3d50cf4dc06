//! The servers an agent may talk to, and which one it uses now.
//!
//! `server_address` lists one or more `host:port`; every address a DNS name resolves to is a
//! server of its own. The list is resolved at first use, again every [`RESOLVE_INTERVAL`],
//! and again after a failure (at most once per [`MIN_RESOLVE_INTERVAL`]); a name that fails
//! to resolve keeps the addresses it had. Each agent starts at a position chosen by its seed
//! (random per process), so a fleet spreads over the servers instead of piling onto the
//! first; on a failure the caller moves on to the next one ([`Servers::fail_over`]). The
//! back-off between attempts is the caller's (the sync loop's jittered exponential one).
//!
//! Invariant: `current < list.len()` whenever `list` is not empty.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use crate::config::ServerAddress;

/// How often the configured names are resolved again while all goes well.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(60);
/// Least time between two resolutions asked for by failures.
pub const MIN_RESOLVE_INTERVAL: Duration = Duration::from_secs(1);
/// Longest one name's resolution may take (a stalled resolver must not stall the agent).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Turns a configured address into socket addresses.
pub trait Resolve: Send + Sync + std::fmt::Debug {
    /// Every address `addr` stands for (an IP literal: itself).
    fn resolve<'a>(
        &'a self,
        addr: &'a ServerAddress,
    ) -> BoxFuture<'a, std::io::Result<Vec<SocketAddr>>>;
}

/// The operating system's resolver (getaddrinfo: /etc/hosts, DNS, ...), A and AAAA records.
#[derive(Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        addr: &'a ServerAddress,
    ) -> BoxFuture<'a, std::io::Result<Vec<SocketAddr>>> {
        Box::pin(async move {
            if let Some(ip) = addr.ip() {
                return Ok(vec![SocketAddr::new(ip, addr.port)]);
            }
            let lookup = tokio::net::lookup_host((addr.host.as_str(), addr.port));
            match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Ok(r) => Ok(r?.collect()),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {RESOLVE_TIMEOUT:?}"),
                )),
            }
        })
    }
}

/// The configured servers, resolved, and the one in use.
#[derive(Debug)]
pub struct Servers {
    configured: Vec<ServerAddress>,
    resolver: Arc<dyn Resolve>,
    seed: u64,
    state: Mutex<State>,
    /// Serializes resolutions (held across the lookups; nothing else waits on it).
    resolving: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct State {
    /// The addresses of each configured entry, as last resolved.
    by_entry: Vec<Vec<SocketAddr>>,
    /// Every address, in configured order (a name's addresses sorted), without duplicates.
    list: Vec<SocketAddr>,
    current: usize,
    resolved_at: Option<Instant>,
    /// A failure asked for a fresh resolution.
    stale: bool,
    /// Moves to another server so far.
    switches: u64,
}

impl Servers {
    /// The servers `configured`, resolved with `resolver`, starting at position `seed`.
    pub fn new(configured: Vec<ServerAddress>, resolver: Arc<dyn Resolve>, seed: u64) -> Self {
        let by_entry = vec![Vec::new(); configured.len()];
        Self {
            configured,
            resolver,
            seed,
            state: Mutex::new(State {
                by_entry,
                ..State::default()
            }),
            resolving: tokio::sync::Mutex::new(()),
        }
    }

    /// The server to use now, resolving first if due; None if no address resolved.
    pub async fn current(&self) -> Option<SocketAddr> {
        if self.resolve_due() {
            self.resolve().await;
        }
        self.peek()
    }

    /// The server in use, without resolving.
    pub fn peek(&self) -> Option<SocketAddr> {
        let st = self.state();
        st.list.get(st.current).copied()
    }

    /// Every address, in the order the agent tries them.
    pub fn list(&self) -> Vec<SocketAddr> {
        self.state().list.clone()
    }

    /// How many times the agent moved to another server.
    pub fn switches(&self) -> u64 {
        self.state().switches
    }

    /// Moves on from `from` (the server that failed) to the next one, and asks for a fresh
    /// resolution. A no-op if another caller already moved on from it. Returns the server
    /// to use next.
    pub fn fail_over(&self, from: SocketAddr) -> Option<SocketAddr> {
        let mut st = self.state();
        st.stale = true;
        if st.list.get(st.current) == Some(&from) && st.list.len() > 1 {
            st.current = (st.current + 1) % st.list.len();
            st.switches += 1;
            let to = st.list[st.current];
            tracing::info!(from = %from, to = %to, "moving to the next server");
        }
        st.list.get(st.current).copied()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn resolve_due(&self) -> bool {
        let st = self.state();
        match st.resolved_at {
            None => true,
            Some(at) => {
                let age = at.elapsed();
                age >= RESOLVE_INTERVAL
                    || ((st.stale || st.list.is_empty()) && age >= MIN_RESOLVE_INTERVAL)
            }
        }
    }

    /// Resolves every configured entry (one caller at a time) and keeps the current server
    /// if it is still listed.
    async fn resolve(&self) {
        let _one = self.resolving.lock().await;
        if !self.resolve_due() {
            return;
        }
        let mut fresh = Vec::with_capacity(self.configured.len());
        for a in &self.configured {
            fresh.push(match self.resolver.resolve(a).await {
                Ok(mut v) if !v.is_empty() => {
                    v.sort();
                    v.dedup();
                    Some(v)
                }
                Ok(_) => {
                    tracing::warn!(address = %a, "server address resolved to nothing; keeping its previous addresses");
                    None
                }
                Err(e) => {
                    tracing::warn!(address = %a, error = %e, "cannot resolve server address; keeping its previous addresses");
                    None
                }
            });
        }
        self.apply(fresh);
    }

    fn apply(&self, fresh: Vec<Option<Vec<SocketAddr>>>) {
        let mut st = self.state();
        for (slot, f) in st.by_entry.iter_mut().zip(fresh) {
            if let Some(v) = f {
                *slot = v;
            }
        }
        let mut list: Vec<SocketAddr> = Vec::new();
        for a in st.by_entry.iter().flatten() {
            if !list.contains(a) {
                list.push(*a);
            }
        }
        let previous = st.list.get(st.current).copied();
        if list != st.list {
            tracing::info!(servers = ?list, "server addresses");
        }
        st.current = match previous.and_then(|p| list.iter().position(|a| *a == p)) {
            Some(i) => i,
            None if list.is_empty() => 0,
            None => (self.seed % list.len() as u64) as usize,
        };
        st.list = list;
        st.resolved_at = Some(Instant::now());
        st.stale = false;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A fixed name table standing in for DNS (a name with several A/AAAA records cannot be
    /// made on the test machine without editing /etc/hosts).
    #[derive(Debug, Default)]
    struct Table(Mutex<HashMap<String, std::io::Result<Vec<SocketAddr>>>>);

    impl Table {
        fn set(&self, host: &str, r: std::io::Result<Vec<&str>>) {
            let r = r.map(|v| v.into_iter().map(|s| s.parse().unwrap()).collect());
            self.0.lock().unwrap().insert(host.into(), r);
        }
    }

    impl Resolve for Table {
        fn resolve<'a>(
            &'a self,
            addr: &'a ServerAddress,
        ) -> BoxFuture<'a, std::io::Result<Vec<SocketAddr>>> {
            Box::pin(async move {
                if let Some(ip) = addr.ip() {
                    return Ok(vec![SocketAddr::new(ip, addr.port)]);
                }
                match self.0.lock().unwrap().get(&addr.host) {
                    Some(Ok(v)) => Ok(v.clone()),
                    Some(Err(e)) => Err(std::io::Error::new(e.kind(), e.to_string())),
                    None => Err(std::io::ErrorKind::NotFound.into()),
                }
            })
        }
    }

    fn addrs(list: &[&str]) -> Vec<ServerAddress> {
        list.iter()
            .map(|s| ServerAddress::parse(s).unwrap())
            .collect()
    }

    fn sock(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn a_name_with_several_records_is_several_servers_and_seeds_spread() {
        let table = Arc::new(Table::default());
        table.set(
            "servers.example",
            Ok(vec!["10.0.0.2:8081", "10.0.0.1:8081", "[fd00::1]:8081"]),
        );
        let configured = addrs(&["servers.example:8081", "192.0.2.1:9"]);
        let mut starts = std::collections::HashSet::new();
        for seed in 0..4 {
            let s = Servers::new(configured.clone(), table.clone(), seed);
            starts.insert(s.current().await.unwrap());
            assert_eq!(
                s.list(),
                vec![
                    sock("10.0.0.1:8081"),
                    sock("10.0.0.2:8081"),
                    sock("[fd00::1]:8081"),
                    sock("192.0.2.1:9")
                ]
            );
        }
        assert_eq!(
            starts.len(),
            4,
            "four seeds start on four different servers"
        );
    }

    #[tokio::test]
    async fn the_real_resolver_resolves_localhost() {
        let s = Servers::new(addrs(&["localhost:8081"]), Arc::new(SystemResolver), 0);
        let list = {
            s.current().await.unwrap();
            s.list()
        };
        assert!(!list.is_empty());
        assert!(
            list.iter()
                .all(|a| a.ip().is_loopback() && a.port() == 8081),
            "{list:?}"
        );
    }

    #[tokio::test]
    async fn fail_over_cycles_once_per_failure_and_keeps_the_server_across_resolutions() {
        let table = Arc::new(Table::default());
        table.set(
            "ha.example",
            Ok(vec!["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]),
        );
        let s = Servers::new(addrs(&["ha.example:1"]), table.clone(), 0);
        let a = s.current().await.unwrap();
        assert_eq!(a, sock("10.0.0.1:1"));
        let b = s.fail_over(a).unwrap();
        assert_eq!(b, sock("10.0.0.2:1"));
        // A second report of the same failure (another caller) does not skip a server.
        assert_eq!(s.fail_over(a), Some(b));
        assert_eq!(s.switches(), 1);
        // The failure asked for a fresh resolution: the name changed meanwhile; the server in
        // use is still listed, so it stays in use.
        table.set("ha.example", Ok(vec!["10.0.0.2:1", "10.0.0.9:1"]));
        tokio::time::sleep(MIN_RESOLVE_INTERVAL).await;
        assert_eq!(s.current().await, Some(b));
        assert_eq!(s.list(), vec![b, sock("10.0.0.9:1")]);
        assert_eq!(s.fail_over(b), Some(sock("10.0.0.9:1")));
        assert_eq!(s.fail_over(sock("10.0.0.9:1")), Some(b), "wraps around");
    }

    #[tokio::test]
    async fn a_name_that_stops_resolving_keeps_its_addresses() {
        let table = Arc::new(Table::default());
        table.set("ha.example", Ok(vec!["10.0.0.1:1", "10.0.0.2:1"]));
        let s = Servers::new(addrs(&["ha.example:1"]), table.clone(), 1);
        assert_eq!(s.current().await, Some(sock("10.0.0.2:1")));
        table.set("ha.example", Err(std::io::ErrorKind::TimedOut.into()));
        s.fail_over(sock("10.0.0.2:1"));
        tokio::time::sleep(MIN_RESOLVE_INTERVAL).await;
        assert_eq!(s.current().await, Some(sock("10.0.0.1:1")));
        assert_eq!(s.list().len(), 2);
        // Nothing ever resolved: no server, and no tight loop of lookups (at most one per
        // MIN_RESOLVE_INTERVAL).
        let none = Servers::new(addrs(&["missing.example:1"]), table, 0);
        assert_eq!(none.current().await, None);
        assert!(!none.resolve_due());
    }
}
