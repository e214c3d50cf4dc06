//! The adversarial suite against the server: a hostile agent with its own real TLS client (the
//! proto crate and rustls, nothing of the agent) attacks a real server while a well-behaved
//! `continuity-agent` on the same server keeps syncing and serving SVIDs to a workload.
//!
//! This file holds the authorization attacks; the rest of the suite is in the
//! `adversarial_*.rs` files next to it: `adversarial_agent_identity` (renewal racing a ban,
//! stolen superseded agent keys and forks), `adversarial_floods` (10,000 idle streams, slow
//! handshakes, silent attestations, oversized messages, per-agent rate limits, slowloris,
//! EMFILE), `adversarial_psat` (junk and forged k8s_psat tokens, fetch discipline),
//! `adversarial_csr` (weak keys and algorithms), `adversarial_secrets` (pin_file custody) and
//! `adversarial_admin_audit` (admin writes whose audit record cannot be written).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::time::{Duration, Instant};

use continuity_proto::agent::{
    BatchNewX509svidRequest, FetchBundleRequest, NewJwtsvidRequest, NewX509svidParams,
    RenewAgentRequest, SyncAuthorizedEntriesRequest,
};
use continuity_proto::engine::engine_broker_client::EngineBrokerClient;
use continuity_proto::engine::{
    BrokerDecrypt, BrokerEncrypt, BrokerFetchSecret, BrokerGetPublicKey, BrokerJwks, BrokerSign,
    DecryptRequest, EncryptRequest, FetchSecretRequest, GetPublicKeyRequest, Incarnation,
    ReportIncarnationsRequest, SignRequest,
};
use continuity_tests::agent_client::{self, attest, key_and_csr};
use continuity_tests::{Env, fetch_x509, uid};
use tonic::Code;
use x509_parser::prelude::*;

const ALIAS: &str = "spiffe://example.org/node/good";

/// Proves the well-behaved agent is unaffected: an entry created now reaches it through sync
/// and its workload (this test process) gets an X509-SVID for it.
async fn good_agent_keeps_working(env: &Env, step: &str) {
    let id = format!("spiffe://example.org/good/after-{step}");
    env.server
        .create_entry(&id, ALIAS, &[&format!("unix:uid:{}", uid())]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = fetch_x509(&env.agent).await
            && r.svids.iter().any(|s| s.spiffe_id == id)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {step}: the good agent did not serve {id} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A CSR asking for another SPIFFE ID, CA:true and certificate-signing key usage.
fn greedy_csr() -> Vec<u8> {
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/good/admin".try_into().unwrap(),
    )];
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.serialize_request(&kp).unwrap().der().to_vec()
}

fn sign_req(entry: &str) -> BrokerSign {
    BrokerSign {
        entry_id: entry.into(),
        request: Some(SignRequest {
            key: "signing".into(),
            message: b"x".to_vec(),
            ..Default::default()
        }),
        workload: None,
    }
}

fn encrypt_req(entry: &str, plaintext: Vec<u8>) -> BrokerEncrypt {
    BrokerEncrypt {
        entry_id: entry.into(),
        request: Some(EncryptRequest {
            key: "sealing".into(),
            plaintext,
            ..Default::default()
        }),
        workload: None,
    }
}

fn decrypt_req(entry: &str, ciphertext: Vec<u8>, aad: Vec<u8>) -> BrokerDecrypt {
    BrokerDecrypt {
        entry_id: entry.into(),
        request: Some(DecryptRequest {
            key: "sealing".into(),
            ciphertext,
            aad,
            ..Default::default()
        }),
        workload: None,
    }
}

