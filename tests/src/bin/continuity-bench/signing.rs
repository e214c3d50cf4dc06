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

use crate::report::{Metric, percentile};
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

/// SVIDs per second through BatchNewX509SVID (TLS, auth, authorization, signing).
async fn server_rate(server: &TestServer, plan: &Plan, tag: &str) -> f64 {
    let agent = attest(&server.addr, server.bundle_der(), &server.token(None))
        .await
        .unwrap();
    let batch = 200;
    let ids = create_entries(
        server,
        &agent.id,
        batch,
        &format!("sign-{tag}"),
        "unix:uid:4242",
    )
    .await;
    let params: Vec<_> = ids
        .iter()
        .map(|id| NewX509svidParams {
            entry_id: id.clone(),
            csr: key_and_csr().1,
        })
        .collect();
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
                signed.fetch_add(
                    r.results.iter().filter(|r| r.svid.is_some()).count() as u64,
                    Ordering::Relaxed,
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    signed.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// In-process floor: the same CA code (CSR verify + SVID sign) with a P-256 key in memory, on
/// as many threads as the server has cores.
async fn in_process_rate(plan: &Plan, dir: &Path) -> f64 {
    use continuity_server::ca::{CaConfig, CaManager};
    use continuity_server::datastore::SqlDataStore;
    use continuity_server::keys::{KeyType, MemoryKeyManager};
    let store = SqlDataStore::connect(&format!(
        "sqlite://{}?mode=rwc",
        dir.join("floor-ca.sqlite3").display()
    ))
    .await
    .unwrap();
    let ca = CaManager::start(
        CaConfig {
            trust_domain: continuity_common::TrustDomain::new("example.org").unwrap(),
            x509_key_type: KeyType::EcP256,
            jwt_key_type: KeyType::EcP256,
            ttl: Duration::from_secs(86400),
            jwt_issuer: None,
        },
        Arc::new(MemoryKeyManager::default()),
        Arc::new(store),
        Arc::new(continuity_common::SystemClock),
    )
    .await
    .unwrap();
    let csrs: Arc<Vec<Vec<u8>>> = Arc::new((0..200).map(|_| key_and_csr().1).collect());
    let secs = plan.seconds;
    let start = Instant::now();
    let handles: Vec<_> = (0..cores())
        .map(|_| {
            let (ca, csrs) = (ca.clone(), csrs.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs_f64(secs);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    for csr in csrs.iter().take(20) {
                        ca.sign_x509_svid_from_csr(
                            "spiffe://example.org/w",
                            csr,
                            Duration::from_secs(3600),
                            &[],
                        )
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

/// Raw C_Sign rate (ECDSA P-256) with `threads` sessions, from a child process that loads
/// SoftHSM with the right SOFTHSM2_CONF.
fn raw_c_sign_rate(hsm: &SoftHsm, threads: usize, secs: f64) -> f64 {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--pkcs11-floor",
            &hsm.label,
            &hsm.pin,
            &threads.to_string(),
            &secs.to_string(),
        ])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("RATE "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "pkcs11 floor failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Child side of [`raw_c_sign_rate`].
pub fn pkcs11_floor_child(args: &[String]) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::Attribute;
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    let (label, pin, threads, secs): (&str, &str, usize, f64) = (
        &args[0],
        &args[1],
        args[2].parse().unwrap(),
        args[3].parse().unwrap(),
    );
    let ctx = Pkcs11::new(MODULE).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == label)
        .unwrap();
    let s0 = ctx.open_rw_session(slot).unwrap();
    s0.login(UserType::User, Some(&AuthPin::new(pin.to_string().into())))
        .unwrap();
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let (_, key) = s0
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::EcParams(p256),
                Attribute::Verify(true),
            ],
            &[
                Attribute::Token(false),
                Attribute::Sign(true),
                Attribute::Sensitive(true),
                Attribute::Private(true),
            ],
        )
        .unwrap();
    let digest = [7u8; 32];
    let start = Instant::now();
    let total: u64 = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                let ctx = &ctx;
                sc.spawn(move || {
                    let s = ctx.open_rw_session(slot).unwrap();
                    let deadline = Instant::now() + Duration::from_secs_f64(secs);
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        s.sign(&Mechanism::Ecdsa, key, &digest).unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    println!("RATE {}", total as f64 / start.elapsed().as_secs_f64());
    drop(s0);
    let _ = ctx.finalize();
}

/// SVID signing metrics, and EngineAPI metrics for hsm custody (needs the pkcs11 server).
pub async fn metrics(plan: &Plan, server: &TestServer, dir: &Path) -> Vec<Metric> {
    let mut out = Vec::new();
    let floor = in_process_rate(plan, dir).await;
    let disk = server_rate(server, plan, "disk").await;
    out.push(
        Metric::new(
            "signing: BatchNewX509SVID SVIDs/s, disk key",
            disk,
            "svid/s",
        )
        .floor("in-process CSR verify + sign", floor)
        .target(">= 0.70x floor"),
    );

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

    // hsm custody Engine through a second agent on the pkcs11 server.
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
    hsm_server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/bench",
        "--parent-id",
        alias,
        "--selector",
        &format!("unix:uid:{}", uid()),
        "--engine",
        "bench",
    ]);
    let agent = TestAgent::start_with(
        &dir.join("agent-hsm"),
        &hsm_server,
        &hsm_server.token(Some(alias)),
        "log_level = \"warn\"",
    );
    wait_for(20, "hsm agent serves", || {
        agent.cli(&["engine", "jwks"]).status.success()
    });
    let mut hsm_metrics = engine_metrics(plan, &agent, "hsm").await;
    for m in hsm_metrics.iter_mut().filter(|m| m.name.contains("ops/s")) {
        m.floor = Some((format!("raw C_Sign, {} sessions", cores()), raw));
    }
    for m in hsm_metrics.iter_mut().filter(|m| m.name.contains("p50")) {
        m.floor = Some((
            "raw C_Sign, 1 session".into(),
            1e6 / raw_c_sign_rate(&hsm, 1, plan.seconds / 2.0),
        ));
    }
    out.extend(hsm_metrics);
    out
}

/// EngineAPI.Sign latency and throughput through the agent; floors: in-process aws-lc sign.
pub async fn engine_metrics(plan: &Plan, agent: &TestAgent, custody: &str) -> Vec<Metric> {
    use continuity_proto::engine::SignRequest;
    use continuity_proto::engine::engine_api_client::EngineApiClient;
    let ch = continuity_common::grpc::uds_channel(&agent.socket)
        .await
        .unwrap();
    let sign_req = || {
        crate::workload::req(SignRequest {
            key: "signing".into(),
            message: b"benchmark message".to_vec(),
            ..Default::default()
        })
    };
    let mut c = EngineApiClient::new(ch.clone());
    c.sign(sign_req()).await.unwrap();
    let mut lat = Vec::new();
    for _ in 0..plan.latency_samples / 2 {
        let t = Instant::now();
        c.sign(sign_req()).await.unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let deadline = Instant::now() + Duration::from_secs_f64(plan.seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut c = EngineApiClient::new(ch.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                c.sign(crate::workload::req(SignRequest {
                    key: "signing".into(),
                    message: b"benchmark message".to_vec(),
                    ..Default::default()
                }))
                .await
                .unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    // Floor: the same signature in process.
    let kp = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
    )
    .unwrap();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let t = Instant::now();
    let mut k = 0u64;
    while t.elapsed() < Duration::from_millis(500) {
        kp.sign(&rng, b"benchmark message").unwrap();
        k += 1;
    }
    let one = k as f64 / t.elapsed().as_secs_f64();
    vec![
        Metric::new(
            format!("engine: EngineAPI.Sign p50 ({custody})"),
            percentile(&mut lat, 50.0),
            "us",
        )
        .floor("in-process P-256 sign", 1e6 / one),
        Metric::new(
            format!("engine: EngineAPI.Sign p99 ({custody})"),
            percentile(&mut lat, 99.0),
            "us",
        )
        .floor("in-process P-256 sign", 1e6 / one),
        Metric::new(
            format!("engine: EngineAPI.Sign ops/s, 16 clients ({custody})"),
            rate,
            "ops/s",
        )
        .floor(
            format!("in-process P-256 sign x{}", cores()),
            one * cores() as f64,
        ),
    ]
}
