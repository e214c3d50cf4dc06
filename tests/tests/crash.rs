#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]
//! Crash safety: the real server (SQLite) and agent, killed with SIGKILL at random moments
//! under load from several concurrent clients, lose nothing they acknowledged.
//!
//! Clients record a write only once it was acknowledged: entry creates, updates and deletes
//! through the admin API, join tokens generated and then used by an agent attesting with
//! them, and Engine signatures made by a workload through the agent's EngineAPI. A write
//! whose call failed may or may not have happened; it is kept as the one other state the
//! datastore may hold. The seed (printed; `CRASH_SEED=<n>` repeats the kill schedule and the
//! client choices) drives where the kills land.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use continuity_common::tls::{TrustRoots, client_config};
use continuity_proto::admin::audit_admin_client::AuditAdminClient;
use continuity_proto::admin::entry_admin_client::EntryAdminClient;
use continuity_proto::admin::token_admin_client::TokenAdminClient;
use continuity_proto::admin::{
    CreateEntryRequest, DeleteEntryRequest, GenerateTokenRequest, ListEntriesRequest,
    ShowAuditRequest, UpdateEntryRequest,
};
use continuity_proto::agent::agent_api_client::AgentApiClient;
use continuity_proto::agent::{AttestAgentRequest, AttestationData, attest_agent_request};
use continuity_proto::engine::SignRequest;
use continuity_proto::engine::engine_api_client::EngineApiClient;
use continuity_proto::types::{Entry, Selector};
use continuity_tests::agent::TestAgent;
use continuity_tests::agent_client::{key_and_csr, server_id};
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::{fetch_x509, uid, with_header};
use tonic::transport::Channel;

const ALIAS: &str = "spiffe://example.org/node/crash";
const ENGINE: &str = "crashe";
const WORKLOAD_ID: &str = "spiffe://example.org/crashe";
const SERVER_KILLS: usize = 20;
const AGENT_KILLS: usize = 20;
const ENTRY_WRITERS: usize = 3;
const SIGNERS: usize = 2;
/// Longest wait for one call; a call cut off by it counts as not acknowledged.
const CALL_LIMIT: Duration = Duration::from_secs(5);

/// SplitMix64: small, seedable, good enough to place kills and pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

fn seed() -> u64 {
    let seed = std::env::var("CRASH_SEED").ok().map_or_else(
        || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        },
        |s| s.parse().expect("CRASH_SEED is a number"),
    );
    println!("crash seed: {seed} (CRASH_SEED={seed} repeats this schedule)");
    eprintln!("crash seed: {seed}");
    seed
}

/// What an entry holds: `Some(hint)` present with that hint, `None` deleted.
type Content = Option<String>;

/// One entry a writer made: the last acknowledged content, and the contents of the calls
/// since then that failed (any of them may have been committed before a kill).
#[derive(Debug, Clone)]
struct Fate {
    template: Entry,
    acked: Content,
    maybe: Vec<Content>,
}

/// Everything the clients were told succeeded.
#[derive(Debug, Default)]
struct Ledger {
    entries: HashMap<String, Fate>,
    /// SPIFFE IDs of creates whose answer was lost: such an entry may exist.
    unacked_creates: HashSet<String>,
    /// Join tokens generated (acknowledged) and deliberately never used.
    fresh_tokens: Vec<String>,
    /// Join tokens an agent attested with (acknowledged).
    used_tokens: Vec<String>,
    acked: Counts,
    /// Failed calls by status code (while the server was down, mostly Unavailable).
    failures: std::collections::BTreeMap<String, (u64, String)>,
}

