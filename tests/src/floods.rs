//! Tools for the flood tests: raw HTTP/2 over TLS to the agent API (streams opened and never
//! fed), a process's memory and CPU time from /proc, and a server run under a low
//! RLIMIT_NOFILE.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use continuity_common::tls::{TrustRoots, client_config};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::agent_client::server_id;
use crate::bin;
use crate::server::TestServer;

/// The HTTP/2 client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One HTTP/2 frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn hpack_str(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 127);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// The HPACK block of a gRPC POST to `path` (static-table and literal fields only).
pub fn grpc_headers(path: &str) -> Vec<u8> {
    let mut b = vec![0x83, 0x87]; // :method POST, :scheme https
    b.push(0x04); // :path, literal without indexing
    hpack_str(&mut b, path);
    b.push(0x01); // :authority
    hpack_str(&mut b, "localhost");
    b.extend_from_slice(&[0x0f, 0x10]); // content-type (static index 31)
    hpack_str(&mut b, "application/grpc");
    b.push(0x00);
    hpack_str(&mut b, "te");
    hpack_str(&mut b, "trailers");
    b
}

/// A TCP connection to `addr` from `source` (e.g. 127.0.0.2, so that per-IP caps tell the
/// attacker from the well-behaved agent on 127.0.0.1).
pub async fn tcp_from(source: &str, addr: &str) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(format!("{source}:0").parse::<SocketAddr>().unwrap())?;
    sock.connect(addr.parse().unwrap()).await
}

