//! The agent's listeners: the Workload API, the EngineAPI and Envoy SDS v3 (plus gRPC health
//! and reflection) on `socket_path`.

pub mod authority;
pub mod conns;
pub mod engine;
pub use crate::peer;
pub mod sds;
pub mod workload;

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use continuity_proto::engine::engine_api_server::EngineApiServer;
use continuity_proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
use continuity_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::Connected;

use self::authority::AuthorityFix;
use self::conns::{ConnLimits, Slot, Tracker};
use self::peer::{ConnInfo, Peer};
use self::workload::{WorkloadHandler, check_security_header};
use crate::config::WorkloadApiConfig;
use crate::limits::CallerKey;

/// Largest Workload API request decoded (16 audiences of 256 bytes, or a JWT, fit easily).
pub const MAX_WORKLOAD_MESSAGE: usize = 64 * 1024;
/// Largest health or reflection request decoded (a service or symbol name).
pub const MAX_SMALL_MESSAGE: usize = 16 * 1024;
/// Largest EngineAPI request decoded: a [`engine::MAX_PLAINTEXT`] plaintext plus its framing,
/// or a ciphertext of one.
pub const MAX_ENGINE_MESSAGE: usize = 128 * 1024;
/// HTTP/2 flow-control window per stream: what a peer may send on one call before we read it.
pub const STREAM_WINDOW: u32 = 64 * 1024;
/// HTTP/2 flow-control window per connection (all its streams together).
pub const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 PING interval on idle connections, and how long to wait for the answer.
pub const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(20));

/// An accepted Workload API connection. Its reads end (EOF) once the tracker closes it.
pub struct WorkloadConn {
    io: AuthorityFix<UnixStream>,
    info: ConnInfo,
    slot: Slot,
}

/// What each request on a Workload API connection carries in its extensions.
#[derive(Debug, Clone)]
pub struct WorkloadConnInfo {
    /// The peer and its attestation.
    pub info: ConnInfo,
    /// Marks the connection busy while a call is open.
    pub calls: conns::ConnCalls,
}

impl Connected for WorkloadConn {
    type ConnectInfo = WorkloadConnInfo;
    fn connect_info(&self) -> WorkloadConnInfo {
        WorkloadConnInfo {
            info: self.info.clone(),
            calls: self.slot.calls(),
        }
    }
}

impl AsyncRead for WorkloadConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let control = self.slot.control();
        if control.is_closed() {
            return Poll::Ready(Ok(()));
        }
        control.register(cx.waker());
        if control.is_closed() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for WorkloadConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.slot.control().is_closed() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.get_ref().is_write_vectored()
    }
}

/// Binds the Workload API socket: opens (creating, 0755) its directory, refusing one another
/// user could have made or changed, replaces a stale socket, and lets every local user connect
/// (workloads are told apart by attestation).
pub async fn bind(path: &Path) -> io::Result<UnixListener> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "must name a socket file in a directory",
        ));
    };
    let dir = continuity_common::fsperm::secure_dir(dir, 0o755, "socket directory")
        .map_err(io::Error::other)?;
    if dir.socket_exists(name).map_err(io::Error::other)? {
        if UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use: another agent is running", path.display()),
            ));
        }
        dir.remove_socket(name).map_err(io::Error::other)?;
    }
    // `dir` was verified writable only by us (parents only by us or root), so binding by path
    // and setting the socket's mode by name inside it cannot be redirected.
    let listener = UnixListener::bind(path)?;
    dir.set_mode(name, 0o777).map_err(io::Error::other)?;
    Ok(listener)
}

/// Accepts connections, reading each peer's credentials at accept time and holding each to
/// the connection caps of `tracker`. Never waits on a connection: refused ones are dropped.
pub fn incoming(
    listener: UnixListener,
    tracker: Arc<Tracker>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<WorkloadConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(tracker.clone().sweep());
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => {
                    failing = false;
                    s
                }
                Err(e) => {
                    accept_failed(&e, &tracker, &mut failing).await;
                    continue;
                }
            };
            let Some(conn) = admit(stream, &tracker) else {
                continue;
            };
            if tx.send(Ok(conn)).await.is_err() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Reads the peer and takes a slot; None (the stream dropped, so closed) when refused.
fn admit(stream: UnixStream, tracker: &Arc<Tracker>) -> Option<WorkloadConn> {
    let peer = match Peer::of(&stream) {
        Ok(p) => Some(Arc::new(p)),
        Err(e) => {
            tracing::info!(error = %e, "cannot read Workload API peer credentials");
            None
        }
    };
    let scope = peer
        .as_ref()
        .map_or(CallerKey::Uid(conns::UNKNOWN_UID), |p| {
            static PODS: std::sync::LazyLock<peer::Memo<Option<String>>> =
                std::sync::LazyLock::new(peer::Memo::new);
            PODS.get_or(p.process, || pod_of(p.pid))
                .map_or(CallerKey::Uid(p.uid), CallerKey::Pod)
        });
    let io = AuthorityFix::new(stream);
    // Refusals are logged (rate-limited) by the tracker.
    let slot = tracker.admit(scope, io.activity()).ok()?;
    let workload_id: Arc<str> = peer
        .as_ref()
        .map_or_else(|| "unknown".into(), |p| p.workload_id().into());
    let info = ConnInfo {
        workload_id,
        peer,
        selectors: Arc::default(),
    };
    Some(WorkloadConn { io, info, slot })
}

