//! The agent-facing API against a real server process: join tokens, authorization, sync,
//! signing, and the X509-SVID profile as openssl sees it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use continuity_proto::agent::{
    BatchNewX509svidRequest, FetchBundleRequest, NewJwtsvidRequest, NewX509svidParams,
    RenewAgentRequest, SyncAuthorizedEntriesRequest,
};
use continuity_tests::agent_client::{self, attest, key_and_csr};
use continuity_tests::server::{ServerOptions, TestServer};
use tonic::Code;
use x509_parser::prelude::*;

fn server() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    (dir, s)
}

#[tokio::test]
async fn join_token_works_once_and_refusals_are_clear() {
    let (_d, s) = server();
    let token = s.token(None);
    let agent = attest(&s.addr, s.bundle_der(), &token)
        .await
        .expect("first use attests");
    assert!(
        agent
            .id
            .starts_with("spiffe://example.org/continuity/agent/join_token/"),
        "{}",
        agent.id
    );
    assert!(
        !agent.id.contains(&token),
        "the agent ID must not reveal the token"
    );

    let again = attest(&s.addr, s.bundle_der(), &token)
        .await
        .err()
        .expect("second use refused");
    assert_eq!(again.code(), Code::PermissionDenied);
    assert!(
        again.message().contains("already been used"),
        "{}",
        again.message()
    );

    let bogus = attest(&s.addr, s.bundle_der(), "not-a-token")
        .await
        .err()
        .unwrap();
    assert_eq!(bogus.code(), Code::PermissionDenied);

    // Expired: a one-second token used after it lapsed.
    let short = s
        .cli_ok(&["token", "generate", "--ttl", "1"])
        .trim()
        .strip_prefix("Token: ")
        .unwrap()
        .to_string();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let expired = attest(&s.addr, s.bundle_der(), &short)
        .await
        .err()
        .expect("expired token refused");
    assert_eq!(expired.code(), Code::PermissionDenied);
    assert!(
        expired.message().contains("expired"),
        "{}",
        expired.message()
    );

    // TTL above one hour is refused at generation.
    let out = s.cli(&["token", "generate", "--ttl", "7200"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exceeds the maximum of 3600s"), "{err}");
    // The token never appears in the server log.
    assert!(!s.log().contains(&token), "token leaked into the log");
}

#[tokio::test]
async fn twenty_concurrent_attestations_with_one_token_yield_one_agent() {
    let (_d, s) = server();
    let token = s.token(None);
    let bundle = s.bundle_der();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (addr, bundle, token) = (s.addr.clone(), bundle.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            attest(&addr, bundle, &token).await.map(|a| a.id)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Code::PermissionDenied, "{e}"),
        }
    }
    assert_eq!(ok, 1, "exactly one attestation may succeed");
    let agents: serde_json::Value =
        serde_json::from_str(&s.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    assert_eq!(agents["agents"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn x509_svid_passes_openssl_verify_and_matches_the_profile() {
    let (d, s) = server();
    let mut agent = attest(&s.addr, s.bundle_der(), &s.token(None))
        .await
        .unwrap();
    let entry = s.create_entry("spiffe://example.org/web", &agent.id, &["unix:uid:1000"]);
    let (_kp, csr) = key_and_csr();
    let resp = agent
        .client
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: entry,
                csr,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let r = &resp.results[0];
    assert_eq!(r.status.as_ref().unwrap().code, 0, "{:?}", r.status);
    let leaf = r.svid.as_ref().unwrap().cert_chain[0].clone();

    let bundle_pem = d.path().join("bundle.pem");
    std::fs::write(
        &bundle_pem,
        s.cli_ok(&["bundle", "show", "--format", "pem"]),
    )
    .unwrap();
    let leaf_pem = d.path().join("svid.pem");
    std::fs::write(
        &leaf_pem,
        continuity_common::x509::pem_encode("CERTIFICATE", &leaf),
    )
    .unwrap();
    let out = std::process::Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(&bundle_pem)
        .arg(&leaf_pem)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let (_, cert) = parse_x509_certificate(&leaf).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    let uris: Vec<_> = san
        .general_names
        .iter()
        .filter(|n| matches!(n, GeneralName::URI(_)))
        .collect();
    assert_eq!(uris.len(), 1, "exactly one URI SAN");
    assert!(matches!(
        uris[0],
        GeneralName::URI("spiffe://example.org/web")
    ));
    assert!(!cert.is_ca());
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical, "key usage must be critical");
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(
        cert.validity().not_before.timestamp()
            <= std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
                - 5
    );

    // The admin socket's directory is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[tokio::test]
async fn an_agent_cannot_get_svids_for_entries_it_is_not_authorized_for() {
    let (_d, s) = server();
    let mut a = attest(&s.addr, s.bundle_der(), &s.token(None))
        .await
        .unwrap();
    let b = attest(&s.addr, s.bundle_der(), &s.token(None))
        .await
        .unwrap();
    let bs_entry = s.create_entry("spiffe://example.org/db", &b.id, &["unix:uid:2000"]);

    let (_kp, csr) = key_and_csr();
    let resp = a
        .client
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: bs_entry.clone(),
                csr,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let r = &resp.results[0];
    assert_eq!(
        r.status.as_ref().unwrap().code,
        Code::PermissionDenied as i32
    );
    assert!(r.svid.is_none());

    let jwt = a
        .client
        .new_jwtsvid(NewJwtsvidRequest {
            entry_id: bs_entry.clone(),
            audience: vec!["x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(jwt.code(), Code::PermissionDenied);

    // Sync never shows another agent's entries.
    let sync = a
        .client
        .sync_authorized_entries(SyncAuthorizedEntriesRequest {
            since_revision: 0,
            serving: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(sync.entries.is_empty());

    // Without an agent SVID nothing but AttestAgent works.
    let mut anon = agent_client::anonymous(&s.addr, s.bundle_der()).await;
    let e = anon.fetch_bundle(FetchBundleRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = anon
        .sync_authorized_entries(SyncAuthorizedEntriesRequest {
            since_revision: 0,
            serving: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // More than 500 CSRs in one call is refused.
    let (_kp, csr) = key_and_csr();
    let params = (0..501)
        .map(|_| NewX509svidParams {
            entry_id: bs_entry.clone(),
            csr: csr.clone(),
        })
        .collect();
    let e = a
        .client
        .batch_new_x509svid(BatchNewX509svidRequest { params })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn node_alias_from_token_authorizes_entries_and_sync_is_incremental() {
    let (_d, s) = server();
    let alias = "spiffe://example.org/cluster/prod";
    let mut a = attest(&s.addr, s.bundle_der(), &s.token(Some(alias)))
        .await
        .unwrap();
    let e1 = s.create_entry("spiffe://example.org/web", alias, &["unix:uid:1000"]);
    let e2 = s.create_entry("spiffe://example.org/api", &a.id, &["unix:uid:1001"]);
    let full = a
        .client
        .sync_authorized_entries(SyncAuthorizedEntriesRequest {
            since_revision: 0,
            serving: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(full.full);
    let mut ids: Vec<_> = full.entries.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    let mut want = vec![e1.clone(), e2.clone()];
    want.sort();
    assert_eq!(ids, want);

    // Nothing new: nothing sent.
    let none = a
        .client
        .sync_authorized_entries(SyncAuthorizedEntriesRequest {
            since_revision: full.revision,
            serving: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.entries.is_empty() && none.removed_entry_ids.is_empty() && !none.full);

    let e3 = s.create_entry("spiffe://example.org/batch", alias, &["unix:uid:1002"]);
    s.cli_ok(&["entry", "delete", "--id", &e1]);
    let inc = a
        .client
        .sync_authorized_entries(SyncAuthorizedEntriesRequest {
            since_revision: full.revision,
            serving: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        inc.entries.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        vec![e3.clone()]
    );
    assert_eq!(inc.removed_entry_ids, vec![e1]);
    assert!(inc.revision > full.revision);

    // The alias-authorized entry can be signed.
    let (_kp, csr) = key_and_csr();
    let resp = a
        .client
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams { entry_id: e3, csr }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.results[0].status.as_ref().unwrap().code, 0);
    let jwt = a
        .client
        .new_jwtsvid(NewJwtsvidRequest {
            entry_id: e2,
            audience: vec!["payments".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwt.token.split('.').count(), 3);
    assert_eq!(jwt.spiffe_id, "spiffe://example.org/api");
}

#[tokio::test]
async fn renewal_then_eviction_and_ban_are_enforced() {
    let (_d, s) = server();
    let mut a = attest(&s.addr, s.bundle_der(), &s.token(None))
        .await
        .unwrap();
    let (kp, csr) = key_and_csr();
    let renewed = a
        .client
        .renew_agent(RenewAgentRequest { csr })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(renewed.spiffe_id, a.id);
    let mut fresh = agent_client::authenticated(
        &s.addr,
        s.bundle_der(),
        &renewed.cert_chain,
        &kp.serialize_der(),
    )
    .await;
    fresh.fetch_bundle(FetchBundleRequest {}).await.unwrap();

    s.cli_ok(&["agent", "evict", "--spiffe-id", &a.id]);
    let e = fresh.fetch_bundle(FetchBundleRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");

    let mut b = attest(&s.addr, s.bundle_der(), &s.token(None))
        .await
        .unwrap();
    s.cli_ok(&["agent", "ban", "--spiffe-id", &b.id]);
    let e = b
        .client
        .sync_authorized_entries(SyncAuthorizedEntriesRequest {
            since_revision: 0,
            serving: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("banned"), "{}", e.message());
    let shown: serde_json::Value = serde_json::from_str(&s.cli_ok(&[
        "agent",
        "show",
        "--spiffe-id",
        &b.id,
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(shown["banned"], true);
}
