#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]
//! Several servers, one truth: three real `continuity-server` processes on ONE datastore
//! (a shared SQLite file here; the datastore is a URL parameter) and one disk key directory.
//! What is written through one server is what the others serve, within the feed's poll.

use std::time::Duration;

use continuity_proto::agent::SyncAuthorizedEntriesRequest;
use continuity_proto::agent::{BatchNewX509svidRequest, NewX509svidParams};
use continuity_tests::agent::TestAgent;
use continuity_tests::agent_client::{self, key_and_csr};
use continuity_tests::cluster::{Cluster, ClusterOptions, within, within_async};
use continuity_tests::uid;

const ALIAS: &str = "spiffe://example.org/node/cluster";

/// Within this, a change made through one server shows through the others (the brief's
/// bound; the feed polls every 500 ms).
const FEED: Duration = Duration::from_secs(2);

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn ders(pem: &str) -> Vec<Vec<u8>> {
    continuity_common::x509::pem_decode_all("CERTIFICATE", pem).unwrap()
}

/// Removes every field named `name` from `v`, at any depth.
fn strip(v: &mut serde_json::Value, name: &str) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove(name);
            m.values_mut().for_each(|x| strip(x, name));
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| strip(x, name)),
        _ => {}
    }
}

/// Whether the leaf `der` was signed by one of the CA certificates `bundle`.
fn verifies(der: &[u8], bundle: &[Vec<u8>]) -> bool {
    let (_, leaf) = x509_parser::parse_x509_certificate(der).unwrap();
    bundle.iter().any(|ca| {
        let (_, ca) = x509_parser::parse_x509_certificate(ca).unwrap();
        leaf.verify_signature(Some(ca.public_key())).is_ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_and_bans_made_through_one_server_hold_on_every_server() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::launch(
        dir.path(),
        3,
        &ClusterOptions::on(&continuity_tests::postgres::database()),
    );
    let (a, b) = (c.server(0), c.server(1));
    // The bundle is one and the same from every server.
    let bundles = c.bundles();
    assert!(bundles.iter().all(|x| *x == bundles[0]), "{bundles:?}");
    let bundle = ders(&bundles[0]);
    // A token made through A attests through B; the agent lives on B.
    let token = a.token(Some(ALIAS));
    let agent = agent_client::attest(&b.addr, bundle.clone(), &token)
        .await
        .unwrap();
    let mut on_b = agent.client.clone();
    let sync = on_b
        .sync_authorized_entries(SyncAuthorizedEntriesRequest {
            since_revision: 0,
            serving: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(sync.entries.is_empty());
    let since = sync.revision;
    // An entry created through A is served through B.
    let id = a.create_entry("spiffe://example.org/web", ALIAS, &["unix:uid:1000"]);
    let got = within_async(FEED, "entry created through A served through B", || {
        let mut on_b = on_b.clone();
        let id = id.clone();
        async move {
            let r = on_b
                .sync_authorized_entries(SyncAuthorizedEntriesRequest {
                    since_revision: since,
                    serving: None,
                })
                .await
                .unwrap()
                .into_inner();
            r.entries.iter().any(|e| e.id == id).then_some(r)
        }
    })
    .await;
    // An SVID for it comes from B.
    let (_kp, csr) = key_and_csr();
    let r = on_b
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: id.clone(),
                csr,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let svid = r.results[0].svid.as_ref().expect("SVID through B");
    assert!(verifies(&svid.cert_chain[0], &bundle));
    // Deleted through C: B tells the agent to drop it.
    let since = got.revision;
    c.server(2).cli_ok(&["entry", "delete", "--id", &id]);
    within_async(FEED, "entry deleted through C dropped through B", || {
        let mut on_b = on_b.clone();
        let id = id.clone();
        async move {
            let r = on_b
                .sync_authorized_entries(SyncAuthorizedEntriesRequest {
                    since_revision: since,
                    serving: None,
                })
                .await
                .unwrap()
                .into_inner();
            r.removed_entry_ids.contains(&id).then_some(())
        }
    })
    .await;
    // Banned through A: B and C refuse the agent.
    a.cli_ok(&["agent", "ban", "--spiffe-id", &agent.id]);
    for (i, s) in c.servers.iter().enumerate().skip(1) {
        let client =
            agent_client::authenticated(&s.addr, bundle.clone(), &agent.chain, &agent.key).await;
        let e = within_async(
            FEED,
            &format!("ban through A refused by server {i}"),
            || {
                let mut client = client.clone();
                async move {
                    client
                        .sync_authorized_entries(SyncAuthorizedEntriesRequest {
                            since_revision: 0,
                            serving: None,
                        })
                        .await
                        .err()
                }
            },
        )
        .await;
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "server {i}: {e:?}");
        assert!(e.message().contains("banned"), "server {i}: {e:?}");
    }
    // And the ban stays: the agent's own calls on B did not write it back.
    let shown = json(&c.server(2).cli_ok(&[
        "agent",
        "show",
        "--spiffe-id",
        &agent.id,
        "--output",
        "json",
    ]));
    assert_eq!(shown["banned"], true, "{shown}");
    for s in &c.servers {
        s.cli_ok(&["audit", "verify"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_join_token_used_twenty_times_across_servers_makes_one_agent() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::launch(
        dir.path(),
        3,
        &ClusterOptions::on(&continuity_tests::postgres::database()),
    );
    let bundle = c.server(0).bundle_der();
    let token = c.server(0).token(None);
    let addrs: Vec<String> = c.servers.iter().map(|s| s.addr.clone()).collect();
    let tries: Vec<_> = (0..20)
        .map(|i| {
            let (addr, bundle, token) = (addrs[i % 3].clone(), bundle.clone(), token.clone());
            tokio::spawn(async move { agent_client::attest(&addr, bundle, &token).await })
        })
        .collect();
    let mut won = vec![];
    for t in tries {
        match t.await.unwrap() {
            Ok(agent) => won.push(agent.id),
            Err(e) => assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}"),
        }
    }
    assert_eq!(won.len(), 1, "one token, one agent: {won:?}");
    for (i, s) in c.servers.iter().enumerate() {
        within(FEED, &format!("server {i} lists the one agent"), || {
            let list = json(&s.cli_ok(&["agent", "list", "--output", "json"]));
            let ids: Vec<&str> = list["agents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["spiffe_id"].as_str().unwrap())
                .collect();
            (ids == [won[0].as_str()]).then_some(())
        });
    }
    // Three processes append to one audit chain at once (30 audited entry creations, ten
    // through each): it verifies from each, and each server serves all 30 entries.
    std::thread::scope(|scope| {
        for (i, s) in c.servers.iter().enumerate() {
            scope.spawn(move || {
                for n in 0..10 {
                    s.create_entry(
                        &format!("spiffe://example.org/w/{i}/{n}"),
                        ALIAS,
                        &[&format!("unix:uid:{}", 2000 + n)],
                    );
                }
            });
        }
    });
    for (i, s) in c.servers.iter().enumerate() {
        within(FEED, &format!("server {i} serves all 30 entries"), || {
            let list = json(&s.cli_ok(&["entry", "show", "--output", "json"]));
            (list["entries"].as_array().unwrap().len() == 30).then_some(())
        });
    }
    let creates = json(&c.server(0).cli_ok(&["audit", "show", "--output", "json"]))["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "entry.create")
        .count();
    assert_eq!(creates, 30);
    for s in &c.servers {
        s.cli_ok(&["audit", "verify"]);
        s.cli_ok(&["audit", "checkpoint"]);
        s.cli_ok(&["audit", "verify"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_driven_rotation_happens_once_and_every_server_serves_its_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = ClusterOptions::on(&continuity_tests::postgres::database());
    // Prepared at 30 s, activated at 50 s after the first authority was made.
    opts.ca_ttl = "1m".into();
    opts.x509_ttl = "20s".into();
    opts.extra_toml = "default_jwt_svid_ttl = \"20s\"\n".into();
    let c = Cluster::launch(dir.path(), 3, &opts);
    let before = c.bundles();
    assert!(before.iter().all(|x| *x == before[0]), "{before:?}");
    let first = ders(&before[0]);
    assert_eq!(first.len(), 1);
    // Prepared: every server publishes the next authority, the same one.
    let prepared = within(
        Duration::from_secs(60),
        "next authority in every bundle",
        || {
            let now = c.bundles();
            (now.iter().all(|x| *x == now[0]) && ders(&now[0]).len() == 2).then(|| ders(&now[0]))
        },
    );
    assert_eq!(prepared[0], first[0]);
    // Activated: SVIDs from every server are signed by the new authority and verify against
    // the (one) bundle.
    let token_for = |i: usize| c.server(i).token(None);
    let mut activated = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !activated {
        assert!(
            std::time::Instant::now() < deadline,
            "activation not seen; logs:\n{}",
            c.logs()
        );
        let mut by_new = 0;
        for i in 0..3 {
            let bundle = c.server(i).bundle_der();
            assert_eq!(bundle, prepared, "server {i} bundle changed again");
            let agent = agent_client::attest(&c.server(i).addr, bundle.clone(), &token_for(i))
                .await
                .unwrap();
            assert!(verifies(&agent.chain[0], &bundle), "server {i}");
            if verifies(&agent.chain[0], &bundle[1..]) {
                by_new += 1;
            }
        }
        activated = by_new == 3;
        if !activated {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let after = c.bundles();
    assert!(after.iter().all(|x| *x == after[0]), "{after:?}");
    assert_eq!(ders(&after[0]), prepared);
    // Exactly one rotation: one server prepared and activated each authority once.
    let logs = c.logs();
    assert_eq!(
        logs.matches("next authority prepared").count(),
        2,
        "one X.509 and one JWT preparation in all:\n{logs}"
    );
    assert_eq!(
        logs.matches("authority activated").count(),
        2,
        "one X.509 and one JWT activation in all:\n{logs}"
    );
}

#[test]
fn an_engine_key_works_through_any_server_and_rotates_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::launch(
        dir.path(),
        3,
        &ClusterOptions::on(&continuity_tests::postgres::database()),
    );
    let a = c.server(0);
    a.cli_ok(&["engine", "create", "ledger", "--tier", "1"]);
    for (key, purpose) in [("signing", "sign"), ("data", "encrypt")] {
        a.cli_ok(&[
            "engine",
            "key",
            "create",
            "ledger",
            key,
            "--purpose",
            purpose,
        ]);
    }
    a.create_entry_with_engine(ALIAS, &format!("unix:uid:{}", uid()), "ledger");
    // Agents on B and on C, the same node alias.
    let on_b = TestAgent::start(
        &dir.path().join("agent-b"),
        c.server(1),
        &a.token(Some(ALIAS)),
    );
    let on_c = TestAgent::start(
        &dir.path().join("agent-c"),
        c.server(2),
        &a.token(Some(ALIAS)),
    );
    let msg = on_b.dir.join("msg.txt");
    std::fs::write(&msg, "pay 10 EUR to alice").unwrap();
    let msg_s = msg.to_str().unwrap();
    let sign = |agent: &TestAgent| -> Option<serde_json::Value> {
        let out = agent.cli(&[
            "engine",
            "sign",
            "--key",
            "signing",
            "--message-file",
            msg_s,
            "--output",
            "json",
        ]);
        out.status
            .success()
            .then(|| json(&String::from_utf8_lossy(&out.stdout)))
    };
    for (name, agent) in [("B", &on_b), ("C", &on_c)] {
        let s = within(
            Duration::from_secs(20),
            &format!("sign through {name}"),
            || sign(agent),
        );
        assert_eq!(s["version"], 1, "{name}: {s}");
    }
    // Encrypted through B, decrypted through C.
    let enc = dir.path().join("secret.bin");
    let dec = dir.path().join("plain.txt");
    let crypt = |agent: &TestAgent, op: &str, input: &std::path::Path, out: &std::path::Path| {
        agent.cli(&[
            "engine",
            op,
            "--key",
            "data",
            "--in",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let o = crypt(&on_b, "encrypt", &msg, &enc);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    within(FEED, "decrypt through C", || {
        crypt(&on_c, "decrypt", &enc, &dec)
            .status
            .success()
            .then_some(())
    });
    assert_eq!(std::fs::read(&dec).unwrap(), std::fs::read(&msg).unwrap());
    // Rotated through A: the new version is primary through C.
    a.cli_ok(&["engine", "key", "rotate", "ledger", "signing"]);
    let s = within(FEED, "rotation through A primary through C", || {
        sign(&on_c).filter(|s| s["version"] == 2)
    });
    assert_eq!(s["key"], "signing");
    // The data key rotated and its v1 disabled through A: C refuses v1 ciphertext.
    a.cli_ok(&["engine", "key", "rotate", "ledger", "data"]);
    a.cli_ok(&[
        "engine",
        "key",
        "disable",
        "ledger",
        "data",
        "--version",
        "1",
    ]);
    within(FEED, "disabled version refused through C", || {
        let o = crypt(&on_c, "decrypt", &enc, &dec);
        (!o.status.success()).then(|| String::from_utf8_lossy(&o.stderr).to_string())
    });
    // Through B too, and new encryptions use v2 and still decrypt through C.
    within(FEED, "disabled version refused through B", || {
        (!crypt(&on_b, "decrypt", &enc, &dec).status.success()).then_some(())
    });
    let enc2 = dir.path().join("secret2.bin");
    assert!(crypt(&on_b, "encrypt", &msg, &enc2).status.success());
    assert!(crypt(&on_c, "decrypt", &enc2, &dec).status.success());
    // Both rotations happened once: the key lists agree everywhere (but for the encryptions
    // each server counted itself).
    let list = |i: usize| {
        let mut v = json(
            &c.server(i)
                .cli_ok(&["engine", "key", "list", "ledger", "--output", "json"]),
        );
        strip(&mut v, "encryptions");
        v
    };
    let agreed = within(FEED, "key lists agree", || {
        let l = list(0);
        (l == list(1) && l == list(2)).then_some(l)
    });
    let text = agreed.to_string();
    assert!(text.contains("\"primary_version\":2"), "{text}");
    assert!(
        !text.contains("\"version\":3"),
        "one rotation per key: {text}"
    );
    for s in &c.servers {
        s.cli_ok(&["audit", "verify"]);
    }
}
