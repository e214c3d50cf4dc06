//! The Workload API rows: connect+attest+first X509, cached JWT, JWT validation, fetches/s
//! and agent CPU per 1,000 fetches, each against the floor server of [`crate::workload`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use continuity_proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest, X509svidRequest};
use continuity_tests::agent::TestAgent;

use crate::report::{Metric, percentile};
use crate::workload::*;
use crate::{Plan, cpu_seconds};

const FIXED: &str = "tonic UDS fixed message";
const UNARY: &str = "tonic UDS unary";

fn jwt_request() -> JwtsvidRequest {
    JwtsvidRequest {
        audience: vec!["bench".into()],
        spiffe_id: String::new(),
    }
}

/// Starts the floor server answering with copies of the agent's real messages (which also
/// warms the agent's JWT cache).
async fn floor_for(agent_sock: &Path, dir: &Path) -> (PathBuf, std::process::Child) {
    let mut c = client(agent_sock).await;
    let mut s = c.fetch_x509svid(req(X509svidRequest {})).await.unwrap();
    let x509 = s.get_mut().message().await.unwrap().unwrap();
    let jwt = c.fetch_jwtsvid(req(jwt_request())).await.unwrap();
    start_floor(&dir.join("floor.sock"), x509, jwt.into_inner()).await
}

/// Two rows (p50, p99) named by `name` with `{p}` replaced, the agent's samples against the
/// floor's.
fn pair(
    name: &str,
    floor: &str,
    agent: &mut [f64],
    fl: &mut [f64],
    p99_target: bool,
) -> [Metric; 2] {
    let row = |p: &str, agent: &mut [f64], fl: &mut [f64], q: f64| {
        Metric::new(name.replace("{p}", p), percentile(agent, q), "us")
            .floor(floor, percentile(fl, q))
    };
    let p50 = row("p50", agent, fl, 50.0);
    let mut p99 = row("p99", agent, fl, 99.0);
    if p99_target {
        p99 = p99.target("<= 1.5x floor");
    }
    [p50, p99]
}

async fn connect_samples(sock: &Path, n: usize, conc: usize) -> Vec<f64> {
    let sock = sock.to_path_buf();
    measure(n, conc, move || {
        let p = sock.clone();
        async move { connect_and_fetch(&p).await }
    })
    .await
}

/// Rounds the floor's and the agent's samples alternate in, so that both see the same
/// background load (a build on the other core, a sync round) rather than one each.
const ROUNDS: usize = 10;

async fn connect_rows(n: usize, sock: &Path, floor: &Path) -> Vec<Metric> {
    let mut out = Vec::new();
    for conc in [1usize, 16] {
        let (mut fl, mut al) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..ROUNDS {
            fl.extend(connect_samples(floor, n / ROUNDS, conc).await);
            al.extend(connect_samples(sock, n / ROUNDS, conc).await);
        }
        let name = format!("workload: connect+attest+first X509 {{p}}, {conc} client(s)");
        out.extend(pair(&name, FIXED, &mut al, &mut fl, true));
    }
    out
}

async fn unary_rows(n: usize, sock: &Path, floor: &Path) -> Vec<Metric> {
    let (mut fc, mut ac) = (client(floor).await, client(sock).await);
    let (mut fl, mut al) = (Vec::new(), Vec::new());
    for _ in 0..n {
        fl.push(jwt_on(&mut fc).await);
        al.push(jwt_on(&mut ac).await);
    }
    let mut out = pair(
        "workload: FetchJWTSVID (cached) {p}",
        UNARY,
        &mut al,
        &mut fl,
        false,
    )
    .to_vec();
    let r = ac.fetch_jwtsvid(req(jwt_request())).await.unwrap();
    let token = r.into_inner().svids[0].svid.clone();
    let (mut vl, mut vf) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let r = ValidateJwtsvidRequest {
            audience: "bench".into(),
            svid: token.clone(),
        };
        let t = Instant::now();
        ac.validate_jwtsvid(req(r.clone())).await.unwrap();
        vl.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        fc.validate_jwtsvid(req(r)).await.unwrap();
        vf.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.extend(pair(
        "workload: ValidateJWTSVID {p}",
        UNARY,
        &mut vl,
        &mut vf,
        false,
    ));
    out
}

/// Fetches/s with 16 clients, and the serving process's CPU time per 1,000 of them
/// (/proc/<pid>/stat utime + stime).
async fn fetch_load(sock: &Path, pid: u32, secs: f64) -> (f64, f64) {
    let cpu0 = cpu_seconds(pid);
    let (n, rate) = throughput(sock, 16, secs).await;
    let cpu_ms = (cpu_seconds(pid) - cpu0) * 1e3;
    (rate, cpu_ms * 1000.0 / n.max(1) as f64)
}

async fn load_rows(
    plan: &Plan,
    sock: &Path,
    agent_pid: u32,
    floor: &Path,
    floor_pid: u32,
) -> Vec<Metric> {
    let (ft, fcpu) = fetch_load(floor, floor_pid, plan.seconds).await;
    let (at, acpu) = fetch_load(sock, agent_pid, plan.seconds).await;
    vec![
        Metric::new("workload: X509 fetches/s, 16 clients", at, "ops/s")
            .floor(FIXED, ft)
            .target(">= 10000/s"),
        Metric::new("workload: agent CPU per 1,000 X509 fetches", acpu, "ms")
            .floor("floor server's CPU per 1,000", fcpu),
    ]
}

/// Every Workload API row for `agent`.
pub async fn metrics(plan: &Plan, agent: &TestAgent, dir: &Path) -> Vec<Metric> {
    let sock = agent.socket.clone();
    let (floor, mut floor_child) = floor_for(&sock, dir).await;
    let n = plan.latency_samples;
    let mut out = connect_rows(n, &sock, &floor).await;
    out.extend(unary_rows(n, &sock, &floor).await);
    let pid = agent.pid().unwrap();
    out.extend(load_rows(plan, &sock, pid, &floor, floor_child.id()).await);
    let _ = floor_child.kill();
    let _ = floor_child.wait();
    out
}
