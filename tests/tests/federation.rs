//! SPIFFE federation across two trust domains with the real binaries: foreign bundles stored
//! through the admin CLI (parsed as hostile input, record-MACed, audited), entries that
//! federate only with a known bundle, a bundle in use that cannot be deleted; and two servers
//! with two agents whose workloads do mutual TLS across the trust domains with the Rust
//! `spiffe` crate and rustls, trusting only what their own agent served.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::process::Output;

use continuity_tests::federation::server_in;
use continuity_tests::server::{ServerOptions, TestServer};

const OTHER: &str = "spiffe://other.org";

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must fail; returns its stderr.
fn refused(s: &TestServer, args: &[&str]) -> String {
    let o = s.cli(args);
    assert!(
        !o.status.success(),
        "{args:?} was accepted: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    stderr(&o)
}

fn list_json(s: &TestServer) -> serde_json::Value {
    serde_json::from_str(&s.cli_ok(&["bundle", "list", "--output", "json"])).unwrap()
}

fn federating_entry(s: &TestServer, td: &str) -> Output {
    s.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/fed",
        "--parent-id",
        "spiffe://example.org/node/fed",
        "--selector",
        "unix:uid:4242",
        "--federates-with",
        td,
        "--output",
        "json",
    ])
}

#[test]
fn foreign_bundles_are_parsed_stored_audited_and_guard_entries() {
    let dir = tempfile::tempdir().unwrap();
    let ours = TestServer::start(&dir.path().join("a"), ServerOptions::default());
    let theirs = server_in(&dir.path().join("b"), "other.org", ServerOptions::default());
    let pem = theirs.cli_ok(&["bundle", "show"]);
    let doc = theirs.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let (pem_file, doc_file, bad_file) = (
        files.join("other.pem"),
        files.join("other.json"),
        files.join("bad.pem"),
    );
    std::fs::write(&pem_file, &pem).unwrap();
    std::fs::write(&doc_file, &doc).unwrap();
    std::fs::write(
        &bad_file,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();

    // Federating with an unknown trust domain is refused, with the reason.
    let o = federating_entry(&ours, OTHER);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("InvalidArgument") && stderr(&o).contains("no bundle of trust domain"),
        "{}",
        stderr(&o)
    );

    // A bad file is refused naming it, and nothing is written.
    let e = refused(
        &ours,
        &["bundle", "set", "--id", OTHER, "--path", &path(&bad_file)],
    );
    assert!(
        e.contains(&path(&bad_file))
            && e.contains("InvalidArgument")
            && e.contains("certificate 0"),
        "{e}"
    );
    let e = refused(
        &ours,
        &[
            "bundle",
            "set",
            "--id",
            OTHER,
            "--path",
            &path(&pem_file),
            "--format",
            "spiffe",
        ],
    );
    assert!(e.contains("SPIFFE bundle"), "PEM read as JSON: {e}");
    let e = refused(
        &ours,
        &[
            "bundle",
            "set",
            "--id",
            OTHER,
            "--path",
            &path(&files.join("missing")),
        ],
    );
    assert!(e.contains("missing"), "{e}");
    assert_eq!(list_json(&ours)["bundles"], serde_json::json!([]));
    // Our own trust domain's bundle is the CA's, never a foreign one.
    let e = refused(
        &ours,
        &[
            "bundle",
            "set",
            "--id",
            "spiffe://example.org",
            "--path",
            &path(&pem_file),
        ],
    );
    assert!(e.contains("own trust domain"), "{e}");

    // PEM, then the SPIFFE document (adds the JWT key, sequence and refresh hint).
    ours.cli_ok(&["bundle", "set", "--id", OTHER, "--path", &path(&pem_file)]);
    assert_eq!(ours.cli_ok(&["bundle", "show", "--id", OTHER]), pem);
    let l = list_json(&ours);
    assert_eq!(l["bundles"][0]["trust_domain"], OTHER);
    assert_eq!(l["bundles"][0]["x509_authorities"], 1);
    assert_eq!(l["bundles"][0]["jwt_authorities"], 0);
    ours.cli_ok(&[
        "bundle",
        "set",
        "--id",
        "other.org",
        "--path",
        &path(&doc_file),
        "--format",
        "spiffe",
    ]);
    let l = list_json(&ours);
    assert_eq!(l["bundles"].as_array().unwrap().len(), 1, "{l}");
    assert_eq!(l["bundles"][0]["jwt_authorities"], 1);
    let theirs_doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let shown: serde_json::Value = serde_json::from_str(
        &ours.cli_ok(&["bundle", "show", "--id", OTHER, "--format", "spiffe"]),
    )
    .unwrap();
    assert_eq!(
        shown, theirs_doc,
        "the stored bundle is the document as given"
    );

    // Now an entry may federate with it, and the bundle cannot be deleted under it.
    let o = federating_entry(&ours, OTHER);
    assert!(o.status.success(), "{}", stderr(&o));
    let entry: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = entry["id"].as_str().unwrap();
    assert_eq!(entry["federates_with"], serde_json::json!([OTHER]));
    let e = refused(&ours, &["bundle", "delete", "--id", OTHER]);
    assert!(e.contains("FailedPrecondition") && e.contains(id), "{e}");

    // It survives a restart (read back through its record MAC), and integrity verify checks it.
    let mut ours = ours;
    ours.restart();
    assert_eq!(ours.cli_ok(&["bundle", "show", "--id", OTHER]), pem);
    let v: serde_json::Value =
        serde_json::from_str(&ours.cli_ok(&["integrity", "verify", "--output", "json"])).unwrap();
    assert_eq!(v["bad_rows"], serde_json::json!([]), "{v}");

    ours.cli_ok(&["entry", "delete", "--id", id]);
    ours.cli_ok(&["bundle", "delete", "--id", OTHER]);
    assert_eq!(list_json(&ours)["bundles"], serde_json::json!([]));
    let e = refused(&ours, &["bundle", "show", "--id", OTHER]);
    assert!(e.contains("NotFound"), "{e}");
    let audit = ours.cli_ok(&["audit", "show"]);
    assert_eq!(audit.matches("bundle.set").count(), 2, "{audit}");
    assert_eq!(audit.matches("bundle.delete").count(), 1, "{audit}");

    // A row edited in the datastore is held back and listed, never served.
    ours.cli_ok(&["bundle", "set", "--id", OTHER, "--path", &path(&pem_file)]);
    ours.stop();
    let db = ours.dir.join("data").join("datastore.sqlite3");
    let o = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("UPDATE foreign_bundles SET updated_at = updated_at + 1")
        .output()
        .unwrap();
    assert!(o.status.success(), "sqlite3: {}", stderr(&o));
    ours.spawn();
    let e = refused(&ours, &["bundle", "show", "--id", OTHER]);
    assert!(e.contains("NotFound"), "{e}");
    let o = ours.cli(&["integrity", "verify", "--output", "json"]);
    assert!(
        !o.status.success(),
        "a tampered bundle row passed integrity verify"
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["bad_rows"][0]["table"], "foreign_bundles", "{v}");
    assert_eq!(v["bad_rows"][0]["key"], "other.org", "{v}");
}