impl Ledger {
    fn failed(&mut self, s: &tonic::Status) {
        let f = self.failures.entry(format!("{:?}", s.code())).or_default();
        f.0 += 1;
        f.1 = s.message().chars().take(120).collect();
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    creates: u64,
    updates: u64,
    deletes: u64,
    tokens: u64,
    attestations: u64,
}

struct Load {
    ledger: Arc<Mutex<Ledger>>,
    signatures: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn admin_channel(server: &std::path::Path) -> Channel {
    loop {
        if let Ok(Ok(ch)) =
            tokio::time::timeout(CALL_LIMIT, continuity_common::grpc::uds_channel(server)).await
        {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// A call with [`CALL_LIMIT`]; a timeout is an unavailable server.
async fn call<T>(
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(CALL_LIMIT, f).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::unavailable(
            "no answer within the call limit",
        )),
    }
}

/// Creates, updates and deletes entries parented to the agent's alias (so the agent syncs,
/// signs and saves them too) until told to stop.
async fn entry_writer(
    socket: std::path::PathBuf,
    phase: &'static str,
    w: usize,
    mut rng: Rng,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
) {
    let mut c = EntryAdminClient::new(admin_channel(&socket).await);
    let mut live: Vec<String> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let pick = rng.below(10);
        let failed = if live.len() < 3 || pick < 4 {
            n += 1;
            let template = Entry {
                spiffe_id: format!("spiffe://example.org/crash/{phase}/w{w}/{n}"),
                parent_id: ALIAS.into(),
                selectors: vec![Selector {
                    r#type: "unix".into(),
                    value: format!("uid:{}", 20_000 + w as u64 * 10_000 + n),
                }],
                hint: "v0".into(),
                ..Default::default()
            };
            let r = call(c.create_entry(CreateEntryRequest {
                entry: Some(template.clone()),
            }))
            .await;
            let mut l = ledger.lock().unwrap();
            match r {
                Ok(e) => {
                    l.acked.creates += 1;
                    live.push(e.id.clone());
                    let template = Entry {
                        id: e.id.clone(),
                        ..template
                    };
                    l.entries.insert(
                        e.id,
                        Fate {
                            template,
                            acked: Some("v0".into()),
                            maybe: Vec::new(),
                        },
                    );
                    false
                }
                Err(s) => {
                    l.failed(&s);
                    l.unacked_creates.insert(template.spiffe_id);
                    true
                }
            }
        } else if pick < 8 {
            let id = live[rng.below(live.len() as u64) as usize].clone();
            let hint = format!("v{}", rng.below(1_000_000));
            let mut e = ledger.lock().unwrap().entries[&id].template.clone();
            e.hint = hint.clone();
            let r = call(c.update_entry(UpdateEntryRequest { entry: Some(e) })).await;
            settle(&ledger, &mut live, &id, Some(hint), r.map(|_| ()), |c| {
                c.updates += 1;
            })
        } else {
            let id = live[rng.below(live.len() as u64) as usize].clone();
            let r = call(c.delete_entry(DeleteEntryRequest { id: id.clone() })).await;
            settle(&ledger, &mut live, &id, None, r.map(|_| ()), |c| {
                c.deletes += 1;
            })
        };
        if failed {
            tokio::time::sleep(Duration::from_millis(20)).await;
            c = EntryAdminClient::new(admin_channel(&socket).await);
        }
    }
}

/// Records the outcome of an update (`to` = Some) or delete (`to` = None) of `id`; true if
/// the call failed.
fn settle(
    ledger: &Mutex<Ledger>,
    live: &mut Vec<String>,
    id: &str,
    to: Content,
    r: Result<(), tonic::Status>,
    count: impl FnOnce(&mut Counts),
) -> bool {
    let mut l = ledger.lock().unwrap();
    let gone = |live: &mut Vec<String>| live.retain(|x| x != id);
    let failed = r.is_err();
    match r {
        Ok(()) => {
            count(&mut l.acked);
            let f = l.entries.get_mut(id).unwrap();
            f.acked = to.clone();
            f.maybe.clear();
            if to.is_none() {
                gone(live);
            }
        }
        // A delete cut off by a kill that did commit: the entry is gone for good.
        Err(s) if s.code() == tonic::Code::NotFound => {
            let f = l.entries.get_mut(id).unwrap();
            assert!(
                f.maybe.contains(&None),
                "entry {id} vanished without a delete that may have committed: {s}"
            );
            f.acked = None;
            f.maybe.clear();
            gone(live);
        }
        Err(s) => {
            l.failed(&s);
            l.entries.get_mut(id).unwrap().maybe.push(to);
        }
    }
    failed
}

/// Attests with a join token over a fresh connection; the agent's SPIFFE ID or the refusal.
async fn attest(addr: &str, bundle: &[Vec<u8>], token: &str) -> Result<String, tonic::Status> {
    let cfg = client_config(TrustRoots::new(bundle.to_vec()), server_id(), None).unwrap();
    let ch = tokio::time::timeout(
        CALL_LIMIT,
        continuity_common::grpc::tls_channel(addr.to_string(), Arc::new(cfg)),
    )
    .await
    .map_err(|_| tonic::Status::unavailable("connect timed out"))?
    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let req = AttestAgentRequest {
        step: Some(attest_agent_request::Step::Params(
            attest_agent_request::Params {
                data: Some(AttestationData {
                    r#type: "join_token".into(),
                    payload: token.as_bytes().to_vec(),
                }),
                csr: key_and_csr().1,
            },
        )),
    };
    let mut client = AgentApiClient::new(ch);
    let mut stream = call(client.attest_agent(tokio_stream::once(req))).await?;
    let msg = tokio::time::timeout(CALL_LIMIT, stream.message())
        .await
        .map_err(|_| tonic::Status::unavailable("no attestation result in time"))??
        .ok_or_else(|| tonic::Status::unavailable("no attestation result"))?;
    match msg.step {
        Some(continuity_proto::agent::attest_agent_response::Step::Result(r)) => {
            Ok(r.svid.unwrap().spiffe_id)
        }
        _ => Err(tonic::Status::internal("expected an attestation result")),
    }
}

/// Generates join tokens and attests with two of every three; the third stays fresh.
async fn token_user(
    socket: std::path::PathBuf,
    addr: String,
    bundle: Vec<Vec<u8>>,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
) {
    let mut c = TokenAdminClient::new(admin_channel(&socket).await);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let token = match call(c.generate_token(GenerateTokenRequest {
            spiffe_id: String::new(),
            ttl: 3600,
        }))
        .await
        {
            Ok(t) => t.token,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                c = TokenAdminClient::new(admin_channel(&socket).await);
                continue;
            }
        };
        n += 1;
        ledger.lock().unwrap().acked.tokens += 1;
        if n.is_multiple_of(3) {
            ledger.lock().unwrap().fresh_tokens.push(token);
            continue;
        }
        match attest(&addr, &bundle, &token).await {
            Ok(_) => {
                let mut l = ledger.lock().unwrap();
                l.acked.attestations += 1;
                l.used_tokens.push(token);
            }
            // Used or not, unknown: it is in neither list.
            Err(s) => assert_ne!(
                s.code(),
                tonic::Code::PermissionDenied,
                "a fresh token was refused: {s}"
            ),
        }
    }
}

