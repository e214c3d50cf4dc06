//! SVID signing through the server (disk and pkcs11 key managers) against in-process and raw
//! PKCS#11 floors, and EngineAPI.Sign for transit and hsm custody.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use continuity_proto::admin::entry_admin_client::EntryAdminClient;
use continuity_proto::agent::{BatchNewX509svidRequest, NewX509svidParams};
use continuity_tests::agent::TestAgent;
use continuity_tests::agent_client::{attest, key_and_csr};
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::softhsm::{MODULE, SoftHsm};

use crate::hsm::raw_c_sign_rate;
use crate::report::Metric;
use crate::{Plan, QUIET_SERVER, uid, wait_for};

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Creates `n` entries parented to `parent` through the admin API; returns their ids.
pub async fn create_entries(
    server: &TestServer,
    parent: &str,
    n: usize,
    prefix: &str,
    selector: &str,
) -> Vec<String> {
    let ch = continuity_common::grpc::uds_channel(&server.socket)
        .await
        .unwrap();
    let sem = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut c = EntryAdminClient::new(ch.clone());
        let (parent, prefix, selector) =
            (parent.to_string(), prefix.to_string(), selector.to_string());
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let (t, v) = selector.split_once(':').unwrap();
            let e = continuity_proto::types::Entry {
                spiffe_id: format!("spiffe://example.org/{prefix}/{i}"),
                parent_id: parent,
                selectors: vec![continuity_proto::types::Selector {
                    r#type: t.into(),
                    value: v.into(),
                }],
                ..Default::default()
            };
            c.create_entry(continuity_proto::admin::CreateEntryRequest { entry: Some(e) })
                .await
                .unwrap()
                .into_inner()
                .id
        }));
    }
    let mut ids = Vec::with_capacity(n);
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids
}

/// An attested agent and a batch of 200 entries (with CSRs) it may sign.
async fn signing_agent(
    server: &TestServer,
    tag: &str,
) -> (
    continuity_tests::agent_client::Agent,
    Vec<NewX509svidParams>,
) {
    let agent = attest(&server.addr, server.bundle_der(), &server.token(None))
        .await
        .unwrap();
    let prefix = format!("sign-{tag}");
    let ids = create_entries(server, &agent.id, 200, &prefix, "unix:uid:4242").await;
    let params = ids
        .iter()
        .map(|id| NewX509svidParams {
            entry_id: id.clone(),
            csr: key_and_csr().1,
        })
        .collect();
    (agent, params)
}

