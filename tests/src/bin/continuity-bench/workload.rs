//! Workload API latency and throughput, against the agent and against the floor: a minimal
//! tonic server on a Unix socket answering with fixed messages.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use continuity_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use continuity_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use continuity_proto::workload::*;
use futures_util::Stream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// The floor: answers every call at once with a fixed message.
pub struct FloorServer {
    x509: X509svidResponse,
    jwt: JwtsvidResponse,
}

type S<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn once_then_pending<T: Send + 'static>(t: T) -> S<T> {
    use futures_util::StreamExt;
    Box::pin(tokio_stream::once(Ok(t)).chain(futures_util::stream::pending()))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for FloorServer {
    type FetchX509SVIDStream = S<X509svidResponse>;
    type FetchX509BundlesStream = S<X509BundlesResponse>;
    type FetchJWTBundlesStream = S<JwtBundlesResponse>;
    type FetchWITSVIDStream = S<WitsvidResponse>;
    type FetchWITBundlesStream = S<WitBundlesResponse>;
    async fn fetch_x509svid(
        &self,
        _: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        Ok(Response::new(once_then_pending(self.x509.clone())))
    }
    async fn fetch_x509_bundles(
        &self,
        _: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn fetch_jwtsvid(
        &self,
        _: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Ok(Response::new(self.jwt.clone()))
    }
    async fn fetch_jwt_bundles(
        &self,
        _: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn validate_jwtsvid(
        &self,
        _: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: "spiffe://example.org/floor".into(),
            claims: None,
        }))
    }
    async fn fetch_witsvid(
        &self,
        _: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn fetch_wit_bundles(
        &self,
        _: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented(""))
    }
}

/// Starts the floor server in its own process (as the agent is), answering with copies of
/// the agent's real messages; returns the socket path and the child process.
pub async fn start_floor(
    path: &Path,
    x509: X509svidResponse,
    jwt: JwtsvidResponse,
) -> (PathBuf, std::process::Child) {
    use prost::Message;
    let msgs = path.with_extension("msgs");
    let mut buf = Vec::new();
    x509.encode_length_delimited(&mut buf).unwrap();
    jwt.encode_length_delimited(&mut buf).unwrap();
    std::fs::write(&msgs, buf).unwrap();
    let _ = std::fs::remove_file(path);
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--floor-server")
        .arg(path)
        .arg(&msgs)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "floor server did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (path.to_path_buf(), child)
}

/// Child side: serves the fixed messages on the socket until killed.
pub fn floor_server_child(args: &[String]) {
    use prost::Message;
    let (path, msgs) = (PathBuf::from(&args[0]), std::fs::read(&args[1]).unwrap());
    let mut rest = msgs.as_slice();
    let x509 = X509svidResponse::decode_length_delimited(&mut rest).unwrap();
    let jwt = JwtsvidResponse::decode_length_delimited(&mut rest).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(FloorServer { x509, jwt }))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
}

/// A request with the security header.
pub fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

/// A client on a fresh connection.
pub async fn client(path: &Path) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(continuity_common::grpc::uds_channel(path).await.unwrap())
}

/// New connection + attestation + first FetchX509SVID message; returns µs.
pub async fn connect_and_fetch(path: &Path) -> f64 {
    let t = Instant::now();
    let mut c = client(path).await;
    let mut s = c
        .fetch_x509svid(req(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let m = s.message().await.unwrap().unwrap();
    assert!(!m.svids.is_empty());
    t.elapsed().as_secs_f64() * 1e6
}

/// Child side of `--connect-loop SOCKET SECONDS CLIENTS`: connect+attest+first X509 in a loop
/// from CLIENTS tasks for SECONDS, then prints the count; for `perf record -p <agent>`.
pub fn connect_loop_child(args: &[String]) {
    let path = PathBuf::from(&args[0]);
    let secs: f64 = args[1].parse().unwrap();
    let clients: usize = args[2].parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let n = rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let path = path.clone();
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        connect_and_fetch(&path).await;
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut n = 0;
        for t in tasks {
            n += t.await.unwrap();
        }
        n
    });
    println!("{n} connections");
}

/// Runs `op` `n` times from `conc` concurrent tasks; returns every sample (µs).
pub async fn measure<F, Fut>(n: usize, conc: usize, op: F) -> Vec<f64>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = f64> + Send,
{
    let op = Arc::new(op);
    let per = n.div_ceil(conc);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut v = Vec::with_capacity(per);
            for _ in 0..per {
                v.push(op().await);
            }
            v
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Unary FetchJWTSVID on a kept connection; µs.
pub async fn jwt_on(c: &mut SpiffeWorkloadApiClient<Channel>) -> f64 {
    let t = Instant::now();
    c.fetch_jwtsvid(req(JwtsvidRequest {
        audience: vec!["bench".into()],
        spiffe_id: String::new(),
    }))
    .await
    .unwrap();
    t.elapsed().as_secs_f64() * 1e6
}

/// FetchX509SVID first messages over kept connections from `clients` tasks for `secs`;
/// returns (fetches, fetches/s).
pub async fn throughput(path: &Path, clients: usize, secs: f64) -> (u64, f64) {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let path = path.to_path_buf();
        tasks.push(tokio::spawn(async move {
            let mut c = client(&path).await;
            let mut n = 0u64;
            while Instant::now() < deadline {
                fetch_on(&mut c).await;
                n += 1;
            }
            n
        }));
    }
    let start = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    (
        total,
        total as f64 / start.elapsed().as_secs_f64().max(secs),
    )
}

/// One FetchX509SVID first message on a kept connection; µs.
pub async fn fetch_on(c: &mut SpiffeWorkloadApiClient<Channel>) -> f64 {
    let t = Instant::now();
    let mut s = c
        .fetch_x509svid(req(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    s.message().await.unwrap().unwrap();
    t.elapsed().as_secs_f64() * 1e6
}

/// One FetchX509SVID first message on a kept connection, connected first when there is
/// none and dropped after a failure; µs, or None when no SVID came within 5 s.
pub async fn try_fetch(
    conn: &mut Option<SpiffeWorkloadApiClient<Channel>>,
    path: &Path,
) -> Option<f64> {
    if conn.is_none() {
        let ch = continuity_common::grpc::uds_channel(path).await.ok()?;
        *conn = Some(SpiffeWorkloadApiClient::new(ch));
    }
    let c = conn.as_mut()?;
    let t = Instant::now();
    let first = tokio::time::timeout(Duration::from_secs(5), async {
        let s = c.fetch_x509svid(req(X509svidRequest {})).await.ok()?;
        s.into_inner().message().await.ok().flatten()
    })
    .await;
    match first {
        Ok(Some(m)) if !m.svids.is_empty() => Some(t.elapsed().as_secs_f64() * 1e6),
        _ => {
            *conn = None;
            None
        }
    }
}