/// Most bytes of `/proc/<pid>/cgroup` read (a pod's is a few hundred).
const MAX_CGROUP_FILE: u64 = 16 * 1024;

/// The UID of the pod `pid` runs in, from its cgroup (a procfs read: never blocks on a
/// workload's file system). Not attestation: a process could only claim a pod it is in.
fn pod_of(pid: u32) -> Option<String> {
    use std::io::Read;
    let f = std::fs::File::open(format!("/proc/{pid}/cgroup")).ok()?;
    let mut text = String::new();
    f.take(MAX_CGROUP_FILE).read_to_string(&mut text).ok()?;
    continuity_attestors::k8s::cgroup::parse(&text, agent_cgroup_depth()).map(|p| p.pod_uid)
}

/// Depth of the agent's own cgroup namespace root, read once from pid 1's cgroup (0 without
/// a private namespace), so that pods are recognised as the k8s attestor recognises them.
fn agent_cgroup_depth() -> usize {
    static DEPTH: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *DEPTH.get_or_init(|| {
        std::fs::read_to_string("/proc/1/cgroup")
            .map(|t| continuity_attestors::k8s::cgroup::namespace_depth(&t))
            .unwrap_or(0)
    })
}

/// Backs off after a failed accept (logging once per run of failures). Out of file
/// descriptors, it also closes the oldest idle connection to free one.
async fn accept_failed(e: &io::Error, tracker: &Tracker, failing: &mut bool) {
    use nix::errno::Errno;
    let out_of_fds = e
        .raw_os_error()
        .is_some_and(|n| n == Errno::EMFILE as i32 || n == Errno::ENFILE as i32);
    if !*failing {
        if out_of_fds {
            tracing::warn!(error = %e, open = tracker.open(), "Workload API accept failed: out of file descriptors; backing off");
        } else {
            tracing::warn!(error = %e, "Workload API accept failed; backing off");
        }
        *failing = true;
    }
    if out_of_fds {
        tracker.evict_oldest_idle();
    }
    tokio::time::sleep(Duration::from_millis(if out_of_fds { 100 } else { 20 })).await;
}

/// Serves the Workload API, the EngineAPI, SDS, health and reflection until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    limits: &WorkloadApiConfig,
    handler: WorkloadHandler,
    engine: engine::EngineHandler,
    sds: sds::SdsHandler,
    rpc: std::sync::Arc<continuity_common::metrics::RpcMetrics>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let tracker = Tracker::new(ConnLimits {
        max_total: limits.max_connections,
        max_per_uid: limits.max_connections_per_uid,
        idle_timeout: limits.idle_timeout,
    });
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("SpiffeWorkloadAPI", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(
            "envoy.service.secret.v3.SecretDiscoveryService",
            tonic_health::ServingStatus::Serving,
        )
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(continuity_proto::FILE_DESCRIPTOR_SET)
        .build_v1();
    // The limits the authority adapter enforces are the ones advertised here. The request
    // timeout bounds each handler future (for unary calls: reading the request too); a
    // server stream's handler returns its stream at once, so watches are not cut.
    let mut router = tonic::transport::Server::builder()
        .timeout(limits.request_timeout)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(authority::MAX_FRAME_SIZE)
        .http2_max_header_list_size(authority::MAX_HEADER_LIST_SIZE)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(KEEPALIVE.0))
        .http2_keepalive_timeout(Some(KEEPALIVE.1))
        // Per-RPC counts and latencies for `/metrics`, around every service on the socket.
        .layer(continuity_common::metrics::RpcMetricsLayer::new(rpc))
        .add_service(health.max_decoding_message_size(MAX_SMALL_MESSAGE))
        .add_service(InterceptedService::new(
            SpiffeWorkloadApiServer::new(handler).max_decoding_message_size(MAX_WORKLOAD_MESSAGE),
            check_security_header,
        ))
        .add_service(InterceptedService::new(
            EngineApiServer::new(engine).max_decoding_message_size(MAX_ENGINE_MESSAGE),
            check_security_header,
        ))
        // Envoy sends no security header; SPIRE requires it on the Workload API only.
        .add_service(
            SecretDiscoveryServiceServer::new(sds).max_decoding_message_size(sds::MAX_SDS_MESSAGE),
        );
    match reflection {
        Ok(r) => router = router.add_service(r.max_decoding_message_size(MAX_SMALL_MESSAGE)),
        Err(e) => tracing::warn!(error = %e, "gRPC reflection unavailable"),
    }
    router
        .serve_with_incoming_shutdown(incoming(listener, tracker), shutdown)
        .await
}