/// A workload signing through the agent's EngineAPI; counts acknowledged signatures.
async fn signer(socket: std::path::PathBuf, signatures: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok(ch)) =
            tokio::time::timeout(CALL_LIMIT, continuity_common::grpc::uds_channel(&socket)).await
        else {
            tokio::time::sleep(Duration::from_millis(30)).await;
            continue;
        };
        let mut c = EngineApiClient::new(ch);
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let req = SignRequest {
                key: "signing".into(),
                message: format!("crash {n}").into_bytes(),
                ..Default::default()
            };
            match call(c.sign(with_header(req))).await {
                Ok(r) => {
                    assert!(!r.signature.is_empty());
                    signatures.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    break;
                }
            }
        }
    }
}

fn start_load(
    server: &TestServer,
    agent_socket: &std::path::Path,
    phase: &'static str,
    seed: u64,
) -> Load {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let signatures = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..ENTRY_WRITERS {
        tasks.push(tokio::spawn(entry_writer(
            server.socket.clone(),
            phase,
            w,
            Rng(seed ^ (w as u64 + 1).wrapping_mul(0x1234_5678_9abc)),
            ledger.clone(),
            stop.clone(),
        )));
    }
    tasks.push(tokio::spawn(token_user(
        server.socket.clone(),
        server.addr.clone(),
        server.bundle_der(),
        ledger.clone(),
        stop.clone(),
    )));
    for _ in 0..SIGNERS {
        tasks.push(tokio::spawn(signer(
            agent_socket.to_path_buf(),
            signatures.clone(),
            stop.clone(),
        )));
    }
    Load {
        ledger,
        signatures,
        stop,
        tasks,
    }
}

impl Load {
    /// Stops the clients; a client that panicked (an assertion) fails the test here.
    async fn finish(self) -> (Arc<Mutex<Ledger>>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("a load client failed");
        }
        (self.ledger, self.signatures.load(Ordering::Relaxed))
    }
}

/// Every acknowledged entry write is there with its last acknowledged content (or the
/// content of a later call that failed), deleted ones are gone, and nothing else appeared.
async fn check_entries(server: &TestServer, phase: &str, ledger: &Ledger) {
    // Only a server that went away fails a call; anything else is a bug the kills exposed.
    for code in ledger.failures.keys() {
        assert!(
            ["Unknown", "Unavailable", "Cancelled"].contains(&code.as_str()),
            "entry calls failed other than by a lost connection: {:?}",
            ledger.failures
        );
    }
    let mut c = EntryAdminClient::new(admin_channel(&server.socket).await);
    let all = call(c.list_entries(ListEntriesRequest {
        parent_id: ALIAS.into(),
        ..Default::default()
    }))
    .await
    .unwrap()
    .entries;
    let stored: HashMap<&str, &Entry> = all.iter().map(|e| (e.id.as_str(), e)).collect();
    for (id, f) in &ledger.entries {
        let got: Content = stored.get(id.as_str()).map(|e| e.hint.clone());
        assert!(
            got == f.acked || f.maybe.contains(&got),
            "entry {id} ({}): stored {got:?}, acknowledged {:?}, in flight at a kill {:?}",
            f.template.spiffe_id,
            f.acked,
            f.maybe
        );
        if let Some(e) = stored.get(id.as_str()) {
            assert_eq!(e.spiffe_id, f.template.spiffe_id, "entry {id}");
            assert_eq!(e.selectors, f.template.selectors, "entry {id}");
        }
    }
    for e in &all {
        if e.spiffe_id
            .starts_with(&format!("spiffe://example.org/crash/{phase}/"))
        {
            assert!(
                ledger.entries.contains_key(&e.id) || ledger.unacked_creates.contains(&e.spiffe_id),
                "entry {} ({}) was never created by a client",
                e.id,
                e.spiffe_id
            );
        }
    }
}

