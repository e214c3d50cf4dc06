//! A server that stalls the agent's sync (its process stopped with SIGSTOP: connections stay
//! open, nothing answers) must not stall the Workload API: cached X509-SVIDs, cached
//! JWT-SVIDs and JWT bundles answer at once from a real agent, and a JWT-SVID cache miss
//! answers or fails with a clear status within its own timeout.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::process::Command;
use std::time::{Duration, Instant};

use continuity_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use continuity_proto::workload::{JwtBundlesRequest, JwtsvidRequest, X509svidRequest};
use continuity_tests::agent::TestAgent;
use continuity_tests::{Env, uid, with_header};
use tonic::Code;

const ALIAS: &str = "spiffe://example.org/node/stall";
const ID: &str = "spiffe://example.org/stalled";
/// How long each cached call may take while the server is stopped.
const AT_ONCE: Duration = Duration::from_secs(2);
/// How long the server stays stopped.
const STALL: Duration = Duration::from_secs(12);
/// How long the cache miss may take: the agent's own timeout (5 s) plus a generous margin.
const MISS_DEADLINE: Duration = Duration::from_secs(15);

/// Stops a process with SIGSTOP; SIGCONT on drop (also when an assertion fails).
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        signal("-STOP", pid);
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

fn signal(sig: &str, pid: u32) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

async fn client(agent: &TestAgent) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    SpiffeWorkloadApiClient::new(
        continuity_common::grpc::uds_channel(&agent.socket)
            .await
            .unwrap(),
    )
}

async fn jwt(agent: &TestAgent, audience: &str) -> Result<String, tonic::Status> {
    let r = client(agent)
        .await
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec![audience.into()],
            spiffe_id: String::new(),
        }))
        .await?
        .into_inner();
    Ok(r.svids[0].svid.clone())
}

async fn x509_ids(agent: &TestAgent) -> Result<Vec<String>, tonic::Status> {
    let mut s = client(agent)
        .await
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await?
        .into_inner();
    let r = s
        .message()
        .await?
        .ok_or_else(|| tonic::Status::internal("empty"))?;
    Ok(r.svids.into_iter().map(|s| s.spiffe_id).collect())
}

async fn jwt_bundle_count(agent: &TestAgent) -> Result<usize, tonic::Status> {
    let mut s = client(agent)
        .await
        .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
        .await?
        .into_inner();
    let r = s
        .message()
        .await?
        .ok_or_else(|| tonic::Status::internal("empty"))?;
    Ok(r.bundles.len())
}

/// `f` answers within [`AT_ONCE`] (`what` names it in the failure).
async fn at_once<T, Fut>(what: &str, f: Fut) -> T
where
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    match tokio::time::timeout(AT_ONCE, f).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what} failed while the server was stalled: {e}"),
        Err(_) => panic!("{what} did not answer within {AT_ONCE:?} while the server was stalled"),
    }
}

/// Waits until the agent serves the identity and a JWT-SVID for `cached`; returns the token.
async fn warm(e: &Env) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let (Ok(ids), Ok(token)) = (x509_ids(&e.agent).await, jwt(&e.agent, "cached").await)
            && ids.iter().any(|i| i == ID)
        {
            return token;
        }
        assert!(Instant::now() < deadline, "agent never served {ID}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// py-spiffe (unmodified) gets everything from the stalled agent: X509-SVID, bundles, the
/// cached JWT-SVID, JWT bundles and a validation.
fn py_spiffe_cached(agent: &TestAgent) {
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/fetch_all.py"))
        .arg(agent.endpoint())
        .arg("cached")
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "py-spiffe failed against the stalled agent:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["x509_spiffe_id"], ID);
    assert_eq!(v["jwt_spiffe_id"], ID);
    assert_eq!(v["validated_spiffe_id"], ID);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cached_fetches_answer_at_once_while_the_server_stalls_sync() {
    let e = continuity_tests::env(ALIAS);
    e.server
        .create_entry(ID, ALIAS, &[&format!("unix:uid:{}", uid())]);
    let cached = warm(&e).await;

    let stopped = Stopped::new(e.server.pid().unwrap());
    let since = Instant::now();
    // The agent syncs every 500 ms: by now a sync round is waiting on the stopped server.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // A cache miss: must reach the (stopped) server, and must not hold anything else up.
    let agent = &e.agent;
    let miss = async {
        let start = Instant::now();
        let r = tokio::time::timeout(MISS_DEADLINE, jwt(agent, "miss")).await;
        (r, start.elapsed())
    };
    let cached_calls = async {
        let mut rounds = 0;
        while since.elapsed() < STALL {
            let ids = at_once("FetchX509SVID", x509_ids(agent)).await;
            assert_eq!(ids, vec![ID.to_string()]);
            let token = at_once("cached FetchJWTSVID", jwt(agent, "cached")).await;
            assert_eq!(token, cached, "the cached JWT-SVID is served");
            assert_eq!(at_once("FetchJWTBundles", jwt_bundle_count(agent)).await, 1);
            rounds += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        rounds
    };
    let ((miss, took), rounds) = tokio::join!(miss, cached_calls);
    assert!(rounds >= 5, "only {rounds} rounds of cached calls");
    match miss {
        Ok(Ok(_)) => {}
        Ok(Err(s)) => {
            assert_eq!(s.code(), Code::Unavailable, "{s:?}");
            assert!(
                s.message().contains("could not obtain a JWT-SVID for")
                    && s.message().contains("did not answer within"),
                "{s:?}"
            );
        }
        Err(_) => panic!(
            "a JWT-SVID cache miss neither answered nor failed within {MISS_DEADLINE:?} \
             while the server was stalled (took {took:?}+)"
        ),
    }
    assert!(
        since.elapsed() >= Duration::from_secs(10),
        "the stall lasted ≥ 10 s"
    );
    tokio::task::block_in_place(|| py_spiffe_cached(agent));

    drop(stopped);
    // The server is back: the stalled sync finishes and misses are answered again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while jwt(agent, "after").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "no JWT-SVID after the server resumed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
