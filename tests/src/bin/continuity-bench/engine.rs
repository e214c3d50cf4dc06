//! EngineAPI.Sign latency and throughput through the agent and the server, against the echo
//! chain of [`crate::engine_floor`] (the same two hops plus the raw signature).

use std::path::Path;
use std::time::{Duration, Instant};

use continuity_proto::engine::SignRequest;
use continuity_proto::engine::engine_api_client::EngineApiClient;
use continuity_tests::softhsm::SoftHsm;
use tonic::transport::Channel;

use crate::Plan;
use crate::report::{Metric, percentile};

fn sign_req() -> tonic::Request<SignRequest> {
    crate::workload::req(SignRequest {
        key: "signing".into(),
        message: b"benchmark message".to_vec(),
        ..Default::default()
    })
}

async fn channel(sock: &Path) -> Channel {
    continuity_common::grpc::uds_channel(sock).await.unwrap()
}

/// `n` sequential Sign calls on one connection (after one warm-up call); µs each.
async fn latencies(sock: &Path, n: usize) -> Vec<f64> {
    let mut c = EngineApiClient::new(channel(sock).await);
    c.sign(sign_req()).await.unwrap();
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.sign(sign_req()).await.unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat
}

/// Sign calls/s from `clients` tasks sharing one connection for `secs`.
async fn throughput(sock: &Path, clients: usize, secs: f64) -> f64 {
    let ch = channel(sock).await;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut c = EngineApiClient::new(ch.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                c.sign(sign_req()).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// p50 (µs) of appending 256 bytes to a file in `dir` and `fdatasync`ing it: the durable
/// commit every audited key use waits for (the floor chain has none).
pub fn fdatasync_p50(dir: &Path) -> f64 {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut lat = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        f.write_all(&[7u8; 256]).unwrap();
        f.sync_data().unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let _ = std::fs::remove_file(&path);
    percentile(&mut lat, 50.0)
}

/// EngineAPI.Sign rows for `custody` on the agent at `agent_sock`; the floor chain's far end
/// signs with `hsm` when given, in process otherwise.
pub async fn metrics(
    plan: &Plan,
    agent_sock: &Path,
    custody: &str,
    dir: &Path,
    hsm: Option<&SoftHsm>,
) -> Vec<Metric> {
    let floor = crate::engine_floor::start(&dir.join(format!("engine-floor-{custody}")), hsm).await;
    let n = plan.latency_samples / 2;
    let sig = if hsm.is_some() {
        "C_Sign"
    } else {
        "P-256 sign"
    };
    let floor_name = format!("UDS echo > TLS echo + {sig}");
    let (mut fl, mut al) = (
        latencies(&floor.socket, n).await,
        latencies(agent_sock, n).await,
    );
    let ft = throughput(&floor.socket, 16, plan.seconds).await;
    let at = throughput(agent_sock, 16, plan.seconds).await;
    vec![
        Metric::new(
            format!("engine: EngineAPI.Sign p50 ({custody})"),
            percentile(&mut al, 50.0),
            "us",
        )
        .floor(floor_name.clone(), percentile(&mut fl, 50.0))
        .target("<= 2.00x floor"),
        Metric::new(
            format!("engine: EngineAPI.Sign p99 ({custody})"),
            percentile(&mut al, 99.0),
            "us",
        )
        .floor(floor_name.clone(), percentile(&mut fl, 99.0)),
        Metric::new(
            format!("engine: EngineAPI.Sign ops/s, 16 clients ({custody})"),
            at,
            "ops/s",
        )
        .floor(floor_name, ft)
        .target(">= 0.50x floor"),
    ]
}
