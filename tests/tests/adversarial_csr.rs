//! Adversarial suite, CSR policy: a hostile agent with its own real TLS client (its agent SVID)
//! sends weak or overreaching CSRs to the real server. Weak keys and hashes are refused with
//! InvalidArgument naming the reason; what a CSR asks for (another SPIFFE ID, CA rights) is
//! ignored; a well-behaved request on the same connection keeps getting SVIDs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::path::Path;
use std::process::Command;

use continuity_proto::agent::{
    AttestAgentRequest, AttestationData, BatchNewX509svidRequest, NewX509svidParams,
    RenewAgentRequest, attest_agent_request,
};
use continuity_tests::agent_client::{self, attest, key_and_csr};
use continuity_tests::server::{ServerOptions, TestServer};
use tonic::Code;
use x509_parser::prelude::*;

/// A DER CSR made by the openssl CLI: `keygen` writes key.pem, `req` signs with `digest`.
fn openssl_csr(dir: &Path, keygen: &[&str], digest: &str, extra: &[&str]) -> Vec<u8> {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(keygen);
    let mut args = vec![
        "req", "-new", "-key", "key.pem", "-subj", "/CN=x", digest, "-outform", "DER", "-out",
        "csr.der",
    ];
    args.extend(extra);
    run(&args);
    std::fs::read(dir.join("csr.der")).unwrap()
}

const RSA_1024: &[&str] = &[
    "genpkey",
    "-algorithm",
    "RSA",
    "-pkeyopt",
    "rsa_keygen_bits:1024",
    "-out",
    "key.pem",
];

fn batch_status(resp: &continuity_proto::agent::BatchNewX509svidResponse) -> (i32, String) {
    let st = resp.results[0].status.clone().unwrap();
    (st.code, st.message)
}

#[tokio::test]
async fn weak_csrs_are_refused_and_requested_extensions_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    let mut agent = attest(&s.addr, s.bundle_der(), &s.token(None))
        .await
        .unwrap();
    let entry = s.create_entry("spiffe://example.org/web", &agent.id, &["unix:uid:1000"]);

    // SHA-1 over RSA-1024 in BatchNewX509SVID: refused, naming the reason; no SVID.
    let weak = openssl_csr(dir.path(), RSA_1024, "-sha1", &[]);
    let resp = agent
        .client
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: entry.clone(),
                csr: weak.clone(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let (code, message) = batch_status(&resp);
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");
    assert!(message.contains("SHA-1"), "{message}");
    assert!(resp.results[0].svid.is_none());

    // RSA-1024 with SHA-256: the key size is named.
    let small = openssl_csr(dir.path(), RSA_1024, "-sha256", &[]);
    let resp = agent
        .client
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: entry.clone(),
                csr: small,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let (code, message) = batch_status(&resp);
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");
    assert!(message.contains("1024 bits"), "{message}");

    // The same weak CSR for the agent's own SVID (RenewAgent) is refused too.
    let e = agent
        .client
        .renew_agent(RenewAgentRequest { csr: weak.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("SHA-1"), "{}", e.message());

    // A CSR asking for another SPIFFE ID and CA rights gets the entry's identity only.
    let greedy = openssl_csr(
        dir.path(),
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "key.pem",
        ],
        "-sha256",
        &[
            "-addext",
            "subjectAltName=URI:spiffe://example.org/admin,DNS:evil.example",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    let resp = agent
        .client
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: entry.clone(),
                csr: greedy,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let (code, message) = batch_status(&resp);
    assert_eq!(code, 0, "{message}");
    let leaf = resp.results[0].svid.as_ref().unwrap().cert_chain[0].clone();
    let (_, cert) = parse_x509_certificate(&leaf).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(
        san.general_names,
        vec![GeneralName::URI("spiffe://example.org/web")]
    );
    assert!(!cert.is_ca());
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    assert!(!cert.key_usage().unwrap().unwrap().value.key_cert_sign());

    // The agent is still in good standing: a strong CSR still gets an SVID.
    let (_kp, good) = key_and_csr();
    let resp = agent
        .client
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: entry,
                csr: good,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch_status(&resp).0, 0);
}

#[tokio::test]
async fn attestation_with_a_weak_csr_is_refused_without_burning_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&dir.path().join("server"), ServerOptions::default());
    let token = s.token(None);
    let weak = openssl_csr(dir.path(), RSA_1024, "-sha1", &[]);
    let mut client = agent_client::anonymous(&s.addr, s.bundle_der()).await;
    let req = AttestAgentRequest {
        step: Some(attest_agent_request::Step::Params(
            attest_agent_request::Params {
                data: Some(AttestationData {
                    r#type: "join_token".into(),
                    payload: token.as_bytes().to_vec(),
                }),
                csr: weak,
            },
        )),
    };
    let e = match client.attest_agent(tokio_stream::once(req)).await {
        Err(e) => e,
        Ok(resp) => resp.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("SHA-1"), "{}", e.message());
    // The token is still good for a proper request.
    attest(&s.addr, s.bundle_der(), &token).await.unwrap();
}
