//! Adversarial suite, floods and slow peers (issue 10 item 4), against the real server binary:
//! 10,000 idle HTTP/2 streams on one connection (with and without an agent SVID), TLS
//! handshakes that never finish, AttestAgent calls that never send their first message,
//! oversized messages, an agent hammering the signing and Engine APIs, slowloris clients of
//! the health endpoint, and running out of file descriptors. Throughout, a real
//! continuity-agent keeps syncing and getting SVIDs (or a second agent keeps being served).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use continuity_proto::agent::{
    AttestAgentRequest, AttestationData, BatchNewX509svidRequest, FetchBundleRequest,
    NewJwtsvidRequest, NewX509svidParams, RenewAgentRequest, attest_agent_request,
};
use continuity_proto::engine::engine_broker_client::EngineBrokerClient;
use continuity_proto::engine::{BrokerSign, SignRequest};
use continuity_tests::agent::TestAgent;
use continuity_tests::agent_client::{self, attest, key_and_csr};
use continuity_tests::floods::{self, LimitedServer, flood_streams, tls_connect};
use continuity_tests::server::{ServerOptions, TestServer};
use continuity_tests::{fetch_x509, free_port, uid};
use tonic::Code;

const ALIAS: &str = "spiffe://example.org/node/floods";

fn server_with(dir: &std::path::Path, extra: &str) -> TestServer {
    TestServer::start(
        &dir.join("server"),
        ServerOptions {
            extra_toml: extra.into(),
            ..ServerOptions::default()
        },
    )
}

/// A server with `extra` config and a real agent (alias [`ALIAS`]) holding an SVID for
/// `spiffe://example.org/floods/first`.
fn env_with(extra: &str) -> (tempfile::TempDir, TestServer, TestAgent) {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), extra);
    let token = server.token(Some(ALIAS));
    let agent = TestAgent::start(&dir.path().join("agent"), &server, &token);
    server.create_entry(
        "spiffe://example.org/floods/first",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    (dir, server, agent)
}