/// The error of a call that must be refused with `code`.
fn refused_with(r: Result<(), tonic::Status>, code: Code, what: &str) -> tonic::Status {
    let e = r.err().unwrap_or_else(|| panic!("{what} must be refused"));
    assert_eq!(e.code(), code, "{what}: {e}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_gets_nothing_while_a_good_agent_keeps_working() {
    let env = continuity_tests::env(ALIAS);
    let s = &env.server;
    let good_entry = s.create_entry(
        "spiffe://example.org/good/web",
        ALIAS,
        &[&format!("unix:uid:{}", uid())],
    );
    s.cli_ok(&[
        "engine",
        "create",
        "vault",
        "--tier",
        "2",
        "--custody",
        "transit",
    ]);
    for (key, purpose, alg) in [
        ("signing", "sign", "ec-p256"),
        ("sealing", "encrypt", "aes-256-gcm"),
    ] {
        s.cli_ok(&[
            "engine",
            "key",
            "create",
            "vault",
            key,
            "--purpose",
            purpose,
            "--algorithm",
            alg,
        ]);
    }
    let engine_entry = s.create_entry_with_engine(ALIAS, "unix:uid:5001", "vault");
    good_agent_keeps_working(&env, "setup").await;

    let token = s.token(None);
    let mut h = attest(&s.addr, s.bundle_der(), &token).await.unwrap();
    let own_entry = s.create_entry(
        "spiffe://example.org/hostile/job",
        &h.id,
        &["unix:uid:4242"],
    );

    // 1. SVIDs for entries parented elsewhere: refused per entry, nothing signed.
    let (_kp, csr) = key_and_csr();
    let r = h
        .client
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![
                NewX509svidParams {
                    entry_id: good_entry.clone(),
                    csr: csr.clone(),
                },
                NewX509svidParams {
                    entry_id: engine_entry.clone(),
                    csr: csr.clone(),
                },
                NewX509svidParams {
                    entry_id: "no-such-entry".into(),
                    csr,
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 3);
    for res in &r.results {
        assert_eq!(
            res.status.as_ref().unwrap().code,
            Code::PermissionDenied as i32,
            "{res:?}"
        );
        assert!(res.svid.is_none());
    }
    for entry in [&good_entry, &engine_entry] {
        let e = h
            .client
            .new_jwtsvid(NewJwtsvidRequest {
                entry_id: entry.clone(),
                audience: vec!["db".into()],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    }
    // Sync shows only its own entry, whatever revision it claims to hold.
    for since in [0, -1, i64::MAX, 1] {
        let sync = h
            .client
            .sync_authorized_entries(SyncAuthorizedEntriesRequest {
                since_revision: since,
                serving: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            sync.entries.iter().all(|e| e.id == own_entry),
            "since {since}: {:?}",
            sync.entries
        );
        assert!(sync.removed_entry_ids.is_empty(), "since {since}");
    }
    // A serving report that could not be stored faithfully (a comma would split an ID in
    // two, a flood of IDs) is refused before anything is written.
    let hostile = [
        (vec!["ab,cd".to_string()], "serving.x509_authority_ids"),
        ((0..65).map(|i| format!("k{i}")).collect(), "more than 64"),
        (vec!["x".repeat(129)], "serving.x509_authority_ids"),
    ];
    for (ids, reason) in hostile {
        let e = h
            .client
            .sync_authorized_entries(SyncAuthorizedEntriesRequest {
                since_revision: 0,
                serving: Some(continuity_proto::agent::ServingReport {
                    bundle_sequence: 1,
                    x509_authority_ids: ids,
                    jwt_authority_ids: vec![],
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().contains(reason), "{e}");
    }
    good_agent_keeps_working(&env, "foreign-entries").await;

    // 2. A CSR asking for another SPIFFE ID, CA:true and keyCertSign gets the entry's ID only,
    //    as a leaf.
    let r = h
        .client
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: own_entry.clone(),
                csr: greedy_csr(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let res = &r.results[0];
    assert_eq!(res.status.as_ref().unwrap().code, 0, "{res:?}");
    let svid = res.svid.as_ref().unwrap();
    assert_eq!(svid.spiffe_id, "spiffe://example.org/hostile/job");
    let (_, cert) = X509Certificate::from_der(&svid.cert_chain[0]).unwrap();
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| format!("{n}"))
        .collect();
    assert_eq!(uris.len(), 1, "{uris:?}");
    assert!(
        uris[0].contains("spiffe://example.org/hostile/job"),
        "{uris:?}"
    );
    let bc = cert.basic_constraints().unwrap().map(|b| b.value.ca);
    assert_ne!(bc, Some(true), "the SVID must not be a CA");
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(
        !ku.key_cert_sign() && !ku.crl_sign(),
        "key usage {ku:?} lets the SVID sign certificates"
    );
    // The greedy CSR does not work as an agent renewal either: the agent SVID stays the agent's.
    let renewed = h
        .client
        .renew_agent(RenewAgentRequest { csr: greedy_csr() })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(renewed.spiffe_id, h.id);
    let (_, cert) = X509Certificate::from_der(&renewed.cert_chain[0]).unwrap();
    assert_ne!(
        cert.basic_constraints().unwrap().map(|b| b.value.ca),
        Some(true)
    );
    // The hostile agent kept no key for that SVID; renewing again with the original (previous)
    // SVID is a lost-response retry the server accepts, since the new SVID was never used.
    let (kp, csr) = key_and_csr();
    let svid = h
        .client
        .renew_agent(RenewAgentRequest { csr })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(svid.spiffe_id, h.id);
    h.chain = svid.cert_chain;
    h.key = kp.serialize_der();
    h.client = agent_client::authenticated(&s.addr, s.bundle_der(), &h.chain, &h.key).await;
    good_agent_keeps_working(&env, "greedy-csr").await;

    // 3. A replayed join token: refused, and no second agent appears.
    let e = attest(&s.addr, s.bundle_der(), &token)
        .await
        .err()
        .expect("a used join token must be refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let agents: serde_json::Value =
        serde_json::from_str(&s.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    let n = agents
        .as_array()
        .or_else(|| agents["agents"].as_array())
        .map(|a| a.len())
        .unwrap();
    assert_eq!(n, 2, "{agents}");
    good_agent_keeps_working(&env, "replayed-token").await;

    // 4. Engine operations for an Engine it does not host: every broker call is refused.
    let mut broker = EngineBrokerClient::new(
        agent_client::channel_for(&s.addr, s.bundle_der(), &h.chain, &h.key).await,
    );
    let denied = |r: Result<(), tonic::Status>, what: &str| {
        refused_with(r, Code::PermissionDenied, what);
    };
    denied(
        broker.sign(sign_req(&engine_entry)).await.map(|_| ()),
        "sign",
    );
    denied(
        broker
            .encrypt(encrypt_req(&engine_entry, b"x".to_vec()))
            .await
            .map(|_| ()),
        "encrypt",
    );
    denied(
        broker
            .decrypt(decrypt_req(&engine_entry, vec![0; 64], vec![]))
            .await
            .map(|_| ()),
        "decrypt",
    );
    denied(
        broker
            .get_public_key(BrokerGetPublicKey {
                entry_id: engine_entry.clone(),
                request: Some(GetPublicKeyRequest {
                    key: "signing".into(),
                    ..Default::default()
                }),
            })
            .await
            .map(|_| ()),
        "get_public_key",
    );
    denied(
        broker
            .fetch_secret(BrokerFetchSecret {
                entry_id: engine_entry.clone(),
                request: Some(FetchSecretRequest {
                    name: "sealing".into(),
                    ..Default::default()
                }),
                workload: None,
            })
            .await
            .map(|_| ()),
        "fetch_secret",
    );
    denied(
        broker
            .get_engine_jwks(BrokerJwks {
                entry_id: engine_entry.clone(),
            })
            .await
            .map(|_| ()),
        "get_engine_jwks",
    );
    // Oversized payloads the agent would have refused: the server refuses them itself, before
    // anything else (a hostile agent skips the agent's checks).
    let too_big = |r: Result<(), tonic::Status>, what: &str| {
        let e = refused_with(r, Code::InvalidArgument, what);
        assert!(e.message().contains("at most"), "{what}: {e}");
    };
    let big = vec![0u8; continuity_common::engine_limits::MAX_CIPHERTEXT + 1];
    too_big(
        broker
            .encrypt(encrypt_req(&engine_entry, big.clone()))
            .await
            .map(|_| ()),
        "oversized encrypt",
    );
    too_big(
        broker
            .decrypt(decrypt_req(&engine_entry, vec![0; 64], big.clone()))
            .await
            .map(|_| ()),
        "oversized aad",
    );
    too_big(
        broker
            .rewrap(continuity_proto::engine::BrokerRewrap {
                entry_id: engine_entry.clone(),
                request: Some(continuity_proto::engine::RewrapRequest {
                    key: "sealing".into(),
                    ciphertext: big,
                    ..Default::default()
                }),
                workload: None,
            })
            .await
            .map(|_| ()),
        "oversized rewrap",
    );
    // Reporting incarnations of someone else's Engine does not write them.
    let _ = broker
        .report_incarnations(ReportIncarnationsRequest {
            incarnations: vec![Incarnation {
                entry_id: engine_entry.clone(),
                workload: Some(continuity_proto::engine::Workload {
                    id: "forged".into(),
                    pid: 1,
                    uid: 5001,
                    selectors: vec![],
                }),
                seen_at: 1,
            }],
        })
        .await;
    let inc = s.cli_ok(&["engine", "incarnations", "vault", "--output", "json"]);
    assert!(!inc.contains("forged"), "{inc}");
    // Its own entry is not bound to an Engine: nothing there either.
    denied(
        broker.sign(sign_req(&own_entry)).await.map(|_| ()),
        "own sign",
    );
    good_agent_keeps_working(&env, "engine-calls").await;

    // 5. After a ban every call is refused, on the open connection and on a new one.
    s.cli_ok(&["agent", "ban", "--spiffe-id", &h.id]);
    let mut again = agent_client::authenticated(&s.addr, s.bundle_der(), &h.chain, &h.key).await;
    for client in [&mut h.client, &mut again] {
        let e = client
            .sync_authorized_entries(SyncAuthorizedEntriesRequest {
                since_revision: 0,
                serving: None,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        assert!(e.message().contains("banned"), "{}", e.message());
        let e = client
            .fetch_bundle(FetchBundleRequest {})
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        let (_kp, csr) = key_and_csr();
        let e = client
            .renew_agent(RenewAgentRequest { csr: csr.clone() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        let e = client
            .batch_new_x509svid(BatchNewX509svidRequest {
                params: vec![NewX509svidParams {
                    entry_id: own_entry.clone(),
                    csr,
                }],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        let e = client
            .new_jwtsvid(NewJwtsvidRequest {
                entry_id: own_entry.clone(),
                audience: vec!["db".into()],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    }
    denied(
        broker.sign(sign_req(&own_entry)).await.map(|_| ()),
        "banned sign",
    );
    good_agent_keeps_working(&env, "ban").await;

    // Nothing of the hostile agent's attempts reached the log as key material or tokens.
    let log = s.log();
    assert!(!log.contains(&token), "the join token is in the server log");
    assert!(
        !log.contains("PRIVATE KEY"),
        "key material in the server log"
    );
}
