//! The EngineAPI floor: the same two hops as a real `EngineAPI.Sign`, each an echo server in
//! its own process, chained: client → EngineAPI on a Unix socket (the agent's place) →
//! EngineBroker over TLS on loopback (the server's place), which makes the raw signature
//! (in-process P-256 for transit, `C_Sign` on SoftHSM2 for hsm) → reply back down the chain.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use continuity_proto::engine::engine_api_server::{EngineApi, EngineApiServer};
use continuity_proto::engine::engine_broker_client::EngineBrokerClient;
use continuity_proto::engine::engine_broker_server::{EngineBroker, EngineBrokerServer};
use continuity_proto::engine::*;
use continuity_tests::softhsm::SoftHsm;
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::hsm::HsmKey;

type Answer<T> = Result<Response<T>, Status>;

fn unimplemented<T>() -> Answer<T> {
    Err(Status::unimplemented("not part of the floor"))
}

/// The signature the far end makes.
enum Signer {
    Transit(aws_lc_rs::signature::EcdsaKeyPair),
    Hsm(HsmKey),
}

impl Signer {
    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match self {
            Self::Transit(kp) => kp
                .sign(&aws_lc_rs::rand::SystemRandom::new(), msg)
                .unwrap()
                .as_ref()
                .to_vec(),
            Self::Hsm(k) => {
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg);
                k.sign(digest.as_ref())
            }
        }
    }
}

/// The server's place: EngineBroker.Sign answers with a raw signature.
struct TlsEcho(Signer);

#[tonic::async_trait]
impl EngineBroker for TlsEcho {
    async fn sign(&self, r: Request<BrokerSign>) -> Answer<SignResponse> {
        let req = r.into_inner().request.unwrap_or_default();
        Ok(Response::new(SignResponse {
            key: req.key,
            version: 1,
            signature: self.0.sign(&req.message),
            algorithm: "ES256".into(),
            kid: "floor".into(),
            ..Default::default()
        }))
    }
    async fn encrypt(&self, _: Request<BrokerEncrypt>) -> Answer<EncryptResponse> {
        unimplemented()
    }
    async fn decrypt(&self, _: Request<BrokerDecrypt>) -> Answer<DecryptResponse> {
        unimplemented()
    }
    async fn get_public_key(&self, _: Request<BrokerGetPublicKey>) -> Answer<GetPublicKeyResponse> {
        unimplemented()
    }
    async fn generate_data_key(
        &self,
        _: Request<BrokerGenerateDataKey>,
    ) -> Answer<GenerateDataKeyResponse> {
        unimplemented()
    }
    async fn rewrap(&self, _: Request<BrokerRewrap>) -> Answer<RewrapResponse> {
        unimplemented()
    }
    async fn fetch_secret(&self, _: Request<BrokerFetchSecret>) -> Answer<FetchSecretResponse> {
        unimplemented()
    }
    async fn get_engine_jwks(&self, _: Request<BrokerJwks>) -> Answer<EngineJwks> {
        unimplemented()
    }
    async fn report_incarnations(
        &self,
        _: Request<ReportIncarnationsRequest>,
    ) -> Answer<ReportIncarnationsResponse> {
        unimplemented()
    }
}

/// The agent's place: EngineAPI.Sign forwarded as EngineBroker.Sign on one TLS channel.
struct UdsEcho(EngineBrokerClient<Channel>);

type JwksStream = Pin<Box<dyn Stream<Item = Result<WatchEngineJwksResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EngineApi for UdsEcho {
    async fn sign(&self, r: Request<SignRequest>) -> Answer<SignResponse> {
        let forward = BrokerSign {
            entry_id: "floor".into(),
            request: Some(r.into_inner()),
            workload: Some(Workload {
                id: "spiffe://example.org/bench".into(),
                pid: 1,
                uid: 0,
                selectors: vec![],
            }),
        };
        self.0.clone().sign(forward).await
    }
    async fn verify(&self, _: Request<VerifyRequest>) -> Answer<VerifyResponse> {
        unimplemented()
    }
    async fn encrypt(&self, _: Request<EncryptRequest>) -> Answer<EncryptResponse> {
        unimplemented()
    }
    async fn decrypt(&self, _: Request<DecryptRequest>) -> Answer<DecryptResponse> {
        unimplemented()
    }
    async fn get_public_key(
        &self,
        _: Request<GetPublicKeyRequest>,
    ) -> Answer<GetPublicKeyResponse> {
        unimplemented()
    }
    async fn generate_data_key(
        &self,
        _: Request<GenerateDataKeyRequest>,
    ) -> Answer<GenerateDataKeyResponse> {
        unimplemented()
    }
    async fn rewrap(&self, _: Request<RewrapRequest>) -> Answer<RewrapResponse> {
        unimplemented()
    }
    async fn fetch_secret(&self, _: Request<FetchSecretRequest>) -> Answer<FetchSecretResponse> {
        unimplemented()
    }
    type WatchEngineJWKSStream = JwksStream;
    async fn watch_engine_jwks(
        &self,
        _: Request<WatchEngineJwksRequest>,
    ) -> Answer<Self::WatchEngineJWKSStream> {
        unimplemented()
    }
}

