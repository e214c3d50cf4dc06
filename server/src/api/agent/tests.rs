//! The renewal race: a RenewAgent whose signing blocks while the operator bans or evicts
//! the agent must not write its stale record back (real SQLite, in process).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::SystemTime;

use async_trait::async_trait;
use continuity_common::{ManualClock, SpiffeId};
use rustls_pki_types::CertificateDer;

use continuity_attestors::join_token;
use continuity_proto::agent::attest_agent_response;

use super::*;
use crate::api::tls::PeerCerts;
use crate::audit::Audit;
use crate::ca::CaConfig;
use crate::datastore::AgentRecord;
use crate::datastore::{AgentStore, DataStore, SqlDataStore};
use crate::keys::{Kek, KeyError, KeyHandle, KeyManager, KeyType, MemoryKeyManager};

/// Makes the next signature wait at `entered`, then at `release`.
#[derive(Debug)]
struct Gate {
    armed: AtomicBool,
    entered: Barrier,
    release: Barrier,
}

impl Gate {
    fn pass(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.wait();
            self.release.wait();
        }
    }
}

#[derive(Debug)]
struct GatedKey(Arc<dyn KeyHandle>, Arc<Gate>);

impl KeyHandle for GatedKey {
    fn id(&self) -> &str {
        self.0.id()
    }
    fn key_type(&self) -> KeyType {
        self.0.key_type()
    }
    fn public_key_raw(&self) -> &[u8] {
        self.0.public_key_raw()
    }
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.1.pass();
        self.0.sign(msg)
    }
    fn sign_digest(&self, digest: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.1.pass();
        self.0.sign_digest(digest)
    }
}

/// A memory key manager whose keys sign through the gate.
#[derive(Debug)]
struct GatedKeys(MemoryKeyManager, Arc<Gate>);

#[async_trait]
impl KeyManager for GatedKeys {
    fn kind(&self) -> &'static str {
        "memory"
    }
    async fn generate(&self, id: &str, kt: KeyType) -> Result<Arc<dyn KeyHandle>, KeyError> {
        let k = self.0.generate(id, kt).await?;
        Ok(Arc::new(GatedKey(k, self.1.clone())))
    }
    async fn get(&self, id: &str) -> Result<Option<Arc<dyn KeyHandle>>, KeyError> {
        Ok(self
            .0
            .get(id)
            .await?
            .map(|k| Arc::new(GatedKey(k, self.1.clone())) as Arc<dyn KeyHandle>))
    }
    async fn delete(&self, id: &str) -> Result<(), KeyError> {
        self.0.delete(id).await
    }
    async fn kek(&self, id: &str) -> Result<Arc<dyn Kek>, KeyError> {
        self.0.kek(id).await
    }
    async fn mac_key(&self, id: &str) -> Result<Arc<dyn crate::keys::MacKey>, KeyError> {
        self.0.mac_key(id).await
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Fixture {
    dir: std::path::PathBuf,
    url: String,
    store: Arc<dyn DataStore>,
    svc: AgentService,
    gate: Arc<Gate>,
    clock: Arc<ManualClock>,
}

async fn fixture() -> Fixture {
    let (dir, url, store) = crate::datastore::scratch_sqlite("agentrace").await;
    let store: Arc<dyn DataStore> = Arc::new(store);
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let gate = Arc::new(Gate {
        armed: AtomicBool::new(false),
        entered: Barrier::new(2),
        release: Barrier::new(2),
    });
    let td = TrustDomain::new("example.org").unwrap();
    let ca = CaManager::start(
        CaConfig {
            trust_domain: td.clone(),
            x509_key_type: KeyType::EcP256,
            jwt_key_type: KeyType::EcP256,
            ttl: Duration::from_secs(24 * 3600),
            jwt_issuer: None,
            upstream: None,
        },
        Arc::new(GatedKeys(MemoryKeyManager::default(), gate.clone())),
        store.clone(),
        clock.clone(),
    )
    .await
    .unwrap();
    let audit = Audit::scratch(store.clone(), clock.clone()).await;
    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(
        Registry::load(
            store.clone(),
            store.clone(),
            clock.clone(),
            audit.clone(),
            metrics.clone(),
        )
        .await
        .unwrap(),
    );
    let federation = crate::federation::Federation::load(
        td.clone(),
        store.clone(),
        store.clone(),
        audit,
        clock.clone(),
    )
    .await
    .unwrap();
    let svc = AgentService {
        trust_domain: td,
        ca,
        registry,
        store: store.clone(),
        clock: clock.clone(),
        x509_ttl: Duration::from_secs(3600),
        jwt_ttl: Duration::from_secs(300),
        metrics: metrics.clone(),
        psat_clusters: Arc::new(continuity_attestors::k8s_psat::Validator::new(vec![])),
        limits: Arc::new(crate::api::limits::AgentRateLimits::new(
            &crate::config::AgentApiConfig::default(),
            metrics,
        )),
        first_message_timeout: Duration::from_secs(10),
        federation,
        serving: Arc::new(crate::serving::ServingReports::new(store.clone())),
    };
    Fixture {
        dir,
        url,
        store,
        svc,
        gate,
        clock,
    }
}

fn csr() -> Vec<u8> {
    let kp = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&kp)
        .unwrap()
        .der()
        .to_vec()
}