/// SVIDs per second through BatchNewX509SVID (TLS, auth, authorization, signing), from as
/// many concurrent callers as there are cores.
pub async fn server_rate(server: &TestServer, plan: &Plan, tag: &str) -> f64 {
    let (agent, params) = signing_agent(server, tag).await;
    let signed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(plan.seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..cores() {
        let (mut c, params, signed) = (agent.client.clone(), params.clone(), signed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let r = c
                    .batch_new_x509svid(BatchNewX509svidRequest {
                        params: params.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let ok = r.results.iter().filter(|r| r.svid.is_some()).count();
                signed.fetch_add(ok as u64, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    signed.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// The CA code with a P-256 key in memory.
async fn floor_ca(dir: &Path) -> Arc<continuity_server::ca::CaManager> {
    use continuity_server::ca::{CaConfig, CaManager};
    use continuity_server::datastore::SqlDataStore;
    use continuity_server::keys::{KeyType, MemoryKeyManager};
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.join("floor-ca.sqlite3").display()
    );
    let sealer = continuity_server::datastore::RecordSealer::new(std::sync::Arc::new(
        continuity_server::keys::SoftwareMac::new(&[3; 32]),
    ));
    let store = SqlDataStore::connect(&url, sealer).await.unwrap();
    let config = CaConfig {
        trust_domain: continuity_common::TrustDomain::new("example.org").unwrap(),
        x509_key_type: KeyType::EcP256,
        jwt_key_type: KeyType::EcP256,
        ttl: Duration::from_secs(86400),
        jwt_issuer: None,
        upstream: None,
    };
    CaManager::start(
        config,
        Arc::new(MemoryKeyManager::default()),
        Arc::new(store),
        Arc::new(continuity_common::SystemClock),
    )
    .await
    .unwrap()
}

/// In-process floor: the same CA code (CSR verify + SVID sign) with a P-256 key in memory, on
/// as many threads as the server has cores.
async fn in_process_rate(plan: &Plan, dir: &Path) -> f64 {
    let ca = floor_ca(dir).await;
    let csrs: Arc<Vec<Vec<u8>>> = Arc::new((0..20).map(|_| key_and_csr().1).collect());
    let secs = plan.seconds;
    let start = Instant::now();
    let handles: Vec<_> = (0..cores())
        .map(|_| {
            let (ca, csrs) = (ca.clone(), csrs.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs_f64(secs);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    for csr in csrs.iter() {
                        let ttl = Duration::from_secs(3600);
                        ca.sign_x509_svid_from_csr("spiffe://example.org/w", csr, ttl, &[])
                            .unwrap();
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    total as f64 / start.elapsed().as_secs_f64()
}

fn pkcs11_server(dir: &Path, hsm: &SoftHsm) -> TestServer {
    TestServer::start(
        &dir.join("server-hsm"),
        ServerOptions {
            extra_toml: format!(
                "{QUIET_SERVER}[key_manager]\nkind = \"pkcs11\"\nmodule = \"{MODULE}\"\ntoken_label = \"{}\"\npin_env = \"PIN\"\n",
                hsm.label
            ),
            env: vec![
                ("SOFTHSM2_CONF".into(), hsm.conf.display().to_string()),
                ("PIN".into(), hsm.pin.clone()),
            ],
            ..Default::default()
        },
    )
}

/// An agent of the pkcs11 server whose entry for this uid is bound to an hsm-custody Engine.
fn hsm_engine_agent(hsm_server: &TestServer, dir: &Path) -> TestAgent {
    hsm_server.cli_ok(&["engine", "create", "bench", "--tier", "0"]);
    hsm_server.cli_ok(&[
        "engine",
        "key",
        "create",
        "bench",
        "signing",
        "--purpose",
        "sign",
    ]);
    let alias = "spiffe://example.org/node/bench-hsm";
    let selector = format!("unix:uid:{}", uid());
    hsm_server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/bench",
        "--parent-id",
        alias,
        "--selector",
        &selector,
        "--engine",
        "bench",
    ]);
    let agent = TestAgent::start_with(
        &dir.join("agent-hsm"),
        hsm_server,
        &hsm_server.token(Some(alias)),
        crate::QUIET_AGENT,
    );
    wait_for(20, "hsm agent serves", || {
        agent.cli(&["engine", "jwks"]).status.success()
    });
    agent
}

/// SVID signing rows (disk and pkcs11), then EngineAPI rows for hsm custody (which need the
/// pkcs11 server).
pub async fn metrics(plan: &Plan, server: &TestServer, dir: &Path) -> Vec<Metric> {
    let floor = in_process_rate(plan, dir).await;
    let disk = server_rate(server, plan, "disk").await;
    let mut out = vec![
        Metric::new(
            "signing: BatchNewX509SVID SVIDs/s, disk key",
            disk,
            "svid/s",
        )
        .floor("in-process CSR verify + sign", floor)
        .target(">= 0.70x floor"),
    ];
    let hsm = SoftHsm::new(&dir.join("hsm"), "bench");
    let hsm_server = pkcs11_server(dir, &hsm);
    let raw = raw_c_sign_rate(&hsm, cores(), plan.seconds);
    let p11 = server_rate(&hsm_server, plan, "hsm").await;
    out.push(
        Metric::new(
            "signing: BatchNewX509SVID SVIDs/s, pkcs11 (SoftHSM2)",
            p11,
            "svid/s",
        )
        .floor(format!("raw C_Sign, {} sessions", cores()), raw)
        .target(">= 0.70x floor"),
    );
    let agent = hsm_engine_agent(&hsm_server, dir);
    out.extend(crate::engine::metrics(plan, &agent.socket, "hsm", dir, Some(&hsm)).await);
    out
}