/// Waits until the agent serves an SVID for `id` to this process; panics after `secs`.
async fn agent_serves(agent: &TestAgent, id: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(r) = fetch_x509(agent).await {
            let ids: HashSet<String> = r.svids.iter().map(|s| s.spiffe_id.clone()).collect();
            if ids.contains(id) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not serve {id} within {secs}s; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A new entry created now reaches the agent, which gets it signed and serves it: sync and
/// signing both work.
async fn agent_keeps_working(server: &TestServer, agent: &TestAgent, name: &str) {
    let id = format!("spiffe://example.org/floods/{name}");
    server.create_entry(&id, ALIAS, &[&format!("unix:uid:{}", uid())]);
    agent_serves(agent, &id, 30).await;
}

/// Streams the server took: up to a GOAWAY's last stream id (the refused ones come after
/// it), or all not refused.
fn accepted(r: &floods::FloodReport) -> usize {
    r.goaway_last
        .map_or(r.opened.saturating_sub(r.refused), |last| {
            (last as usize).div_ceil(2).min(r.opened)
        })
}

/// Floods the server again and again (a new connection each time the last is cut) until
/// dropped; `client` is the agent SVID chain and key to present, if any.
fn keep_flooding(
    server: &TestServer,
    source: &'static str,
    client: Option<(Vec<Vec<u8>>, Vec<u8>)>,
    path: &'static str,
) -> tokio::task::JoinHandle<()> {
    let (addr, bundle) = (server.addr.clone(), server.bundle_der());
    tokio::spawn(async move {
        loop {
            let c = client.as_ref().map(|(ch, k)| (ch.as_slice(), k.as_slice()));
            let tls = tls_connect(source, &addr, bundle.clone(), c).await;
            let f = flood_streams(tls, path, 10_000).await;
            f.wait_until(Duration::from_secs(60), |r| r.closed).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_idle_streams_are_refused_beyond_the_cap_and_the_agent_keeps_working() {
    let (_d, server, agent) = env_with("[agent_api]\nmax_concurrent_streams = 100\n");
    agent_serves(&agent, "spiffe://example.org/floods/first", 30).await;
    let pid = server.pid().unwrap();
    let hostile = attest(&server.addr, server.bundle_der(), &server.token(None))
        .await
        .unwrap();

    const N: usize = 10_000;
    // With a valid agent SVID: unary calls whose request body never comes.
    let with_cert = tls_connect(
        "127.0.0.2",
        &server.addr,
        server.bundle_der(),
        Some((&hostile.chain, &hostile.key)),
    )
    .await;
    let a = flood_streams(
        with_cert,
        "/continuity.agent.v1.AgentAPI/SyncAuthorizedEntries",
        N,
    )
    .await;
    // Without a client certificate (the server accepts those, for attestation): AttestAgent
    // streams that never send their first message.
    let anonymous = tls_connect("127.0.0.3", &server.addr, server.bundle_der(), None).await;
    let b = flood_streams(anonymous, "/continuity.agent.v1.AgentAPI/AttestAgent", N).await;

    let settled = |r: &floods::FloodReport| {
        r.closed || r.goaway_last.is_some() || (r.opened == N && r.refused >= N - 100)
    };
    for (what, f) in [("with an agent SVID", &a), ("without a client cert", &b)] {
        let r = f.wait_until(Duration::from_secs(60), settled).await;
        eprintln!("{what}: {r:?}");
        assert_eq!(
            r.max_concurrent_streams,
            Some(100),
            "{what}: the server must advertise its stream cap: {r:?}"
        );
        assert!(
            r.opened == N || r.closed || r.goaway_last.is_some(),
            "{what}: the flood neither went through nor was cut: {r:?}"
        );
        assert!(
            accepted(&r) <= 100,
            "{what}: the server took {} streams on one connection (cap 100): {r:?}",
            accepted(&r)
        );
    }

    drop((a, b));

    // Throughout: the same floods, again and again on new connections, and 10,000 idle
    // streams the server does let in (100 connections at the cap of 100 each, held until
    // request_timeout). The agent syncs a new entry and gets it signed; the server's memory
    // stays bounded.
    let reflood = [
        keep_flooding(
            &server,
            "127.0.0.2",
            Some((hostile.chain.clone(), hostile.key.clone())),
            "/continuity.agent.v1.AgentAPI/SyncAuthorizedEntries",
        ),
        keep_flooding(
            &server,
            "127.0.0.3",
            None,
            "/continuity.agent.v1.AgentAPI/AttestAgent",
        ),
    ];
    let mut held = Vec::new();
    for i in 0..100 {
        let client = (i % 2 == 0).then_some((hostile.chain.as_slice(), hostile.key.as_slice()));
        let tls = tls_connect("127.0.0.4", &server.addr, server.bundle_der(), client).await;
        let path = if client.is_some() {
            "/continuity.agent.v1.AgentAPI/NewJWTSVID"
        } else {
            "/continuity.agent.v1.AgentAPI/AttestAgent"
        };
        held.push(flood_streams(tls, path, 100).await);
    }
    for f in &held {
        let r = f
            .wait_until(Duration::from_secs(30), |r| r.opened == 100)
            .await;
        assert!(
            r.opened == 100 && r.refused == 0 && !r.closed,
            "streams within the cap are held: {r:?}"
        );
    }
    agent_keeps_working(&server, &agent, "during-stream-flood").await;
    let peak = floods::peak_rss_kib(pid);
    eprintln!(
        "server RSS peak {peak} KiB, now {} KiB",
        floods::rss_kib(pid)
    );
    assert!(
        peak < 256 * 1024,
        "server RSS peaked at {peak} KiB (limit 256 MiB)"
    );
    for f in &held {
        assert!(!f.now().closed, "the held streams lasted the whole check");
    }
    for r in &reflood {
        r.abort();
    }
    drop(held);
    agent_keeps_working(&server, &agent, "after-stream-flood").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unfinished_handshakes_and_silent_attestations_are_cut_off() {
    let (_d, server, agent) = env_with(
        "[agent_api]\nmax_connections_per_ip = 20\nhandshake_timeout = \"2s\"\nfirst_message_timeout = \"2s\"\n",
    );
    agent_serves(&agent, "spiffe://example.org/floods/first", 30).await;

    // 40 connections from one address that never say a word: 20 are over the per-IP cap and
    // closed at once, the other 20 when the handshake deadline passes.
    let start = Instant::now();
    let mut waiting = Vec::new();
    for _ in 0..40 {
        let mut tcp = floods::tcp_from("127.0.0.2", &server.addr).await.unwrap();
        waiting.push(tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 64];
            let _ = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut buf)).await;
            start.elapsed()
        }));
    }
    // Meanwhile a new agent connection from another address is served at once.
    let t0 = Instant::now();
    let other = attest(&server.addr, server.bundle_der(), &server.token(None))
        .await
        .expect("a well-behaved agent attests during the handshake flood");
    assert!(t0.elapsed() < Duration::from_secs(2));
    let mut closed = Vec::new();
    for w in waiting {
        closed.push(w.await.unwrap());
    }
    closed.sort();
    assert!(
        closed[19] < Duration::from_millis(1500),
        "connections over max_connections_per_ip must be closed at once: {closed:?}"
    );
    assert!(
        closed[20] >= Duration::from_millis(1500) && closed[39] < Duration::from_secs(8),
        "connections that never finish TLS must be closed at handshake_timeout (2s): {closed:?}"
    );
    agent_keeps_working(&server, &agent, "after-handshake-flood").await;

    // AttestAgent without its first message: refused at first_message_timeout, not held.
    let mut anon = agent_client::anonymous(&server.addr, server.bundle_der()).await;
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        anon.attest_agent(futures_util::stream::pending::<AttestAgentRequest>()),
    )
    .await
    .expect("AttestAgent must not wait forever for its first message");
    let e = r.expect_err("a silent AttestAgent is refused");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        e.message().contains("agent_api.first_message_timeout"),
        "{e:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(8));
    // The other agent, and the real one, are served.
    let mut c = other.client.clone();
    c.fetch_bundle(FetchBundleRequest {}).await.unwrap();
    agent_keeps_working(&server, &agent, "after-silent-attestation").await;
}

/// A request over a service's decoding limit: tonic refuses it before any handler runs, with
/// OutOfRange (its code for this, as on the agent's Workload API) naming the limit.
fn too_large(e: &tonic::Status) {
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("too large"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_messages_are_refused_and_the_server_is_fine() {
    let (_d, server, agent) = env_with("");
    agent_serves(&agent, "spiffe://example.org/floods/first", 30).await;
    let hostile = attest(&server.addr, server.bundle_der(), &server.token(None))
        .await
        .unwrap();
    let big = vec![0x30u8; 3 << 20];

    // A 3 MiB batch: over the ~2 MiB a full batch of 500 CSRs needs.
    let mut c = hostile.client.clone();
    let e = c
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: "x".into(),
                csr: big.clone(),
            }],
        })
        .await
        .expect_err("a 3 MiB request is refused as a whole");
    too_large(&e);

    // A 3 MiB first AttestAgent message from an anonymous client.
    let mut anon = agent_client::anonymous(&server.addr, server.bundle_der()).await;
    let (_, csr) = key_and_csr();
    let e = anon
        .attest_agent(tokio_stream::once(AttestAgentRequest {
            step: Some(attest_agent_request::Step::Params(
                attest_agent_request::Params {
                    data: Some(AttestationData {
                        r#type: "join_token".into(),
                        payload: big.clone(),
                    }),
                    csr,
                },
            )),
        }))
        .await
        .expect_err("a 3 MiB attestation is refused");
    too_large(&e);

    // 5 MiB to the Engine broker.
    let ch = agent_client::channel_for(
        &server.addr,
        server.bundle_der(),
        &hostile.chain,
        &hostile.key,
    )
    .await;
    let e = EngineBrokerClient::new(ch)
        .sign(BrokerSign {
            entry_id: "x".into(),
            request: Some(SignRequest {
                key: "k".into(),
                message: vec![0u8; 5 << 20],
                ..Default::default()
            }),
            workload: None,
        })
        .await
        .expect_err("a 5 MiB broker call is refused");
    too_large(&e);

    // A full-size legitimate batch still fits: 500 real CSRs (refused per entry, as they are
    // for entries this agent does not host, but decoded and answered).
    let params = (0..500)
        .map(|i| NewX509svidParams {
            entry_id: format!("entry-{i}"),
            csr: key_and_csr().1,
        })
        .collect();
    let r = c
        .batch_new_x509svid(BatchNewX509svidRequest { params })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 500);
    c.fetch_bundle(FetchBundleRequest {}).await.unwrap();
    agent_keeps_working(&server, &agent, "after-oversized").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hammering_agent_is_rate_limited_and_another_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let server = server_with(
        dir.path(),
        &format!(
            "[agent_api]\nsvids_per_second = 0.1\nsvid_burst = 5\nengine_calls_per_second = 0.1\nengine_call_burst = 5\n[metrics]\nbind_address = \"127.0.0.1:{metrics_port}\"\n"
        ),
    );
    let selector = format!("unix:uid:{}", uid());
    let node = |n: &str| format!("spiffe://example.org/node/{n}");
    let mut agents = Vec::new();
    for n in ["hostile", "other"] {
        let a = attest(
            &server.addr,
            server.bundle_der(),
            &server.token(Some(&node(n))),
        )
        .await
        .unwrap();
        let entry = server.create_entry(
            &format!("spiffe://example.org/rate/{n}"),
            &node(n),
            &[&selector],
        );
        agents.push((a, entry));
    }
    let (hostile, h_entry) = &agents[0];
    let (other, o_entry) = &agents[1];
    let jwt = |entry: &str| NewJwtsvidRequest {
        entry_id: entry.into(),
        audience: vec!["aud".into()],
    };

    let mut h = hostile.client.clone();
    let mut codes = Vec::new();
    for _ in 0..10 {
        codes.push(match h.new_jwtsvid(jwt(h_entry)).await {
            Ok(_) => Code::Ok,
            Err(e) => {
                if e.code() == Code::ResourceExhausted {
                    assert!(e.message().contains("agent_api.svids_per_second"), "{e:?}");
                }
                e.code()
            }
        });
    }
    assert_eq!(&codes[..5], &[Code::Ok; 5], "{codes:?}");
    assert_eq!(&codes[5..], &[Code::ResourceExhausted; 5], "{codes:?}");
    // Each CSR of a batch counts, and so does a renewal.
    let e = h
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: h_entry.clone(),
                csr: key_and_csr().1,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = h
        .renew_agent(RenewAgentRequest {
            csr: key_and_csr().1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // A batch larger than the burst can never pass, and says so.
    let e = h
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: (0..6)
                .map(|_| NewX509svidParams {
                    entry_id: h_entry.clone(),
                    csr: key_and_csr().1,
                })
                .collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("svid_burst"), "{e:?}");

    // The other agent is unaffected.
    let mut o = other.client.clone();
    for _ in 0..3 {
        o.new_jwtsvid(jwt(o_entry)).await.unwrap();
    }
    let r = o
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: o_entry.clone(),
                csr: key_and_csr().1,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.results[0].svid.is_some(), "{:?}", r.results[0].status);

    // Engine calls: the hostile agent's are refused past the burst (before authorization),
    // the other agent still gets its (authorization) answer.
    let broker = |a: &agent_client::Agent| {
        let (addr, bundle, chain, key) = (
            server.addr.clone(),
            server.bundle_der(),
            a.chain.clone(),
            a.key.clone(),
        );
        async move {
            EngineBrokerClient::new(agent_client::channel_for(&addr, bundle, &chain, &key).await)
        }
    };
    let sign = || BrokerSign {
        entry_id: "no-such-entry".into(),
        request: Some(SignRequest {
            key: "k".into(),
            message: b"m".to_vec(),
            ..Default::default()
        }),
        workload: None,
    };
    let mut hb = broker(hostile).await;
    let mut codes = Vec::new();
    for _ in 0..8 {
        let e = hb.sign(sign()).await.unwrap_err();
        if e.code() == Code::ResourceExhausted {
            assert!(
                e.message().contains("agent_api.engine_calls_per_second"),
                "{e:?}"
            );
        }
        codes.push(e.code());
    }
    assert_eq!(&codes[..5], &[Code::PermissionDenied; 5], "{codes:?}");
    assert_eq!(&codes[5..], &[Code::ResourceExhausted; 3], "{codes:?}");
    let mut ob = broker(other).await;
    let e = ob.sign(sign()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    let m = http_get(metrics_port, "/metrics").unwrap();
    assert!(
        m.contains("continuity_server_rate_limited_total{limit=\"svids_per_second\"} 8"),
        "{m}"
    );
    assert!(
        m.contains("continuity_server_rate_limited_total{limit=\"engine_calls_per_second\"} 3"),
        "{m}"
    );
}