/// A TLS connection to the agent API from `source`, presenting `client` (agent SVID chain and
/// PKCS#8 key) if given.
pub async fn tls_connect(
    source: &str,
    addr: &str,
    bundle: Vec<Vec<u8>>,
    client: Option<(&[Vec<u8>], &[u8])>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let client = client.map(|(chain, key)| {
        (
            chain
                .iter()
                .map(|c| CertificateDer::from(c.clone()))
                .collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
        )
    });
    let cfg = client_config(TrustRoots::new(bundle), server_id(), client).unwrap();
    let tcp = tcp_from(source, addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// What the server answered to a flood of streams.
#[derive(Debug, Default, Clone)]
pub struct FloodReport {
    /// SETTINGS_MAX_CONCURRENT_STREAMS the server advertised (None: unlimited).
    pub max_concurrent_streams: Option<u32>,
    /// Streams the server reset with REFUSED_STREAM.
    pub refused: usize,
    /// Streams the server reset with another code.
    pub reset_other: usize,
    /// Last stream id of a GOAWAY, if one came (streams above it were never processed).
    pub goaway_last: Option<u32>,
    /// The server closed the connection.
    pub closed: bool,
    /// HEADERS frames written.
    pub opened: usize,
}

impl FloodReport {
    /// Streams the server did not take: refused, or above a GOAWAY's last stream id.
    pub fn not_taken(&self) -> usize {
        let beyond_goaway = self.goaway_last.map_or(0, |last| {
            self.opened.saturating_sub(last.div_ceil(2) as usize)
        });
        self.refused.max(beyond_goaway)
    }
}

/// A flood of idle streams on one connection, held open until dropped.
pub struct Flood {
    /// The running count.
    pub report: Arc<Mutex<FloodReport>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Flood {
    /// The report so far.
    pub fn now(&self) -> FloodReport {
        self.report.lock().unwrap().clone()
    }

    /// Waits until `done(report)` or `limit` passes; returns the report.
    pub async fn wait_until(
        &self,
        limit: Duration,
        done: impl Fn(&FloodReport) -> bool,
    ) -> FloodReport {
        let start = Instant::now();
        loop {
            let r = self.now();
            if done(&r) || start.elapsed() > limit {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Opens `n` streams calling `path` on `tls` (HEADERS without END_STREAM, no DATA ever) and
/// keeps reading the server's answers (acknowledging its SETTINGS and PINGs).
pub async fn flood_streams(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    path: &str,
    n: usize,
) -> Flood {
    let (rd, wr) = tokio::io::split(tls);
    let report = Arc::new(Mutex::new(FloodReport::default()));
    let (ctl_tx, ctl_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let (settings_tx, settings_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(read_answers(rd, report.clone(), ctl_tx, settings_tx));
    let streams = OpenStreams {
        block: grpc_headers(path),
        n,
        settings: settings_rx,
        control: ctl_rx,
        report: report.clone(),
    };
    let writer = tokio::spawn(streams.write(wr));
    Flood {
        report,
        tasks: vec![reader, writer],
    }
}

type FloodTls = tokio_rustls::client::TlsStream<TcpStream>;
type Control = tokio::sync::mpsc::UnboundedSender<Vec<u8>>;

/// The flood's reading half: notes what the server answers and queues the acknowledgements
/// of its SETTINGS and PINGs on `ctl_tx`.
async fn read_answers(
    mut rd: tokio::io::ReadHalf<FloodTls>,
    report: Arc<Mutex<FloodReport>>,
    ctl_tx: Control,
    settings_tx: tokio::sync::oneshot::Sender<()>,
) {
    let mut settings_tx = Some(settings_tx);
    let mut head = [0u8; 9];
    loop {
        if rd.read_exact(&mut head).await.is_err() {
            report.lock().unwrap().closed = true;
            return;
        }
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let mut payload = vec![0u8; len];
        if rd.read_exact(&mut payload).await.is_err() {
            report.lock().unwrap().closed = true;
            return;
        }
        let mut r = report.lock().unwrap();
        note_answer(&mut r, kind, flags, &payload, &ctl_tx, &mut settings_tx);
    }
}

/// Records one server frame in the report (and acknowledges SETTINGS and PING).
fn note_answer(
    r: &mut FloodReport,
    kind: u8,
    flags: u8,
    payload: &[u8],
    ctl_tx: &Control,
    settings_tx: &mut Option<tokio::sync::oneshot::Sender<()>>,
) {
    match kind {
        0x4 if flags & 1 == 0 => {
            for p in payload.chunks_exact(6) {
                if u16::from_be_bytes([p[0], p[1]]) == 3 {
                    r.max_concurrent_streams = Some(u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
                }
            }
            let _ = ctl_tx.send(frame(0x4, 1, 0, &[]));
            if let Some(t) = settings_tx.take() {
                let _ = t.send(());
            }
        }
        0x3 if payload.len() == 4 => {
            if u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) == 7 {
                r.refused += 1;
            } else {
                r.reset_other += 1;
            }
        }
        0x6 if flags & 1 == 0 => {
            let _ = ctl_tx.send(frame(0x6, 1, 0, payload));
        }
        0x7 if payload.len() >= 8 => {
            r.goaway_last = Some(
                u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff,
            );
        }
        _ => {}
    }
}

/// The flood's writing half: the preface, then (once the server's SETTINGS came) `n`
/// header-only streams, with the reader's acknowledgements in between.
struct OpenStreams {
    block: Vec<u8>,
    n: usize,
    settings: tokio::sync::oneshot::Receiver<()>,
    control: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    report: Arc<Mutex<FloodReport>>,
}

impl OpenStreams {
    async fn write(mut self, mut wr: tokio::io::WriteHalf<FloodTls>) {
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(0x4, 0, 0, &[]));
        if wr.write_all(&hello).await.is_err() {
            return;
        }
        if self.settings.await.is_err() {
            return;
        }
        while let Ok(f) = self.control.try_recv() {
            let _ = wr.write_all(&f).await;
        }
        for chunk in (0..self.n).collect::<Vec<_>>().chunks(200) {
            let mut out = Vec::new();
            for i in chunk {
                out.extend(frame(0x1, 0x4, (2 * *i + 1) as u32, &self.block));
            }
            if wr.write_all(&out).await.is_err() {
                return;
            }
            self.report.lock().unwrap().opened += chunk.len();
            while let Ok(f) = self.control.try_recv() {
                let _ = wr.write_all(&f).await;
            }
        }
        let _ = wr.flush().await;
        while let Some(f) = self.control.recv().await {
            if wr.write_all(&f).await.is_err() {
                return;
            }
        }
    }
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Resident memory of a process now, KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// Peak resident memory of a process, KiB (VmHWM).
pub fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// CPU time (user + system) a process has used, in clock ticks (/proc/PID/stat).
pub fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the state field.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A `continuity-server` run with `ulimit -n <limit>` on a configured [`TestServer`]
/// (`TestServer::configure`); killed on drop.
pub struct LimitedServer {
    child: Child,
}

impl LimitedServer {
    /// Starts `server` under an fd limit and waits until its admin socket answers.
    pub fn start(server: &TestServer, limit: u32) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(server.dir.join("server.log"))
            .unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n {limit} && exec \"$0\" run --config \"$1\""
            ))
            .arg(bin("continuity-server"))
            .arg(server.dir.join("server.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut me = Self { child };
        let start = Instant::now();
        loop {
            if server.socket.exists() && server.cli(&["healthcheck"]).status.success() {
                return me;
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!("server exited with {status}; log:\n{}", server.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "server not healthy; log:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The server's pid (the shell exec'd it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LimitedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
