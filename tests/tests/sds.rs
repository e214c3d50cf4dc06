//! Envoy SDS v3 on a real agent's socket, spoken by a client built from Envoy's own protos
//! (`envoy-types`), checking exactly what Envoy would receive for each resource name.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use continuity_common::x509::pem_encode;
use continuity_tests::{Env, fetch_x509, uid};
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::config::core::v3::{DataSource, Node};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const ALIAS: &str = "spiffe://example.org/node/sds";
const TD: &str = "spiffe://example.org";
const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const VALIDATOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";

/// An SDS client as Envoy connects: over the socket, `:authority` its cluster name, no
/// Workload API security header.
async fn sds_client(e: &Env) -> SecretDiscoveryServiceClient<Channel> {
    let channel = continuity_common::grpc::uds_channel(&e.agent.socket)
        .await
        .unwrap();
    SecretDiscoveryServiceClient::with_origin(channel, "http://spire_agent".parse().unwrap())
}

/// An env with one entry for this uid (`ttl`: its X509-SVID TTL in seconds, if short), once
/// the agent serves it. Returns the SVID's chain and key PEM and the bundle PEM.
async fn env_with_entry(spiffe_id: &str, ttl: Option<&str>) -> (Env, String, String, String) {
    let e = continuity_tests::env(ALIAS);
    let me = format!("unix:uid:{}", uid());
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--parent-id",
        ALIAS,
        "--selector",
        &me,
    ];
    if let Some(t) = ttl {
        args.extend(["--x509-svid-ttl", t]);
    }
    e.server.cli_ok(&args);
    let deadline = Instant::now() + Duration::from_secs(20);
    let svid = loop {
        if let Ok(r) = fetch_x509(&e.agent).await {
            break r.svids[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the agent never served the entry"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let chain = pem_chain(&svid.x509_svid);
    let key = pem_encode("PRIVATE KEY", &svid.x509_svid_key);
    let bundle = pem_chain(&svid.bundle);
    (e, chain, key, bundle)
}

fn pem_chain(concat: &[u8]) -> String {
    let mut out = String::new();
    let mut rest = concat;
    while !rest.is_empty() {
        let (_, _, tail) = continuity_common::der::read_tlv(rest).unwrap();
        out.push_str(&pem_encode("CERTIFICATE", &rest[..rest.len() - tail.len()]));
        rest = tail;
    }
    out
}

fn request(names: &[&str], node: Option<Node>) -> DiscoveryRequest {
    DiscoveryRequest {
        node,
        resource_names: names.iter().map(ToString::to_string).collect(),
        type_url: SECRET_TYPE.to_string(),
        ..Default::default()
    }
}

/// An Envoy node whose metadata turns the SPIFFE validator off (SPIRE's key).
fn node_without_spiffe_validator() -> Node {
    let fields = BTreeMap::from([(
        "disable_spiffe_cert_validation".to_string(),
        Value {
            kind: Some(value::Kind::BoolValue(true)),
        },
    )]);
    Node {
        id: "envoy-test".into(),
        cluster: "test".into(),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    }
}

fn decode(any: &Any) -> Secret {
    assert_eq!(any.type_url, SECRET_TYPE);
    Secret::decode(any.value.as_slice()).unwrap()
}

fn by_name(resources: &[Any]) -> BTreeMap<String, Secret> {
    resources
        .iter()
        .map(decode)
        .map(|s| (s.name.clone(), s))
        .collect()
}

fn inline(d: Option<&DataSource>) -> String {
    match d.and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

fn tls(s: &Secret) -> &TlsCertificate {
    match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => t,
        other => panic!("{}: expected a TlsCertificate, got {other:?}", s.name),
    }
}

fn validation(s: &Secret) -> &CertificateValidationContext {
    match &s.r#type {
        Some(secret::Type::ValidationContext(v)) => v,
        other => panic!("{}: expected a validation context, got {other:?}", s.name),
    }
}

/// The trust domains (name → bundle PEM) of a context's SPIFFE validator config.
fn spiffe_trust_domains(s: &Secret) -> Vec<(String, String)> {
    let v = validation(s);
    assert!(
        v.trusted_ca.is_none(),
        "{}: trusted_ca beside the SPIFFE validator",
        s.name
    );
    let ext = v
        .custom_validator_config
        .as_ref()
        .unwrap_or_else(|| panic!("{}: no custom validator config", s.name));
    assert_eq!(ext.name, "envoy.tls.cert_validator.spiffe");
    let any = ext.typed_config.as_ref().unwrap();
    assert_eq!(any.type_url, VALIDATOR_TYPE);
    let cfg = SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
    cfg.trust_domains
        .iter()
        .map(|t| (t.name.clone(), inline(t.trust_bundle.as_ref())))
        .collect()
}

/// Opens a StreamSecrets call; requests go in through the returned sender.
async fn open_stream(
    c: &mut SecretDiscoveryServiceClient<Channel>,
) -> (
    mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
) {
    let (tx, rx) = mpsc::channel(8);
    let stream = c
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

async fn next<T>(s: &mut tonic::Streaming<T>, secs: u64, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(secs), s.message())
        .await
        .unwrap_or_else(|_| panic!("no SDS response within {secs}s: {what}"))
        .unwrap()
        .unwrap_or_else(|| panic!("SDS stream ended: {what}"))
}

/// Asserts that nothing arrives on `s` for `secs` seconds.
async fn quiet<T: std::fmt::Debug>(s: &mut tonic::Streaming<T>, secs: u64, what: &str) {
    if let Ok(m) = tokio::time::timeout(Duration::from_secs(secs), s.message()).await {
        panic!("{what}: the agent sent {m:?}");
    }
}

#[tokio::test]
async fn fetch_answers_each_name_as_envoy_expects() {
    let id = "spiffe://example.org/envoy";
    let (e, chain, key, bundle) = env_with_entry(id, None).await;
    let mut c = sds_client(&e).await;
    let names = ["default", "ROOTCA", "ALL", TD, id];
    let resp = c
        .fetch_secrets(request(&names, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.version_info, "", "a fetch is not versioned");
    assert_eq!(resp.type_url, SECRET_TYPE);
    let got = by_name(&resp.resources);
    let mut sorted = names.to_vec();
    sorted.sort_unstable();
    assert_eq!(got.keys().collect::<Vec<_>>(), sorted);
    for name in ["default", id] {
        let t = tls(&got[name]);
        assert_eq!(inline(t.certificate_chain.as_ref()), chain, "{name}: chain");
        assert_eq!(inline(t.private_key.as_ref()), key, "{name}: key");
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    }
    let local = vec![("example.org".to_string(), bundle.clone())];
    for name in ["ROOTCA", "ALL", TD] {
        assert_eq!(spiffe_trust_domains(&got[name]), local, "{name}");
    }

    // With the SPIFFE validator off, a bundle is a plain trusted_ca (and ALL is refused).
    let resp = c
        .fetch_secrets(request(
            &["ROOTCA", TD],
            Some(node_without_spiffe_validator()),
        ))
        .await
        .unwrap()
        .into_inner();
    let got = by_name(&resp.resources);
    for name in ["ROOTCA", TD] {
        let v = validation(&got[name]);
        assert_eq!(inline(v.trusted_ca.as_ref()), bundle, "{name}: trusted_ca");
        assert!(v.custom_validator_config.is_none());
    }
    let err = c
        .fetch_secrets(request(&["ALL"], Some(node_without_spiffe_validator())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err}");

    // No names: every bundle by trust domain ID and every SVID by SPIFFE ID (as SPIRE).
    let resp = c
        .fetch_secrets(request(&[], None))
        .await
        .unwrap()
        .into_inner();
    let got = by_name(&resp.resources);
    assert_eq!(got.keys().collect::<Vec<_>>(), [TD, id]);

    // A name this workload has no resource for: InvalidArgument naming it.
    let other = "spiffe://example.org/not-mine";
    let err = c
        .fetch_secrets(request(&["default", other], None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains(other), "{err}");
    // Another resource type is refused.
    let mut wrong = request(&["default"], None);
    wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
    let err = c.fetch_secrets(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

#[tokio::test]
async fn fetch_without_an_entry_serves_bundles_but_no_svid() {
    let e = continuity_tests::env(ALIAS);
    let mut c = sds_client(&e).await;
    // The agent serves its bundle once it has synced; no entry names this uid.
    let deadline = Instant::now() + Duration::from_secs(20);
    let resp = loop {
        match c.fetch_secrets(request(&["ROOTCA"], None)).await {
            Ok(r) => break r.into_inner(),
            Err(err) => assert!(Instant::now() < deadline, "ROOTCA never served: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let bundle: String = e
        .server
        .bundle_der()
        .iter()
        .map(|c| pem_encode("CERTIFICATE", c))
        .collect();
    let got = by_name(&resp.resources);
    assert_eq!(
        spiffe_trust_domains(&got["ROOTCA"]),
        [("example.org".to_string(), bundle)]
    );
    let err = c
        .fetch_secrets(request(&["default"], None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

#[tokio::test]
async fn stream_pushes_a_new_version_on_rotation() {
    let id = "spiffe://example.org/short";
    let (e, _, _, bundle) = env_with_entry(id, Some("4")).await;
    let mut c = sds_client(&e).await;
    let (tx, mut s) = open_stream(&mut c).await;
    tx.send(request(&["default", "ROOTCA"], None))
        .await
        .unwrap();
    let first = next(&mut s, 10, "first response").await;
    assert!(!first.version_info.is_empty() && !first.nonce.is_empty());
    let got = by_name(&first.resources);
    let mut chain = inline(tls(&got["default"]).certificate_chain.as_ref());
    assert_eq!(
        spiffe_trust_domains(&got["ROOTCA"]),
        [("example.org".to_string(), bundle.clone())]
    );
    let (mut version, mut nonce) = (first.version_info, first.nonce);
    // ACK each response; every push carries a new version, a new nonce and a new SVID.
    let mut rotations = 0;
    while rotations < 2 {
        let mut ack = request(&["default", "ROOTCA"], None);
        ack.version_info = version.clone();
        ack.response_nonce = nonce.clone();
        tx.send(ack).await.unwrap();
        let push = next(&mut s, 15, "a push after rotation").await;
        assert_ne!(push.version_info, version, "a push reuses its version");
        assert_ne!(push.nonce, nonce);
        let got = by_name(&push.resources);
        assert_eq!(got.len(), 2, "the push holds both requested names");
        let new_chain = inline(tls(&got["default"]).certificate_chain.as_ref());
        assert_ne!(new_chain, chain, "a push without a new SVID");
        (version, nonce, chain) = (push.version_info, push.nonce, new_chain);
        rotations += 1;
    }
}

#[tokio::test]
async fn nack_is_logged_once_and_not_answered_and_ack_sends_nothing() {
    let id = "spiffe://example.org/nack";
    let (e, chain, _, _) = env_with_entry(id, None).await;
    let mut c = sds_client(&e).await;
    let (tx, mut s) = open_stream(&mut c).await;
    tx.send(request(&[id], None)).await.unwrap();
    let first = next(&mut s, 10, "first response").await;
    assert_eq!(
        inline(
            tls(&by_name(&first.resources)[id])
                .certificate_chain
                .as_ref()
        ),
        chain
    );
    // A NACK: error_detail set, the previous (none) version, the nonce answered.
    let marker = "sds-test: certificate rejected by the proxy";
    let mut nack = request(&[id], None);
    nack.response_nonce = first.nonce.clone();
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: marker.into(),
        details: vec![],
    });
    // Sent twice (a proxy retrying): still logged once, and never answered.
    tx.send(nack.clone()).await.unwrap();
    tx.send(nack).await.unwrap();
    quiet(&mut s, 3, "after a NACK").await;
    // An ACK of the current version sends nothing either.
    let mut ack = request(&[id], None);
    ack.version_info = first.version_info.clone();
    ack.response_nonce = first.nonce.clone();
    tx.send(ack).await.unwrap();
    quiet(&mut s, 2, "after an ACK").await;
    let log = e.agent.log();
    assert_eq!(
        log.matches(marker).count(),
        1,
        "the NACK is logged exactly once:\n{log}"
    );
    assert!(log.contains("NACK"), "{log}");
    // A request naming new resources is answered at once on the same stream.
    let mut more = request(&[id, "ROOTCA"], None);
    more.version_info = first.version_info.clone();
    more.response_nonce = first.nonce.clone();
    tx.send(more).await.unwrap();
    let resp = next(&mut s, 10, "new names").await;
    assert_eq!(by_name(&resp.resources).len(), 2);
    assert_eq!(
        resp.version_info, first.version_info,
        "nothing changed: same version"
    );
    assert_ne!(resp.nonce, first.nonce);
}

#[tokio::test]
async fn delta_sends_what_changed_and_removes_what_is_absent() {
    let id = "spiffe://example.org/delta";
    let (e, chain, key, bundle) = env_with_entry(id, None).await;
    let mut c = sds_client(&e).await;
    let (tx, rx) = mpsc::channel(8);
    let mut s = c
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let sub = |names: &[&str], nonce: &str| DeltaDiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        resource_names_subscribe: names.iter().map(ToString::to_string).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    tx.send(sub(&["default", "ROOTCA"], "")).await.unwrap();
    let first: DeltaDiscoveryResponse = next(&mut s, 10, "first delta").await;
    assert!(!first.nonce.is_empty());
    let got: BTreeMap<String, (String, Secret)> = first
        .resources
        .iter()
        .map(|r| {
            assert!(!r.version.is_empty(), "{}: no version", r.name);
            let s = decode(r.resource.as_ref().unwrap());
            assert_eq!(s.name, r.name);
            (r.name.clone(), (r.version.clone(), s))
        })
        .collect();
    assert_eq!(got.keys().collect::<Vec<_>>(), ["ROOTCA", "default"]);
    let t = tls(&got["default"].1);
    assert_eq!(inline(t.certificate_chain.as_ref()), chain);
    assert_eq!(inline(t.private_key.as_ref()), key);
    assert_eq!(
        spiffe_trust_domains(&got["ROOTCA"].1),
        [("example.org".to_string(), bundle)]
    );
    // The ACK changes no subscription: nothing is sent.
    tx.send(sub(&[], &first.nonce)).await.unwrap();
    quiet(&mut s, 2, "after a delta ACK").await;
    // Subscribing to a name this workload has nothing for: it comes back as removed, and the
    // resources already held are not resent.
    let missing = "spiffe://example.org/not-mine";
    tx.send(sub(&[missing, TD], &first.nonce)).await.unwrap();
    let resp = next(&mut s, 10, "subscribe to more").await;
    assert_eq!(resp.removed_resources, [missing]);
    let names: Vec<_> = resp.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, [TD]);
    // A NACK is not answered.
    let mut nack = sub(&[], &resp.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "delta rejected".into(),
        details: vec![],
    });
    tx.send(nack).await.unwrap();
    quiet(&mut s, 2, "after a delta NACK").await;
    // A client resuming with the versions it holds gets nothing it already has.
    let (tx2, rx2) = mpsc::channel(8);
    let mut s2 = c
        .delta_secrets(ReceiverStream::new(rx2))
        .await
        .unwrap()
        .into_inner();
    let mut resume = sub(&["default", "ROOTCA"], "");
    resume.initial_resource_versions = got
        .iter()
        .map(|(n, (v, _))| (n.clone(), v.clone()))
        .collect();
    tx2.send(resume).await.unwrap();
    quiet(&mut s2, 2, "a resumed delta stream holding every version").await;
}

/// Helper run as another uid by the test below: prints the names FetchSecrets returns for
/// `HELPER_NAMES` (comma-separated; empty: everything), or the error code.
#[test]
#[ignore = "helper: run as another uid by sds_callers_are_attested_like_workload_api_callers"]
fn sds_fetch_as_other_uid() {
    let socket = std::env::var("HELPER_SOCKET").unwrap();
    let names = std::env::var("HELPER_NAMES").unwrap();
    let names: Vec<&str> = names.split(',').filter(|n| !n.is_empty()).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = continuity_common::grpc::uds_channel(std::path::Path::new(&socket))
            .await
            .unwrap();
        let mut c =
            SecretDiscoveryServiceClient::with_origin(ch, "http://spire_agent".parse().unwrap());
        match c.fetch_secrets(request(&names, None)).await {
            Ok(r) => {
                let got = by_name(&r.into_inner().resources);
                println!(
                    "NAMES {}",
                    got.keys().cloned().collect::<Vec<_>>().join(",")
                );
            }
            Err(e) => println!("ERR {:?}", e.code()),
        }
    });
}

fn sds_fetch_as(uid: u32, socket: &std::path::Path, names: &str) -> String {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sds_fetch_as_other_uid",
            "--ignored",
            "--nocapture",
        ])
        .env("HELPER_SOCKET", socket)
        .env("HELPER_NAMES", names)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    stdout
        .lines()
        .find(|l| l.starts_with("NAMES ") || l.starts_with("ERR "))
        .unwrap_or_else(|| {
            panic!(
                "helper printed nothing: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string()
}

#[tokio::test]
async fn sds_callers_are_attested_like_workload_api_callers() {
    assert_eq!(
        uid(),
        0,
        "this test needs root to run workloads as other uids (CI runs as root)"
    );
    let mine = "spiffe://example.org/sds-root";
    let (e, _, _, _) = env_with_entry(mine, None).await;
    let theirs = "spiffe://example.org/sds-1601";
    e.server.create_entry(theirs, ALIAS, &["unix:uid:1601"]);
    let socket = e.agent.socket.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = sds_fetch_as(1601, &socket, "");
        if got == format!("NAMES {TD},{theirs}") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "uid 1601 never got its SVID: {got}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Another workload's SVID is not served to it, by name or as its default.
    assert_eq!(sds_fetch_as(1601, &socket, mine), "ERR InvalidArgument");
    assert_eq!(
        sds_fetch_as(1601, &socket, "default"),
        "NAMES default",
        "its default is its own SVID"
    );
    // A uid without entries sees the bundle only.
    assert_eq!(sds_fetch_as(1603, &socket, ""), format!("NAMES {TD}"));
    assert_eq!(
        sds_fetch_as(1603, &socket, "default"),
        "ERR InvalidArgument"
    );
}
