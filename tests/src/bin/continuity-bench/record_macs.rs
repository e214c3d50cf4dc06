//! The cost of record MACs, measured in the same run: Engine sign and entry-write throughput
//! through the server's own datastore, Engines and audit code, once with the record-MAC key
//! and once with the benchmark-only unsealed store (`RecordSealer::unsealed_for_benchmark`,
//! not reachable from any config). Rounds alternate between the two so drift hits both.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use continuity_common::{Clock, SystemClock, TrustDomain};
use continuity_server::audit::{Audit, AuditEvent};
use continuity_server::datastore::{Entry, RecordSealer, SqlDataStore, Write};
use continuity_server::engines::Engines;
use continuity_server::keys::{KeyManager, MemoryKeyManager};
use continuity_server::model::engine::Purpose;

use crate::Plan;
use crate::report::Metric;

/// The cost target of record MACs.
const TARGET: &str = "MAC cost <= 10 % (ratio >= 0.90)";
/// Concurrent callers per measurement.
const CALLERS: usize = 8;

/// One side of the A/B: a datastore (sealed or not) with the Engines and audit log over it.
struct Side {
    audit: Arc<Audit>,
    engines: Arc<Engines>,
    entries: AtomicU64,
}

impl Side {
    async fn open(dir: &Path, name: &str, sealed: bool) -> Self {
        let keys: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::default());
        let sealer = if sealed {
            continuity_server::integrity::sealer(&*keys).await.unwrap()
        } else {
            RecordSealer::unsealed_for_benchmark()
        };
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.join(format!("{name}.sqlite3")).display()
        );
        let store = Arc::new(SqlDataStore::connect(&url, sealer).await.unwrap());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let mac = keys
            .mac_key(continuity_server::audit::AUDIT_MAC_KEY)
            .await
            .unwrap();
        let audit = Audit::load(store.clone(), clock.clone(), mac, None)
            .await
            .unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let engines = Engines::load(td, store, keys, clock, audit.clone())
            .await
            .unwrap();
        engines
            .create_engine("bench", 1, None, None, false, "bench")
            .await
            .unwrap();
        engines
            .create_key("bench", "signing", Purpose::Sign, None, 0, 86_400, "bench")
            .await
            .unwrap();
        Self {
            audit,
            engines,
            entries: AtomicU64::new(0),
        }
    }

    /// Engine signatures per second (digests, transit custody, each one audited).
    async fn sign_rate(self: &Arc<Self>, secs: f64) -> f64 {
        rate(
            secs,
            |side: Arc<Self>| async move {
                let digest = [7u8; 32];
                side.engines
                    .sign("bench", "signing", 0, None, Some(&digest), "bench")
                    .await
                    .unwrap();
            },
            self,
        )
        .await
    }

    /// Entries created per second (one audited transaction each, as the admin API does).
    async fn entry_rate(self: &Arc<Self>, secs: f64) -> f64 {
        rate(
            secs,
            |side: Arc<Self>| async move {
                let n = side.entries.fetch_add(1, Ordering::Relaxed);
                let e = entry(n);
                let event = AuditEvent::ok("bench", "entry.create", &e.id);
                side.audit
                    .commit(&[Write::CreateEntry(e)], &[event])
                    .await
                    .unwrap();
            },
            self,
        )
        .await
    }
}

/// An entry like the ones operators write: one selector, two DNS names.
fn entry(n: u64) -> Entry {
    let id = |s: &str| continuity_common::SpiffeId::new(s).unwrap();
    Entry {
        id: format!("bench-{n}"),
        spiffe_id: id(&format!("spiffe://example.org/bench/{n}")),
        parent_id: id("spiffe://example.org/node/bench"),
        selectors: serde_json::from_str(r#"[{"type":"unix","value":"uid:1000"}]"#).unwrap(),
        x509_svid_ttl: 0,
        jwt_svid_ttl: 0,
        dns_names: vec!["bench.example.org".into(), "b.example.org".into()],
        hint: String::new(),
        admin: false,
        engine: None,
        federates_with: vec![],
        revision: 0,
        created_at: 1,
    }
}

/// Calls of `op` per second from [`CALLERS`] concurrent tasks for `secs`.
async fn rate<F, Fut>(secs: f64, op: F, side: &Arc<Side>) -> f64
where
    F: Fn(Arc<Side>) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let side = side.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    op(side.clone()).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// Alternating rounds per figure: each round measures both sides, in swapped order.
const ROUNDS: usize = 6;

/// The median of `v`.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The record-MAC rows: each figure with MACs, its floor the same without. Both sides run in
/// alternating rounds (order swapped each round) and each reports its median, so background
/// load does not decide the ratio. The datastores live on tmpfs (`/dev/shm`) when there is
/// one: an fsync there costs nothing, so the MAC's CPU cost is not hidden behind disk latency
/// (the strictest case) and the disk's noise does not swamp it.
pub async fn metrics(plan: &Plan, dir: &Path) -> Vec<Metric> {
    let shm = Path::new("/dev/shm");
    let tmp = shm
        .is_dir()
        .then(|| tempfile::tempdir_in(shm).ok())
        .flatten();
    let dir = tmp.as_ref().map_or(dir, |t| t.path());
    let sealed = Arc::new(Side::open(dir, "macs-on", true).await);
    let plain = Arc::new(Side::open(dir, "macs-off", false).await);
    let secs = plan.seconds / ROUNDS as f64;
    let (mut sign, mut write) = ([vec![], vec![]], [vec![], vec![]]);
    for round in 0..ROUNDS {
        let mut order = [(0, &sealed), (1, &plain)];
        if round % 2 == 1 {
            order.reverse();
        }
        for (i, side) in order {
            sign[i].push(side.sign_rate(secs).await);
        }
        for (i, side) in order {
            write[i].push(side.entry_rate(secs).await);
        }
    }
    let [sign_on, sign_off] = sign.map(median);
    let [write_on, write_off] = write.map(median);
    vec![
        Metric::new("Engine sign, in process, record MACs on", sign_on, "ops/s")
            .floor("same, record MACs off", sign_off)
            .target(TARGET),
        Metric::new("entry write (audited), record MACs on", write_on, "ops/s")
            .floor("same, record MACs off", write_off)
            .target(TARGET),
    ]
}
