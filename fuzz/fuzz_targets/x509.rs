//! What the agent accepts as X.509 from the server and from its own state file: X509-SVID and
//! bundle answers (protobuf, as the server sends them), the persisted state (JSON), and trust
//! bundle PEM / certificate DER. No panic; an SVID the agent keeps always has a leaf.
#![no_main]

use bytes::Bytes;
use continuity_agent::manager::cache::{BundleState, Entry, PersistedState, Snapshot, Svid};
use continuity_agent::manager::{issued_by_bundle, svid_from_proto};
use continuity_attestors::Selector;
use continuity_common::secret::SecretBytes;
use continuity_common::tls::TrustRoots;
use continuity_common::x509;
use continuity_proto::types::{Bundle, X509svid};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use rustls_pki_types::{CertificateDer, UnixTime};

/// A real CA and an SVID it signed (fuzz/seeds/make_seeds.py).
const CA: &[u8] = include_bytes!("../seeds/keys/ca.der");
const LEAF: &[u8] = include_bytes!("../seeds/keys/leaf.der");

/// A state serving `svid` for one entry, as the agent would persist it.
fn state_with(svid: Svid, bundle: BundleState) -> PersistedState {
    let mut st = PersistedState {
        agent_id: "spiffe://example.org/agent".into(),
        agent_svid: Some(svid.clone()),
        bundle,
        ..Default::default()
    };
    st.entries.insert(
        "e".into(),
        Entry {
            id: "e".into(),
            spiffe_id: "spiffe://example.org/w".into(),
            selectors: vec![Selector::raw("unix", "uid:0")],
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            hint: String::new(),
            engine: String::new(),
            revision: 1,
            created_at: 0,
            federates_with: Vec::new(),
        },
    );
    st.svids.insert("e".into(), svid);
    st
}

/// Publishes `st` twice (the second time against the first, as every sync does).
fn publish(st: &PersistedState) {
    let first = Snapshot::build(st, None);
    let second = Snapshot::build(st, Some(&first));
    for id in &second.identities {
        assert!(
            !id.x509_svid.is_empty(),
            "an identity without a certificate"
        );
    }
    for svid in st.svids.values().chain(st.agent_svid.iter()) {
        let _ = issued_by_bundle(&svid.chain, &st.bundle.x509_authorities);
    }
}

fn certificate(der: &[u8]) {
    let _ = x509::svid_facts(der);
    let _ = x509::spiffe_id_of(der);
    let _ = x509::not_after(der);
    let _ = x509::serial_hex(der);
    let chain = [Bytes::copy_from_slice(der)];
    let _ = issued_by_bundle(&chain, &[CA.to_vec()]);
    let _ = issued_by_bundle(&[Bytes::from_static(LEAF)], &[der.to_vec()]);
    // As the server's TLS certificate, checked against the bundle; and as the bundle.
    let roots = TrustRoots::default();
    roots.replace(vec![CA.to_vec()]);
    let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_800_000_000));
    let usage = webpki::KeyUsage::server_auth();
    let _ = roots.verify_chain(&CertificateDer::from(der), &[], now, usage);
    roots.replace(vec![der.to_vec()]);
    let _ = roots.verify_chain(&CertificateDer::from(LEAF), &[], now, usage);
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    match mode % 4 {
        // An X509-SVID answer (BatchNewX509SVID, RenewAgent, AttestAgent).
        0 => {
            let Ok(answer) = X509svid::decode(data) else {
                return;
            };
            match svid_from_proto(answer.clone(), SecretBytes::new(vec![1, 2, 3])) {
                Ok(svid) => {
                    assert!(!svid.chain.is_empty());
                    for der in &answer.cert_chain {
                        certificate(der);
                    }
                    let bundle = BundleState {
                        trust_domain: "example.org".into(),
                        x509_authorities: vec![CA.to_vec()],
                        ..Default::default()
                    };
                    publish(&state_with(svid, bundle));
                }
                Err(_) => assert!(
                    answer.cert_chain.is_empty()
                        || x509_parser::parse_x509_certificate(&answer.cert_chain[0]).is_err()
                ),
            }
        }
        // A bundle answer (FetchBundle, AttestAgent).
        1 => {
            let Ok(bundle) = Bundle::decode(data) else {
                return;
            };
            let bundle = BundleState::from(bundle);
            let svid = Svid {
                chain: vec![Bytes::from_static(LEAF)],
                key: SecretBytes::new(b"key".to_vec()),
                expires_at: 2_000_000_000,
                issued_at: 1_700_000_000,
                rotate_at: 1_850_000_000,
            };
            for ca in &bundle.x509_authorities {
                certificate(ca);
            }
            publish(&state_with(svid, bundle));
        }
        // The state file.
        2 => {
            if let Ok(st) = serde_json::from_slice::<PersistedState>(data) {
                publish(&st);
            }
        }
        // A trust bundle file (PEM), or one DER certificate.
        _ => {
            let text = String::from_utf8_lossy(data);
            if let Ok(certs) = x509::pem_decode_all("CERTIFICATE", &text) {
                for der in &certs {
                    certificate(der);
                }
            }
            certificate(data);
        }
    }
});