/// A server-side TLS connection tonic can serve.
struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Child: `--engine-tls-echo <dir> transit|hsm [label pin]`. Serves EngineBroker over TLS
/// with `<dir>/cert.der` + `<dir>/key.der` on a loopback port, written to `<dir>/port`.
pub fn tls_echo_child(args: &[String]) {
    let dir = PathBuf::from(&args[0]);
    let signer = if args[1] == "hsm" {
        Signer::Hsm(HsmKey::open(&args[2], &args[3], false))
    } else {
        Signer::Transit(
            aws_lc_rs::signature::EcdsaKeyPair::generate(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            )
            .unwrap(),
        )
    };
    let cert = rustls_pki_types::CertificateDer::from(std::fs::read(dir.join("cert.der")).unwrap());
    let key =
        rustls_pki_types::PrivateKeyDer::Pkcs8(std::fs::read(dir.join("key.der")).unwrap().into());
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    runtime().block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = tx.send(Ok::<_, std::io::Error>(TlsConn(tls))).await;
                    }
                });
            }
        });
        let tmp = dir.join("port.tmp");
        std::fs::write(&tmp, port.to_string()).unwrap();
        std::fs::rename(&tmp, dir.join("port")).unwrap();
        tonic::transport::Server::builder()
            .add_service(EngineBrokerServer::new(TlsEcho(signer)))
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap();
    });
}

/// Child: `--engine-uds-echo <dir> <socket>`. Serves EngineAPI on the socket, forwarding to
/// the TLS echo whose port and certificate are in `<dir>`.
pub fn uds_echo_child(args: &[String]) {
    let (dir, sock) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let port = std::fs::read_to_string(dir.join("port")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(
            std::fs::read(dir.join("cert.der")).unwrap(),
        ))
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    runtime().block_on(async move {
        let ch = continuity_common::grpc::tls_channel(format!("127.0.0.1:{port}"), Arc::new(cfg))
            .await
            .unwrap();
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        tonic::transport::Server::builder()
            .add_service(EngineApiServer::new(UdsEcho(EngineBrokerClient::new(ch))))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
}

/// The two echo processes; killed when dropped.
pub struct EchoChain {
    /// The EngineAPI socket of the first hop.
    pub socket: PathBuf,
    children: Vec<std::process::Child>,
}

impl Drop for EchoChain {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_path(p: &Path, what: &str) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what} did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts the chain in `dir`; `hsm` makes the far end sign with `C_Sign` on that token.
pub async fn start(dir: &Path, hsm: Option<&SoftHsm>) -> EchoChain {
    std::fs::create_dir_all(dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["continuity-server".into()]).unwrap();
    std::fs::write(dir.join("cert.der"), ck.cert.der()).unwrap();
    std::fs::write(dir.join("key.der"), ck.signing_key.serialize_der()).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut tls = std::process::Command::new(&exe);
    tls.arg("--engine-tls-echo").arg(dir);
    match hsm {
        Some(h) => tls
            .args(["hsm", &h.label, &h.pin])
            .env("SOFTHSM2_CONF", &h.conf),
        None => tls.arg("transit"),
    };
    let mut children = vec![tls.spawn().unwrap()];
    wait_path(&dir.join("port"), "TLS echo").await;
    let socket = dir.join("engine.sock");
    children.push(
        std::process::Command::new(&exe)
            .arg("--engine-uds-echo")
            .arg(dir)
            .arg(&socket)
            .spawn()
            .unwrap(),
    );
    wait_path(&socket, "UDS echo").await;
    EchoChain { socket, children }
}