/// Used tokens are refused, acknowledged unused ones still work.
async fn check_tokens(server: &TestServer, ledger: &Ledger) {
    let bundle = server.bundle_der();
    for t in &ledger.used_tokens {
        let err = attest(&server.addr, &bundle, t).await.unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::PermissionDenied,
            "a used join token was accepted again after the crashes: {err}"
        );
    }
    for t in &ledger.fresh_tokens {
        attest(&server.addr, &bundle, t)
            .await
            .unwrap_or_else(|e| panic!("an acknowledged join token was lost: {e}"));
    }
}

/// Every record MAC and the audit chain (against the checkpoints the killed servers left)
/// verify, and the log holds a successful sign record for every signature a
/// workload was given (a key use is answered only once it is durably audited).
async fn check_audit(server: &TestServer, signatures: u64) {
    server.cli_ok(&["audit", "verify"]);
    server.cli_ok(&["integrity", "verify"]);
    let mut c = AuditAdminClient::new(admin_channel(&server.socket).await);
    let records = call(c.show_audit(ShowAuditRequest { limit: 0 }))
        .await
        .unwrap()
        .records;
    let audited = records
        .iter()
        .filter(|r| r.action == "key.sign" && r.result == "ok" && r.target.starts_with(ENGINE))
        .count() as u64;
    assert!(
        audited >= signatures,
        "{signatures} signatures were handed to workloads but only {audited} are in the audit log"
    );
}

fn summary(phase: &str, ledger: &Ledger, signatures: u64, kills: usize, took: Duration) {
    let c = ledger.acked;
    println!(
        "{phase}: {kills} kills in {:.1}s; acknowledged: {} entry creates, {} updates, {} deletes, {} tokens, {} attestations, {signatures} Engine signatures; {} entry writes in flight at a kill; failed entry calls: {:?}",
        took.as_secs_f64(),
        c.creates,
        c.updates,
        c.deletes,
        c.tokens,
        c.attestations,
        ledger
            .entries
            .values()
            .filter(|f| !f.maybe.is_empty())
            .count()
            + ledger.unacked_creates.len(),
        ledger.failures
    );
}

fn state_agent_id(agent: &TestAgent) -> String {
    let path = agent.dir.join("data").join("agent-state.json");
    let bytes = std::fs::read(&path).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{} does not parse after a kill: {e}", path.display()));
    assert_eq!(v["version"], 1);
    assert!(v["state"]["agent_svid"].is_object(), "no agent SVID kept");
    v["state"]["agent_id"].as_str().unwrap().to_string()
}