const A_NODE: &str = "spiffe://example.org/node/fed-a";
const B_NODE: &str = "spiffe://other.org/node/fed-b";
/// A workload on agent A that does not federate (run as this uid).
const LONER_UID: u32 = 4243;

/// Polls `f` every 200 ms for up to 60 s; panics with `what` if it never answers.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn td(s: &str) -> spiffe::TrustDomain {
    spiffe::TrustDomain::new(s).unwrap()
}

/// The X.509 context a workload of this process receives from `agent`, once it holds a
/// bundle of `foreign` (or, with `want` false, once it holds none).
async fn context_with(
    agent: &continuity_tests::agent::TestAgent,
    foreign: &str,
    want: bool,
) -> spiffe::X509Context {
    let endpoint = agent.endpoint();
    eventually(
        &format!("{foreign} bundle present = {want} at {endpoint}"),
        || {
            let endpoint = endpoint.clone();
            async move {
                let c = spiffe::WorkloadApiClient::connect_to(&endpoint)
                    .await
                    .ok()?;
                let ctx = c.fetch_x509_context().await.ok()?;
                (ctx.bundle_set().get(&td(foreign)).is_some() == want).then_some(ctx)
            }
        },
    )
    .await
}

/// The trust domains of the SPIFFE validator config SDS answers `name` with (as Envoy would
/// decode it, with Envoy's own protos).
async fn sds_trust_domains(agent: &continuity_tests::agent::TestAgent, name: &str) -> Vec<String> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        Secret, SpiffeCertValidatorConfig, secret,
    };
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use prost::Message;
    let channel = continuity_common::grpc::uds_channel(&agent.socket)
        .await
        .unwrap();
    let mut c =
        SecretDiscoveryServiceClient::with_origin(channel, "http://spire_agent".parse().unwrap());
    let r = c
        .fetch_secrets(DiscoveryRequest {
            resource_names: vec![name.to_string()],
            type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let secret = Secret::decode(r.resources[0].value.as_slice()).unwrap();
    let Some(secret::Type::ValidationContext(v)) = secret.r#type else {
        panic!("{name}: not a validation context")
    };
    let any = v.custom_validator_config.unwrap().typed_config.unwrap();
    let cfg = SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
    cfg.trust_domains.into_iter().map(|t| t.name).collect()
}