/// Attests an agent; returns its ID and agent SVID (leaf DER).
async fn attested(svc: &AgentService) -> (String, Vec<u8>) {
    let id = "spiffe://example.org/continuity/agent/join_token/race";
    let r = svc
        .issue_agent(
            &SpiffeId::new(id).unwrap(),
            join_token::ATTESTOR_TYPE,
            None,
            vec![],
            csr(),
        )
        .await
        .unwrap();
    let Some(attest_agent_response::Step::Result(r)) = r.step else {
        panic!("no result");
    };
    (id.to_string(), r.svid.unwrap().cert_chain[0].clone())
}

fn renew_request(leaf: &[u8]) -> Request<RenewAgentRequest> {
    let mut req = Request::new(RenewAgentRequest { csr: csr() });
    req.extensions_mut()
        .insert(PeerCerts(Arc::new(vec![CertificateDer::from(
            leaf.to_vec(),
        )])));
    req
}

/// Starts a renewal, waits until it is signing, runs `land`, releases the signer, and
/// returns the renewal's outcome.
async fn race<F: std::future::Future<Output = ()>>(
    f: &Fixture,
    leaf: &[u8],
    land: F,
) -> Result<Response<RenewAgentResponse>, Status> {
    f.gate.armed.store(true, Ordering::SeqCst);
    let svc = f.svc.clone();
    let req = renew_request(leaf);
    let renewal = tokio::spawn(async move { svc.renew_agent(req).await });
    let gate = f.gate.clone();
    tokio::task::spawn_blocking(move || gate.entered.wait())
        .await
        .unwrap();
    land.await;
    let gate = f.gate.clone();
    tokio::task::spawn_blocking(move || gate.release.wait())
        .await
        .unwrap();
    renewal.await.unwrap()
}

async fn reloaded(f: &Fixture, id: &str) -> Option<AgentRecord> {
    let store = SqlDataStore::connect(&f.url, crate::datastore::test_sealer())
        .await
        .unwrap();
    store.get_agent(id).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_landing_during_renewal_stands() {
    let f = fixture().await;
    let (id, leaf) = attested(&f.svc).await;
    let registry = f.svc.registry.clone();
    let target = id.clone();
    let out = race(&f, &leaf, async move {
        registry.ban_agent(&target, "admin uid 0").await.unwrap();
    })
    .await;
    let err = out.expect_err("the renewal must fail once the ban landed");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("banned"), "{}", err.message());
    assert!(f.svc.registry.agent(&id).unwrap().banned, "index");
    assert!(reloaded(&f, &id).await.unwrap().banned, "database");
    // And it stays refused.
    let again = f.svc.renew_agent(renew_request(&leaf)).await.unwrap_err();
    assert!(again.message().contains("banned"), "{}", again.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_landing_during_renewal_stands() {
    let f = fixture().await;
    let (id, leaf) = attested(&f.svc).await;
    let registry = f.svc.registry.clone();
    let target = id.clone();
    let out = race(&f, &leaf, async move {
        registry.evict_agent(&target, "admin uid 0").await.unwrap();
    })
    .await;
    let err = out.expect_err("the renewal must fail once the eviction landed");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("not attested (evicted?)"),
        "{}",
        err.message()
    );
    assert!(f.svc.registry.agent(&id).is_none(), "index");
    assert!(reloaded(&f, &id).await.is_none(), "database");
}

#[tokio::test]
async fn re_attesting_over_a_live_agent_is_audited_as_a_takeover() {
    let f = fixture().await;
    let (id, _) = attested(&f.svc).await;
    let audit = f.store.list_audit().await.unwrap();
    assert!(!audit.iter().any(|r| r.action == "agent.takeover"));
    attested(&f.svc).await;
    let audit = f.store.list_audit().await.unwrap();
    let t = audit
        .iter()
        .find(|r| r.action == "agent.takeover")
        .expect("takeover audited");
    assert_eq!(
        (t.actor.as_str(), t.target.as_str()),
        ("server", id.as_str())
    );
    // A node whose agent is long gone (its SVID expired) is not a takeover.
    f.clock.advance(Duration::from_secs(2 * 3600));
    attested(&f.svc).await;
    let n = f
        .store
        .list_audit()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.action == "agent.takeover")
        .count();
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_landing_during_re_attestation_stands() {
    let f = fixture().await;
    let (id, _) = attested(&f.svc).await;
    f.gate.armed.store(true, Ordering::SeqCst);
    let svc = f.svc.clone();
    let target = id.clone();
    let attest = tokio::spawn(async move {
        svc.issue_agent(
            &SpiffeId::new(&target).unwrap(),
            join_token::ATTESTOR_TYPE,
            None,
            vec![],
            csr(),
        )
        .await
    });
    let gate = f.gate.clone();
    tokio::task::spawn_blocking(move || gate.entered.wait())
        .await
        .unwrap();
    f.svc.registry.ban_agent(&id, "admin uid 0").await.unwrap();
    let gate = f.gate.clone();
    tokio::task::spawn_blocking(move || gate.release.wait())
        .await
        .unwrap();
    let err = attest.await.unwrap().expect_err("re-attestation refused");
    assert!(err.message().contains("banned"), "{}", err.message());
    assert!(reloaded(&f, &id).await.unwrap().banned, "database");
}
