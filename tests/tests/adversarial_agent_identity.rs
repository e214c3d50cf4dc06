//! Adversarial suite, agent identity: a stolen, superseded agent SVID must not keep working
//! beside the real agent. The hostile agent here is a hand-built TLS client (tonic + rustls)
//! that attests with a join token and renews as it likes; the server is the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::time::Duration;

use continuity_proto::agent::agent_api_client::AgentApiClient;
use continuity_proto::agent::{FetchBundleRequest, RenewAgentRequest};
use continuity_tests::agent_client::{attest, authenticated, key_and_csr};
use continuity_tests::free_port;
use continuity_tests::server::{ServerOptions, TestServer};
use tonic::Code;
use tonic::transport::Channel;

/// One agent SVID: chain and PKCS#8 key.
#[derive(Clone)]
struct Svid {
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
}

struct Fixture {
    _dir: tempfile::TempDir,
    s: TestServer,
    metrics: u16,
}

fn server(grace: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let metrics = free_port();
    let s = TestServer::start(
        &dir.path().join("server"),
        ServerOptions {
            extra_toml: format!(
                "[metrics]\nbind_address = \"127.0.0.1:{metrics}\"\n[agent_api]\nprevious_svid_grace = \"{grace}\"\n"
            ),
            ..Default::default()
        },
    );
    Fixture {
        _dir: dir,
        s,
        metrics,
    }
}

impl Fixture {
    async fn client(&self, svid: &Svid) -> AgentApiClient<Channel> {
        authenticated(&self.s.addr, self.s.bundle_der(), &svid.chain, &svid.key).await
    }

    /// RenewAgent presenting `with` (on a fresh connection); the new SVID.
    async fn renew(&self, with: &Svid) -> Result<Svid, tonic::Status> {
        let (kp, csr) = key_and_csr();
        let r = self
            .client(with)
            .await
            .renew_agent(RenewAgentRequest { csr })
            .await?
            .into_inner();
        Ok(Svid {
            chain: r.svid.unwrap().cert_chain,
            key: kp.serialize_der(),
        })
    }

    /// FetchBundle presenting `with` (on a fresh connection).
    async fn call(&self, with: &Svid) -> Result<(), tonic::Status> {
        self.client(with)
            .await
            .fetch_bundle(FetchBundleRequest {})
            .await
            .map(|_| ())
    }

    fn agent_json(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.s.cli_ok(&[
            "agent",
            "show",
            "--spiffe-id",
            id,
            "--output",
            "json",
        ]))
        .unwrap()
    }

    fn forks_metric(&self) -> String {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", self.metrics)).unwrap();
        write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s.lines()
            .find(|l| l.starts_with("continuity_server_agent_forks_total "))
            .unwrap_or_else(|| panic!("no fork metric in:\n{s}"))
            .to_string()
    }
}

async fn attested(f: &Fixture) -> (String, Svid) {
    let a = attest(&f.s.addr, f.s.bundle_der(), &f.s.token(None))
        .await
        .unwrap();
    (
        a.id,
        Svid {
            chain: a.chain,
            key: a.key,
        },
    )
}

fn assert_forked(e: &tonic::Status) {
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("agent identity forked") && e.message().contains("ban or evict"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn stolen_previous_svid_after_the_grace_flags_the_fork_and_is_refused() {
    let f = server("1s");
    let (id, a) = attested(&f).await;

    // A lost RenewAgent response: the agent retries with the SVID it still has. Its
    // successor was never used, so the previous SVID still renews.
    let _lost = f.renew(&a).await.expect("first renewal");
    let b = f
        .renew(&a)
        .await
        .expect("retry with the previous SVID before the new one was used");

    // The real agent switches to its new SVID; the previous one is accepted only briefly.
    f.call(&b).await.expect("the new SVID works");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(f.agent_json(&id)["forked"] == false);

    // The thief, holding the superseded key, tries after the grace.
    let e = f.call(&a).await.expect_err("superseded SVID refused");
    assert_forked(&e);
    let e = f.renew(&a).await.err().expect("and cannot renew");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // The current lineage keeps working (the node stays up); the operator is alerted.
    f.call(&b).await.expect("the current lineage still works");
    let b2 = f.renew(&b).await.expect("and still renews");
    f.call(&b2).await.unwrap();

    let shown = f.agent_json(&id);
    assert_eq!(shown["forked"], true, "{shown}");
    assert!(shown["forked_at"].as_i64().unwrap() > 0, "{shown}");
    let text = f.s.cli_ok(&["agent", "show", "--spiffe-id", &id]);
    assert!(text.contains("Forked"), "{text}");
    let audit = f.s.cli_ok(&["audit", "show"]);
    let line = audit
        .lines()
        .find(|l| l.contains("agent.forked"))
        .unwrap_or_else(|| panic!("no agent.forked record in:\n{audit}"));
    assert!(line.contains(&id), "{line}");
    assert_eq!(
        audit.matches("agent.forked").count(),
        1,
        "one record per fork, not per attempt:\n{audit}"
    );
    assert_eq!(f.forks_metric(), "continuity_server_agent_forks_total 1");
    assert!(f.s.cli_ok(&["audit", "verify"]).contains("intact"));
    let log = f.s.log();
    assert!(log.contains("agent identity forked"), "warn log");
}

#[tokio::test]
async fn an_older_superseded_svid_is_a_fork_at_once() {
    let f = server("30s");
    let (id, a) = attested(&f).await;
    let b = f.renew(&a).await.unwrap();
    f.call(&b).await.unwrap();
    let c = f.renew(&b).await.unwrap();
    f.call(&c).await.unwrap();
    // `b` is the previous SVID, within the grace: in-flight calls on the old channel work.
    f.call(&b).await.expect("previous SVID within the grace");
    // `a` is neither current nor previous, yet chain-valid and unexpired: two lineages.
    let e = f.call(&a).await.expect_err("older SVID refused");
    assert_forked(&e);
    assert_eq!(f.agent_json(&id)["forked"], true);
    // From now on the older lineage is refused whichever of its SVIDs it shows.
    assert_forked(
        &f.call(&b)
            .await
            .expect_err("previous refused after the fork"),
    );
    f.call(&c).await.expect("current lineage works");
    assert_eq!(f.forks_metric(), "continuity_server_agent_forks_total 1");

    // Eviction and re-attestation clear it.
    f.s.cli_ok(&["agent", "evict", "--spiffe-id", &id]);
    let (id2, fresh) = attested(&f).await;
    f.call(&fresh).await.unwrap();
    assert_eq!(f.agent_json(&id2)["forked"], false);
}