/// Root store of one trust domain's bundle from a workload's context.
fn roots(ctx: &spiffe::X509Context, of: &str) -> rustls::RootCertStore {
    let mut r = rustls::RootCertStore::empty();
    let bundle = ctx
        .bundle_set()
        .get(&td(of))
        .unwrap_or_else(|| panic!("no bundle of {of}"));
    for c in bundle.authorities() {
        r.add(rustls_pki_types::CertificateDer::from(c.as_ref().to_vec()))
            .unwrap();
    }
    r
}

/// The SVID chain and key of a workload's context, for rustls.
fn identity(
    ctx: &spiffe::X509Context,
) -> (
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
) {
    let svid = ctx.default_svid().expect("an SVID");
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| rustls_pki_types::CertificateDer::from(c.as_ref().to_vec()))
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(
        svid.private_key().as_ref().to_vec(),
    ));
    (chain, key)
}

/// The URI SAN of a peer's leaf certificate.
fn peer_id(certs: Option<&[rustls_pki_types::CertificateDer<'_>]>) -> String {
    let leaf = certs.and_then(|c| c.first()).expect("a peer certificate");
    continuity_common::x509::spiffe_id_of(leaf)
        .unwrap()
        .to_string()
}

/// Mutual TLS between a client workload (context `client`, trust domain example.org) and a
/// server workload (context `server`, other.org), each trusting only the foreign bundle its
/// own agent served; returns (the ID the server saw, the ID the client saw).
async fn mtls(client: &spiffe::X509Context, server: &spiffe::X509Context) -> (String, String) {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots(server, "example.org")),
        provider.clone(),
    )
    .build()
    .unwrap();
    let (chain, key) = identity(server);
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    let (chain, key) = identity(client);
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(client, "other.org"))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server_cfg));
    let served = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.expect("server side of mTLS");
        let seen = peer_id(tls.get_ref().1.peer_certificates());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(b"pong").await.unwrap();
        tls.shutdown().await.unwrap();
        assert_eq!(&buf, b"ping");
        seen
    });
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("server.other.org").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_cfg))
        .connect(name, tcp)
        .await
        .expect("client side of mTLS");
    let seen_by_client = peer_id(tls.get_ref().1.peer_certificates());
    tls.write_all(b"ping").await.unwrap();
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await.unwrap();
    assert_eq!(buf, b"pong");
    (served.await.unwrap(), seen_by_client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_in_two_trust_domains_do_mtls_with_what_their_agents_served() {
    use continuity_tests::federation::agent_in;
    let dir = tempfile::tempdir().unwrap();
    let a = TestServer::start(&dir.path().join("a"), ServerOptions::default());
    let b = server_in(&dir.path().join("b"), "other.org", ServerOptions::default());
    let metrics_a = continuity_tests::free_port();
    let agent_a = agent_in(
        &dir.path().join("agent-a"),
        "example.org",
        &a,
        A_NODE,
        &format!("[metrics]\nbind_address = \"127.0.0.1:{metrics_a}\"\n"),
    );
    let agent_b = agent_in(&dir.path().join("agent-b"), "other.org", &b, B_NODE, "");
    let cached_bundles =
        || continuity_tests::prom::scrape(metrics_a).value("continuity_agent_cached_bundles", &[]);
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    // Each side learns the other's bundle: B's as the SPIFFE document, A's as PEM.
    let b_doc = files.join("b.json");
    std::fs::write(&b_doc, b.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    let a_pem = files.join("a.pem");
    std::fs::write(&a_pem, a.cli_ok(&["bundle", "show"])).unwrap();
    a.cli_ok(&[
        "bundle",
        "set",
        "--id",
        OTHER,
        "--path",
        b_doc.to_str().unwrap(),
        "--format",
        "spiffe",
    ]);
    b.cli_ok(&[
        "bundle",
        "set",
        "--id",
        "spiffe://example.org",
        "--path",
        a_pem.to_str().unwrap(),
    ]);

    let me = format!("unix:uid:{}", continuity_tests::uid());
    let client_entry = |federate: bool| {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/client",
            "--parent-id",
            A_NODE,
            "--selector",
            &me,
            "--output",
            "json",
        ];
        if federate {
            args.extend(["--federates-with", OTHER]);
        }
        let v: serde_json::Value = serde_json::from_str(&a.cli_ok(&args)).unwrap();
        v["id"].as_str().unwrap().to_string()
    };
    let client_id = client_entry(true);
    b.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://other.org/server",
        "--parent-id",
        B_NODE,
        "--selector",
        &me,
        "--dns-name",
        "server.other.org",
        "--federates-with",
        "spiffe://example.org",
    ]);
    let loner = format!("unix:uid:{LONER_UID}");
    a.create_entry("spiffe://example.org/loner", A_NODE, &[&loner]);

    // Each workload holds the other's bundle, and mTLS works both ways on it alone.
    let client_ctx = context_with(&agent_a, "other.org", true).await;
    let server_ctx = context_with(&agent_b, "example.org", true).await;
    assert_eq!(
        client_ctx.default_svid().unwrap().spiffe_id().to_string(),
        "spiffe://example.org/client"
    );
    let (seen_by_server, seen_by_client) = mtls(&client_ctx, &server_ctx).await;
    assert_eq!(seen_by_server, "spiffe://example.org/client");
    assert_eq!(seen_by_client, "spiffe://other.org/server");
    let b_ca = b.bundle_der();
    let got: Vec<Vec<u8>> = client_ctx
        .bundle_set()
        .get(&td("other.org"))
        .unwrap()
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    assert_eq!(got, b_ca, "agent A served B's CA exactly");
    // Envoy, through SDS on agent A, sees the same federated bundle under `ALL` and its ID.
    assert_eq!(
        sds_trust_domains(&agent_a, "ALL").await,
        ["example.org", "other.org"]
    );
    assert_eq!(sds_trust_domains(&agent_a, OTHER).await, ["other.org"]);
    assert_eq!(
        cached_bundles(),
        Some(2.0),
        "its own bundle and other.org's"
    );

    // The bundle maps and ValidateJWTSVID of a foreign JWT.
    let ca = spiffe::WorkloadApiClient::connect_to(&agent_a.endpoint())
        .await
        .unwrap();
    let x509_bundles = ca.fetch_x509_bundles().await.unwrap();
    assert!(
        x509_bundles.get(&td("other.org")).is_some()
            && x509_bundles.get(&td("example.org")).is_some()
    );
    let jwt_bundles = ca.fetch_jwt_bundles().await.unwrap();
    assert!(
        jwt_bundles.get(&td("other.org")).is_some(),
        "FetchJWTBundles lacks other.org"
    );
    let cb = spiffe::WorkloadApiClient::connect_to(&agent_b.endpoint())
        .await
        .unwrap();
    let foreign_jwt = cb.fetch_jwt_svid(["client-a"], None).await.unwrap();
    let v = ca
        .validate_jwt_token("client-a", foreign_jwt.token())
        .await
        .unwrap();
    assert_eq!(v.spiffe_id().to_string(), "spiffe://other.org/server");

    // `api fetch x509 --write` writes the foreign CAs too.
    let out = files.join("svids");
    agent_a.cli(&["api", "fetch", "x509", "--write", out.to_str().unwrap()]);
    let fed = std::fs::read_to_string(out.join("federated_bundle.0.pem"))
        .expect("federated_bundle.0.pem written");
    assert_eq!(fed, b.cli_ok(&["bundle", "show"]));

    // A workload that does not federate never receives it.
    let loner_dir = files.join("loner");
    std::fs::create_dir_all(&loner_dir).unwrap();
    continuity_tests::agent::open_up(&loner_dir);
    std::fs::set_permissions(
        &loner_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let o = agent_a.cli_as(
        LONER_UID,
        &[
            "api",
            "fetch",
            "x509",
            "--write",
            loner_dir.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "loner fetch: {}", stderr(&o));
    assert!(loner_dir.join("svid.0.pem").exists());
    assert!(
        !loner_dir.join("federated_bundle.0.pem").exists(),
        "a workload that does not federate got a foreign bundle"
    );

    // The entry stops federating: the bundle is no longer delivered, and may then be deleted.
    a.cli_ok(&[
        "entry",
        "update",
        "--id",
        &client_id,
        "--spiffe-id",
        "spiffe://example.org/client",
        "--parent-id",
        A_NODE,
        "--selector",
        &me,
    ]);
    let after = context_with(&agent_a, "other.org", false).await;
    assert!(after.bundle_set().get(&td("example.org")).is_some());
    a.cli_ok(&["bundle", "delete", "--id", OTHER]);
    let x509_bundles = ca.fetch_x509_bundles().await.unwrap();
    assert!(x509_bundles.get(&td("other.org")).is_none());
    let e = ca.validate_jwt_token("client-a", foreign_jwt.token()).await;
    assert!(e.is_err(), "a foreign JWT validated after federation ended");
    assert_eq!(cached_bundles(), Some(1.0), "other.org's bundle dropped");
}

/// GET / over TLS with `cfg` (server name `name`); returns the response body.
async fn https_get(port: u16, cfg: rustls::ClientConfig, name: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("TLS to the bundle endpoint");
    tls.write_all(b"GET / HTTP/1.1\r\nhost: bundle\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8(raw).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_endpoint_serves_the_spiffe_bundle_over_https_spiffe_and_https_web() {
    let dir = tempfile::tempdir().unwrap();
    // https_spiffe: TLS with the server's own SVID; the client trusts the bundle it has.
    let port = continuity_tests::free_port();
    let b = server_in(
        &dir.path().join("b"),
        "other.org",
        ServerOptions {
            extra_toml: format!(
                "[federation.bundle_endpoint]\nbind_address = \"127.0.0.1:{port}\"\nprofile = \"https_spiffe\"\n"
            ),
            ..ServerOptions::default()
        },
    );
    let roots = continuity_common::tls::TrustRoots::new(b.bundle_der());
    let id = continuity_common::SpiffeId::new("spiffe://other.org/continuity/server").unwrap();
    let mut cfg = continuity_common::tls::client_config(roots.clone(), id, None).unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let body = https_get(port, cfg, "other.org").await;
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();
    let shown: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    assert_eq!(served, shown);
    assert!(
        served["spiffe_refresh_hint"].as_i64().unwrap() > 0,
        "{served}"
    );
    assert!(served.get("spiffe_sequence").is_some(), "{served}");
    // A client expecting another SPIFFE ID refuses the endpoint.
    let wrong = continuity_common::SpiffeId::new("spiffe://other.org/not-the-server").unwrap();
    let mut cfg = continuity_common::tls::client_config(roots, wrong, None).unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let refused = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("other.org").unwrap(),
            tcp,
        )
        .await;
    assert!(
        refused.is_err(),
        "the endpoint's SVID passed for another SPIFFE ID"
    );

    // The document it served is what another trust domain stores as B's bundle.
    let a = TestServer::start(&dir.path().join("a"), ServerOptions::default());
    let fetched = dir.path().join("fetched.json");
    std::fs::write(&fetched, &body).unwrap();
    a.cli_ok(&[
        "bundle",
        "set",
        "--id",
        OTHER,
        "--path",
        fetched.to_str().unwrap(),
        "--format",
        "spiffe",
    ]);
    assert_eq!(
        a.cli_ok(&["bundle", "show", "--id", OTHER]),
        b.cli_ok(&["bundle", "show"])
    );

    // https_web: a configured certificate, verified as any Web PKI client does.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &rcgen::Issuer::from_params(&ca_params, &ca_key))
        .unwrap();
    let (cert_file, key_file) = (dir.path().join("web.pem"), dir.path().join("web.key"));
    std::fs::write(&cert_file, leaf.pem() + &ca.pem()).unwrap();
    std::fs::write(&key_file, leaf_key.serialize_pem()).unwrap();
    let web_port = continuity_tests::free_port();
    let w = server_in(
        &dir.path().join("w"),
        "web.org",
        ServerOptions {
            extra_toml: format!(
                "[federation.bundle_endpoint]\nbind_address = \"127.0.0.1:{web_port}\"\nprofile = \"https_web\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                cert_file.display(),
                key_file.display()
            ),
            ..ServerOptions::default()
        },
    );
    let mut web_roots = rustls::RootCertStore::empty();
    web_roots.add(ca.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(web_roots)
    .with_no_client_auth();
    let body = https_get(web_port, cfg, "localhost").await;
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();
    let shown: serde_json::Value =
        serde_json::from_str(&w.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    assert_eq!(served, shown);
}

#[test]
fn bundle_endpoint_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, key) in [
        (
            "[federation.bundle_endpoint]\nprofile = \"https_spiffe\"\n",
            "federation.bundle_endpoint.bind_address",
        ),
        (
            "[federation.bundle_endpoint]\nbind_address = \"127.0.0.1:1\"\nprofile = \"http\"\n",
            "federation.bundle_endpoint.profile",
        ),
        (
            "[federation.bundle_endpoint]\nbind_address = \"127.0.0.1:1\"\nprofile = \"https_web\"\n",
            "federation.bundle_endpoint.cert_file",
        ),
        (
            "[federation.bundle_endpoint]\nbind_address = \"127.0.0.1:1\"\nlisten = \"x\"\n",
            "listen",
        ),
    ] {
        let s = TestServer::configure(
            &dir.path().join(key.replace('.', "-")),
            ServerOptions {
                extra_toml: toml.into(),
                ..ServerOptions::default()
            },
        );
        let (ok, err) = s
            .run_until_exit(std::time::Duration::from_secs(20))
            .expect("a bad [federation] table must stop the server");
        assert!(!ok && err.contains(key), "{key}: {err}");
    }
}

/// `[federation]` of a server that refreshes every second and serves its bundle endpoint on
/// `port` (https_spiffe) with a 1 s refresh hint.
fn refreshing_toml(port: u16, extra: &str) -> String {
    format!(
        "[federation]\nrefresh_min_interval = \"1s\"\n{extra}[federation.bundle_endpoint]\nbind_address = \"127.0.0.1:{port}\"\nprofile = \"https_spiffe\"\nrefresh_hint = \"1s\"\n"
    )
}

/// `federation create` on `s` for `td`'s https_spiffe endpoint on `port`, bootstrapped from
/// `bundle_file` (the peer's `bundle show --format spiffe`).
fn create_spiffe_relationship(s: &TestServer, td: &str, port: u16, bundle_file: &str) -> String {
    s.cli_ok(&[
        "federation",
        "create",
        "--trust-domain",
        &format!("spiffe://{td}"),
        "--bundle-endpoint-url",
        &format!("https://127.0.0.1:{port}/"),
        "--bundle-endpoint-profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        &format!("spiffe://{td}/continuity/server"),
        "--trust-domain-bundle-path",
        bundle_file,
        "--trust-domain-bundle-format",
        "spiffe",
        "--output",
        "json",
    ])
}

/// Polls (up to 60 s) until `s` holds, for `td`, the bundle `peer` shows as its own.
async fn holds_bundle_of(s: &TestServer, td: &str, peer: &TestServer, what: &str) {
    eventually(what, || {
        let (got, want) = (
            s.cli(&["bundle", "show", "--id", td]),
            peer.cli_ok(&["bundle", "show"]),
        );
        std::future::ready((got.status.success() && got.stdout == want.as_bytes()).then_some(()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_relationships_refresh_bundles_both_ways_and_delete_ends_delivery() {
    use continuity_tests::federation::agent_in;
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (continuity_tests::free_port(), continuity_tests::free_port());
    let opts = |port| ServerOptions {
        extra_toml: refreshing_toml(port, ""),
        ..ServerOptions::default()
    };
    let a = TestServer::start(&dir.path().join("a"), opts(pa));
    let b = server_in(&dir.path().join("b"), "other.org", opts(pb));
    let agent_a = agent_in(&dir.path().join("agent-a"), "example.org", &a, A_NODE, "");
    let agent_b = agent_in(&dir.path().join("agent-b"), "other.org", &b, B_NODE, "");
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let (a_doc, b_doc) = (files.join("a.json"), files.join("b.json"));
    std::fs::write(&a_doc, a.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    std::fs::write(&b_doc, b.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();

    // Malformed input is refused naming the flag; nothing is stored.
    let url = format!("https://127.0.0.1:{pb}/");
    let base = |td: &'static str, url: &str, profile: &'static str| {
        vec![
            "federation".to_string(),
            "create".into(),
            "--trust-domain".into(),
            td.into(),
            "--bundle-endpoint-url".into(),
            url.to_string(),
            "--bundle-endpoint-profile".into(),
            profile.into(),
        ]
    };
    let refused_with = |args: Vec<String>, extra: &[&str], flag: &str| {
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.extend(extra);
        let err = refused(&a, &all);
        assert!(err.contains(flag), "{all:?}: {err}");
    };
    let eid = [
        "--endpoint-spiffe-id",
        "spiffe://other.org/continuity/server",
    ];
    refused_with(
        base(OTHER, "http://127.0.0.1:1/", "https_spiffe"),
        &eid,
        "--bundle-endpoint-url",
    );
    refused_with(
        base(OTHER, "https://:8443/", "https_spiffe"),
        &eid,
        "--bundle-endpoint-url",
    );
    refused_with(
        base(OTHER, &url, "https_spiffe"),
        &[],
        "--endpoint-spiffe-id",
    );
    refused_with(
        base(OTHER, &url, "https_spiffe"),
        &["--endpoint-spiffe-id", "other.org/x"],
        "--endpoint-spiffe-id",
    );
    refused_with(base(OTHER, &url, "smtp"), &eid, "--bundle-endpoint-profile");
    refused_with(
        base("not a td", &url, "https_spiffe"),
        &eid,
        "--trust-domain",
    );
    refused_with(
        base("spiffe://example.org", &url, "https_spiffe"),
        &eid,
        "own trust domain",
    );
    // https_spiffe without a bundle to authenticate the endpoint with.
    refused_with(
        base(OTHER, &url, "https_spiffe"),
        &eid,
        "--trust-domain-bundle-path",
    );
    let garbage = files.join("garbage.json");
    std::fs::write(&garbage, "{\"keys\": 7}").unwrap();
    refused_with(
        base(OTHER, &url, "https_spiffe"),
        &[
            eid[0],
            eid[1],
            "--trust-domain-bundle-path",
            garbage.to_str().unwrap(),
            "--trust-domain-bundle-format",
            "spiffe",
        ],
        "--trust-domain-bundle",
    );
    let listed: serde_json::Value =
        serde_json::from_str(&a.cli_ok(&["federation", "list", "--output", "json"])).unwrap();
    assert_eq!(listed["relationships"], serde_json::json!([]));
    assert!(a.cli(&["bundle", "show", "--id", OTHER]).status.code() != Some(0));

    // Both ways, from each side's bootstrap bundle; no `bundle set`. SPIRE's spellings too.
    let created: serde_json::Value = serde_json::from_str(&create_spiffe_relationship(
        &a,
        "other.org",
        pb,
        b_doc.to_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(created["bundle_endpoint_profile"], "https_spiffe");
    b.cli_ok(&[
        "federation",
        "create",
        "-trustDomain",
        "spiffe://example.org",
        "-bundleEndpointURL",
        &format!("https://127.0.0.1:{pa}/"),
        "-bundleEndpointProfile",
        "https_spiffe",
        "-endpointSpiffeID",
        "spiffe://example.org/continuity/server",
        "-trustDomainBundlePath",
        a_doc.to_str().unwrap(),
        "-trustDomainBundleFormat",
        "spiffe",
    ]);
    let dup = refused(
        &a,
        &{
            let mut v: Vec<String> = base(OTHER, &url, "https_spiffe");
            v.extend(eid.iter().map(|s| s.to_string()));
            v
        }
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert!(dup.contains("exists"), "{dup}");
    let shown: serde_json::Value = serde_json::from_str(&a.cli_ok(&[
        "federation",
        "show",
        "--trust-domain",
        OTHER,
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(shown["bundle_endpoint_url"], url.as_str());
    assert_eq!(
        shown["endpoint_spiffe_id"],
        "spiffe://other.org/continuity/server"
    );

    // A fetch now succeeds over https_spiffe (same sequence as the bootstrap: unchanged).
    let r: serde_json::Value = serde_json::from_str(&a.cli_ok(&[
        "federation",
        "refresh",
        "--id",
        OTHER,
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(r["updated"], false, "{r}");

    let me = format!("unix:uid:{}", continuity_tests::uid());
    let v: serde_json::Value = serde_json::from_str(&a.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/client",
        "--parent-id",
        A_NODE,
        "--selector",
        &me,
        "--federates-with",
        OTHER,
        "--output",
        "json",
    ]))
    .unwrap();
    let client_id = v["id"].as_str().unwrap().to_string();
    b.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://other.org/server",
        "--parent-id",
        B_NODE,
        "--selector",
        &me,
        "--dns-name",
        "server.other.org",
        "--federates-with",
        "spiffe://example.org",
    ]);
    let client_ctx = context_with(&agent_a, "other.org", true).await;
    let server_ctx = context_with(&agent_b, "example.org", true).await;
    let (seen_by_server, seen_by_client) = mtls(&client_ctx, &server_ctx).await;
    assert_eq!(seen_by_server, "spiffe://example.org/client");
    assert_eq!(seen_by_client, "spiffe://other.org/server");

    // A rotation on B reaches A through the refresher alone, then A's workload.
    let before = b.bundle_der().len();
    b.cli_ok(&["authority", "x509", "prepare"]);
    assert_eq!(
        b.bundle_der().len(),
        before + 1,
        "prepare adds a CA to B's bundle"
    );
    holds_bundle_of(&a, OTHER, &b, "B's rotated bundle at A").await;
    let want = b.bundle_der();
    eventually("A's workload holds B's rotated bundle", || {
        let endpoint = agent_a.endpoint();
        let want = want.clone();
        async move {
            let c = spiffe::WorkloadApiClient::connect_to(&endpoint)
                .await
                .ok()?;
            let ctx = c.fetch_x509_context().await.ok()?;
            let got: Vec<Vec<u8>> = ctx
                .bundle_set()
                .get(&td("other.org"))?
                .authorities()
                .iter()
                .map(|c| c.as_ref().to_vec())
                .collect();
            (got == want).then_some(())
        }
    })
    .await;
    // And the other way: a rotation on A reaches B.
    a.cli_ok(&["authority", "x509", "prepare"]);
    holds_bundle_of(&b, "spiffe://example.org", &a, "A's rotated bundle at B").await;
    let audit = a.cli_ok(&["audit", "show", "--output", "json"]);
    for action in ["federation.create", "federation.refresh"] {
        assert!(audit.contains(action), "no {action} in A's audit log");
    }
    a.cli_ok(&["integrity", "verify"]);

    // An endpoint presenting another SPIFFE ID than configured is refused; nothing changes.
    a.cli_ok(&[
        "federation",
        "update",
        "--trust-domain",
        OTHER,
        "--bundle-endpoint-url",
        &url,
        "--bundle-endpoint-profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        "spiffe://other.org/not-the-server",
    ]);
    let held = a.cli_ok(&["bundle", "show", "--id", OTHER]);
    b.cli_ok(&["authority", "x509", "prepare"]);
    let e = refused(&a, &["federation", "refresh", "--id", OTHER]);
    assert!(e.contains("Unavailable") && e.contains(&url), "{e}");
    assert!(e.contains("spiffe://other.org/not-the-server"), "{e}");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        a.cli_ok(&["bundle", "show", "--id", OTHER]),
        held,
        "bundle changed from a refused endpoint"
    );
    let log = std::fs::read_to_string(a.dir.join("server.log")).unwrap_or_default();
    assert!(
        log.contains("refresh failed"),
        "the refused fetch was not logged"
    );

    // `federation delete` ends the federation even while an entry federates with it (named as
    // a warning): the bundle is gone and A's workload drops it.
    let d: serde_json::Value = serde_json::from_str(&a.cli_ok(&[
        "federation",
        "delete",
        "--trust-domain",
        OTHER,
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(d["federating_entries"], serde_json::json!([client_id]));
    assert!(a.cli(&["bundle", "show", "--id", OTHER]).status.code() != Some(0));
    let after = context_with(&agent_a, "other.org", false).await;
    assert!(after.bundle_set().get(&td("example.org")).is_some());
    assert!(
        a.cli_ok(&["audit", "show", "--output", "json"])
            .contains("federation.delete")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_web_relationship_is_refreshed_with_the_configured_web_roots() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &rcgen::Issuer::from_params(&ca_params, &ca_key))
        .unwrap();
    let (cert_file, key_file, ca_file) = (
        dir.path().join("web.pem"),
        dir.path().join("web.key"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert_file, leaf.pem() + &ca.pem()).unwrap();
    std::fs::write(&key_file, leaf_key.serialize_pem()).unwrap();
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let port = continuity_tests::free_port();
    let w = server_in(
        &dir.path().join("w"),
        "web.org",
        ServerOptions {
            extra_toml: format!(
                "[federation.bundle_endpoint]\nbind_address = \"127.0.0.1:{port}\"\nprofile = \"https_web\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nrefresh_hint = \"1s\"\n",
                cert_file.display(),
                key_file.display()
            ),
            ..ServerOptions::default()
        },
    );
    let a = TestServer::start(
        &dir.path().join("a"),
        ServerOptions {
            extra_toml: format!(
                "[federation]\nrefresh_min_interval = \"1s\"\nweb_ca_file = \"{}\"\n",
                ca_file.display()
            ),
            ..ServerOptions::default()
        },
    );
    // No initial bundle: Web PKI authenticates the endpoint.
    a.cli_ok(&[
        "federation",
        "create",
        "--trust-domain",
        "spiffe://web.org",
        "--bundle-endpoint-url",
        &format!("https://localhost:{port}/"),
        "--bundle-endpoint-profile",
        "https_web",
    ]);
    holds_bundle_of(
        &a,
        "spiffe://web.org",
        &w,
        "web.org's bundle over https_web",
    )
    .await;
    w.cli_ok(&["authority", "x509", "prepare"]);
    holds_bundle_of(&a, "spiffe://web.org", &w, "web.org's rotated bundle").await;
    // An https_web profile takes no endpoint SPIFFE ID.
    let e = refused(
        &a,
        &[
            "federation",
            "update",
            "--trust-domain",
            "spiffe://web.org",
            "--bundle-endpoint-url",
            &format!("https://localhost:{port}/"),
            "--bundle-endpoint-profile",
            "https_web",
            "--endpoint-spiffe-id",
            "spiffe://web.org/x",
        ],
    );
    assert!(e.contains("--endpoint-spiffe-id"), "{e}");
}