/// One GET over a fresh connection; the body of a 200, or the status line.
fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(out),
    }
}

/// Opens a connection to the HTTP endpoint that sends half a request head and then nothing;
/// the task returns when the server closes it.
fn slowloris(port: u16, start: Instant) -> tokio::task::JoinHandle<Duration> {
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let _ = s.write_all(b"GET /live HTTP/1.1\r\nhost: x\r\n").await;
        let mut buf = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await;
        start.elapsed()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_endpoint_survives_slowloris_beyond_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = server_with(
        dir.path(),
        &format!("[health]\nbind_address = \"127.0.0.1:{port}\"\n"),
    );
    assert_eq!(http_get(port, "/live").unwrap(), "live\n");
    let start = Instant::now();
    let mut lorises = Vec::new();
    for _ in 0..100 {
        lorises.push(slowloris(port, start));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Real probes are served during the flood...
    for _ in 0..3 {
        let r = tokio::task::spawn_blocking(move || http_get(port, "/live"))
            .await
            .unwrap();
        assert_eq!(r.unwrap(), "live\n");
    }
    let mut closed = Vec::new();
    for l in lorises {
        closed.push(l.await.unwrap());
    }
    closed.sort();
    // ... because the oldest slow connections beyond the cap (64) were closed to make room,
    // at once; the rest at the 5 s head deadline.
    assert!(
        closed[35] < Duration::from_millis(1500),
        "connections beyond the cap must be closed at once: {closed:?}"
    );
    assert!(
        closed[99] < Duration::from_secs(9),
        "slow heads must be cut at the head deadline: {closed:?}"
    );
    assert_eq!(http_get(port, "/live").unwrap(), "live\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_file_descriptors_the_server_backs_off_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = TestServer::configure(
        &dir.path().join("server"),
        ServerOptions {
            extra_toml: format!("[health]\nbind_address = \"127.0.0.1:{port}\"\n"),
            ..ServerOptions::default()
        },
    );
    let limit = 96;
    let running = LimitedServer::start(&server, limit);
    let pid = running.pid();
    assert_eq!(http_get(port, "/live").unwrap(), "live\n");
    let base = floods::open_fds(pid);
    assert!(
        base + 40 < limit as usize,
        "the server uses {base} fds at rest"
    );

    // Far more connections than the server has descriptors left: it runs out (EMFILE).
    // TLS connections that never handshake hold descriptors on the agent port...
    let mut conns = Vec::new();
    for _ in 0..100 {
        if let Ok(c) = std::net::TcpStream::connect(&server.addr) {
            conns.push(c);
        }
    }
    // ... and slow HTTP heads on the health port.
    for _ in 0..300 {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => {
                let mut c = c;
                let _ = c.write_all(b"GET /live HTTP/1.1\r\n");
                conns.push(c);
            }
            Err(_) => break,
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("Too many open files") {
        assert!(
            Instant::now() < deadline,
            "the flood should have used up the server's descriptors ({} of {limit} open)",
            floods::open_fds(pid)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t_flooded = Instant::now();
    // It does not spin on the failing accept.
    let hz = 100.0; // USER_HZ on Linux
    let before = floods::cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = (floods::cpu_ticks(pid) - before) as f64 / hz;
    eprintln!("CPU used out of descriptors: {used:.2}s in 2s");
    assert!(
        used < 0.5,
        "the server used {used:.2}s of CPU in 2s while out of descriptors (spinning)"
    );
    // And recovers once the connections go.
    drop(conns);
    eprintln!(
        "out of fds for {:?} before the flood ended",
        t_flooded.elapsed()
    );
    let t_drop = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if http_get(port, "/live").is_ok_and(|b| b == "live\n") {
            break;
        }
        assert!(Instant::now() < deadline, "health endpoint did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("recovered {:?} after the flood ended", t_drop.elapsed());
    assert!(server.cli(&["healthcheck"]).status.success());
    let log = server.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("accept failed") && l.contains("HTTP"))
        .count();
    assert!(
        (1..=3).contains(&warnings),
        "accept failures are logged once per burst, not per attempt ({warnings}):\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_without_a_client_certificate_are_capped_and_short_lived() {
    // Lifetime of a cert-less connection: handshake + first message + request = 1 + 1 + 2 s;
    // they may hold a quarter of max_connections (10 of 40).
    let (_d, server, agent) = env_with(
        "[agent_api]\nmax_connections = 40\nmax_connections_per_ip = 40\nhandshake_timeout = \"1s\"\nfirst_message_timeout = \"1s\"\nrequest_timeout = \"2s\"\n",
    );
    agent_serves(&agent, "spiffe://example.org/floods/first", 30).await;
    let good = attest(&server.addr, server.bundle_der(), &server.token(None))
        .await
        .unwrap();
    // Let the attestation's own cert-less connection close before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 15 cert-less connections that finish TLS and the HTTP/2 preface, then idle (a peer that
    // answers PINGs would look the same: keepalive never closes it).
    let start = Instant::now();
    let mut held = Vec::new();
    for _ in 0..15 {
        let mut tls = tls_connect("127.0.0.2", &server.addr, server.bundle_der(), None).await;
        held.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = tls.write_all(floods::PREFACE).await;
            let _ = tls.write_all(&floods::frame(0x4, 0, 0, &[])).await;
            let mut buf = [0u8; 4096];
            let read_to_end = async {
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(30), read_to_end).await;
            start.elapsed()
        }));
    }
    // While the anonymous share is full, an attested agent still gets a new connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut c =
        agent_client::authenticated(&server.addr, server.bundle_der(), &good.chain, &good.key)
            .await;
    c.fetch_bundle(FetchBundleRequest {})
        .await
        .expect("an attested agent is served while cert-less connections hold their share");

    let mut closed = Vec::new();
    for h in held {
        closed.push(h.await.unwrap());
    }
    closed.sort();
    assert!(
        closed[4] < Duration::from_millis(1500),
        "cert-less connections beyond a quarter of max_connections must be closed at once: {closed:?}"
    );
    assert!(
        closed[5] >= Duration::from_secs(3) && closed[14] < Duration::from_secs(10),
        "cert-less connections must be closed at their lifetime (4 s): {closed:?}"
    );
    agent_keeps_working(&server, &agent, "after-anonymous-flood").await;
}