/// The workload's X509-SVID, waiting up to `secs` for the agent to have it.
async fn workload_svid(agent: &TestAgent, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match fetch_x509(agent).await {
            Ok(r) if !r.svids.is_empty() => return r.svids[0].spiffe_id.clone(),
            r => assert!(
                Instant::now() < deadline,
                "the agent serves no SVID: {:?}; log:\n{}",
                r.err(),
                agent.log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Signs once through the agent, waiting until the workload's Engine binding has arrived.
async fn wait_signing(agent: &TestAgent) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(ch) = continuity_common::grpc::uds_channel(&agent.socket).await {
            let req = SignRequest {
                key: "signing".into(),
                message: b"ready".to_vec(),
                ..Default::default()
            };
            if EngineApiClient::new(ch)
                .sign(with_header(req))
                .await
                .is_ok()
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the workload cannot sign");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_acknowledged_is_lost_when_server_and_agent_are_killed() {
    let seed = seed();
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    // Short SVID lifetimes: the agent renews its own SVID and the workloads' while it is
    // being killed.
    let opts = ServerOptions {
        x509_ttl: "8s".into(),
        extra_toml: "log_level = \"info\"\n".into(),
        ..Default::default()
    };
    let mut server = TestServer::start(&dir.path().join("server"), opts);
    server.cli_ok(&["engine", "create", ENGINE, "--tier", "1"]);
    server.cli_ok(&[
        "engine",
        "key",
        "create",
        ENGINE,
        "signing",
        "--purpose",
        "sign",
    ]);
    server.create_entry_with_engine(ALIAS, &format!("unix:uid:{}", uid()), ENGINE);
    let mut agent = TestAgent::start_with(
        &dir.path().join("agent"),
        &server,
        &server.token(Some(ALIAS)),
        "log_level = \"info\"\n",
    );
    let agent_id = state_agent_id(&agent);
    wait_signing(&agent).await;

    // Phase 1: the server is killed under load.
    let started = Instant::now();
    let load = start_load(&server, &agent.socket, "server-kills", seed);
    let mut kill_rng = Rng(rng.next());
    let server = tokio::task::spawn_blocking(move || {
        for _ in 0..SERVER_KILLS {
            std::thread::sleep(kill_rng.millis(150, 700));
            server.stop();
            server.spawn();
        }
        std::thread::sleep(Duration::from_millis(300));
        server
    })
    .await
    .unwrap();
    let (ledger, signatures) = load.finish().await;
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    summary(
        "server",
        &ledger,
        signatures,
        SERVER_KILLS,
        started.elapsed(),
    );
    assert!(
        ledger.acked.creates > 20 && ledger.acked.updates > 5 && signatures > 20,
        "too little load got through to show anything: {:?}, {signatures} signatures",
        ledger.acked
    );
    check_entries(&server, "server-kills", &ledger).await;
    check_tokens(&server, &ledger).await;
    check_audit(&server, signatures).await;

    // Phase 2: the agent is killed while it syncs, renews and serves workloads.
    let started = Instant::now();
    let load = start_load(&server, &agent.socket, "agent-kills", rng.next());
    let mut kill_rng = Rng(rng.next());
    // At least AGENT_KILLS kills, and on until the kills have met three agent SVID renewals
    // (a loaded machine renews less often per kill), within a bound.
    let renewed = |a: &TestAgent| a.log().matches("agent SVID renewed").count();
    let mut kills = 0;
    while kills < AGENT_KILLS || (renewed(&agent) < 3 && kills < 10 * AGENT_KILLS) {
        kills += 1;
        tokio::time::sleep(kill_rng.millis(100, 600)).await;
        agent = tokio::task::spawn_blocking(move || {
            agent.stop();
            agent
        })
        .await
        .unwrap();
        assert_eq!(
            state_agent_id(&agent),
            agent_id,
            "the agent changed identity"
        );
        agent = tokio::task::spawn_blocking(move || {
            agent.spawn();
            agent
        })
        .await
        .unwrap();
        assert_eq!(workload_svid(&agent, 10).await, WORKLOAD_ID);
    }
    let (ledger2, signatures2) = load.finish().await;
    let renewals = renewed(&agent);
    println!("agent: {renewals} agent SVID renewals in all, across {kills} kills");
    assert!(
        renewals >= 3,
        "the agent SVID was renewed only {renewals} times: the kills did not meet a rotation"
    );
    let ledger2 = std::mem::take(&mut *ledger2.lock().unwrap());
    summary("agent", &ledger2, signatures2, kills, started.elapsed());
    assert!(
        signatures2 > 10,
        "too few signatures got through: {signatures2}"
    );
    check_entries(&server, "agent-kills", &ledger2).await;
    check_entries(&server, "server-kills", &ledger).await;
    check_tokens(&server, &ledger2).await;
    check_audit(&server, signatures + signatures2 + 1).await;
    assert!(
        !agent.log().contains("forked"),
        "the server took the restarted agent for a clone; log:\n{}",
        agent.log()
    );
    assert!(
        !server.log().contains("agent identity forked"),
        "the server flagged the agent as forked; log:\n{}",
        server.log()
    );
    wait_signing(&agent).await;

    // With the server gone, the agent restarts from its state file and serves its cache.
    let mut server = server;
    server.stop();
    // Nothing half-written: the SQLite file the kills left behind is whole.
    let db = server.dir.join("data").join("datastore.sqlite3");
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("PRAGMA integrity_check; PRAGMA journal_mode;")
        .output()
        .expect("run sqlite3");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok\nwal",
        "{}: {}",
        db.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    agent.restart();
    assert_eq!(state_agent_id(&agent), agent_id);
    assert_eq!(workload_svid(&agent, 10).await, WORKLOAD_ID);
    drop(agent);
}
