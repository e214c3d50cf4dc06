//! PKCS#10 CSRs as agents send them (AttestAgent, RenewAgent, BatchNewX509SVID), through the
//! server's CSR parser and the whole sign-from-CSR path of a real CA (a memory key manager and a
//! SQLite datastore, started once). No panic; an SVID, when one is issued, carries exactly the
//! SPIFFE ID and DNS names the server asked for (never what the CSR requests), is not a CA,
//! cannot sign certificates, holds the CSR's public key and verifies against the CA.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use continuity_common::{ManualClock, TrustDomain};
use continuity_server::ca::{CaConfig, CaManager, profile};
use continuity_server::datastore::{RecordSealer, SqlDataStore};
use continuity_server::keys::{KeyType, MemoryKeyManager, SoftwareMac};
use libfuzzer_sys::fuzz_target;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::*;

/// What the CA's clock reads (the CA key's lifetime starts here).
const NOW: u64 = 1_800_000_000;
/// The IDs an entry may name; the input's first byte picks one, and how many DNS names.
const IDS: [&str; 3] = [
    "spiffe://example.org/ns/prod/sa/web",
    "spiffe://example.org/continuity/agent/join_token/t",
    "spiffe://example.org/a-much/longer/path_with.dots-and_underscores/0123456789",
];
const DNS: [&str; 2] = ["web.prod.svc", "*.example.org"];

struct Ca {
    ca: Arc<CaManager>,
    /// The CA certificate (the bundle's only X.509 authority).
    cert: Vec<u8>,
    /// Kept alive so the CA's background state stays valid.
    _rt: tokio::runtime::Runtime,
}

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let dir = std::env::temp_dir().join(format!("continuity-fuzz-csr-{}", std::process::id()));
        let ca = rt.block_on(async {
            let store = SqlDataStore::connect(
                &format!("sqlite://{}?mode=rwc", dir.join("ds.sqlite3").display()),
                RecordSealer::new(Arc::new(SoftwareMac::new(&[1; 32]))),
            )
            .await
            .expect("a datastore");
            let cfg = CaConfig {
                trust_domain: TrustDomain::new("example.org").expect("a trust domain"),
                x509_key_type: KeyType::EcP256,
                jwt_key_type: KeyType::EcP256,
                ttl: Duration::from_secs(24 * 3600),
                jwt_issuer: None,
                upstream: None,
            };
            let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(NOW));
            CaManager::start(
                cfg,
                Arc::new(MemoryKeyManager::default()),
                Arc::new(store),
                Arc::new(clock),
            )
            .await
            .expect("the CA starts")
        });
        // Signing reads only the CA's in-memory snapshot: the datastore file is not needed
        // after start (and would otherwise stay behind in /tmp after every run).
        let _ = std::fs::remove_dir_all(&dir);
        let cert = ca.bundle().x509_authorities[0].clone();
        Ca { ca, cert, _rt: rt }
    })
}

fn check_svid(der: &[u8], want_id: &str, dns: &[String], spki: &[u8], ca_cert: &[u8]) {
    let (rest, cert) = parse_x509_certificate(der).expect("the server's SVID parses");
    assert!(rest.is_empty());
    assert_eq!(cert.public_key().raw, spki, "the SVID holds another key");
    let (_, issuer) = parse_x509_certificate(ca_cert).expect("the CA parses");
    assert_eq!(cert.issuer(), issuer.subject());
    cert.verify_signature(Some(issuer.public_key()))
        .expect("the SVID verifies against the CA");
    let mut uris = Vec::new();
    let mut names = Vec::new();
    let mut saw_key_usage = false;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca, "an SVID that is a CA"),
            ParsedExtension::KeyUsage(ku) => {
                saw_key_usage = true;
                assert!(ext.critical);
                assert!(
                    !ku.key_cert_sign() && !ku.crl_sign(),
                    "an SVID that signs: {ku}"
                );
            }
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    match n {
                        GeneralName::URI(u) => uris.push(u.to_string()),
                        GeneralName::DNSName(d) => names.push(d.to_string()),
                        other => panic!("an unexpected SAN {other:?}"),
                    }
                }
            }
            ParsedExtension::NameConstraints(_) | ParsedExtension::PolicyConstraints(_) => {
                panic!("a CA-only extension in an SVID")
            }
            _ => {}
        }
    }
    assert!(saw_key_usage, "an SVID without key usage");
    assert_eq!(uris, [want_id], "the SVID's URI SANs");
    assert_eq!(names, dns, "the SVID's DNS SANs");
}

fuzz_target!(|input: &[u8]| {
    let Some((&pick, csr)) = input.split_first() else {
        return;
    };
    let want_id = IDS[usize::from(pick) % IDS.len()];
    let dns: Vec<String> = DNS
        .iter()
        .take(usize::from(pick / 4) % 3)
        .map(|d| d.to_string())
        .collect();
    let parsed = profile::csr_public_key(csr);
    let ca = ca();
    let signed = ca
        .ca
        .sign_x509_svid_from_csr(want_id, csr, Duration::from_secs(3600), &dns);
    match (&parsed, &signed) {
        (Ok(spki), Ok(svid)) => {
            check_svid(&svid.cert_der, want_id, &dns, spki, &ca.cert);
            assert!(svid.expires_at <= NOW as i64 + 3600);
        }
        (Err(_), Ok(_)) => panic!("an SVID for a CSR the parser refuses"),
        (_, Err(_)) => {}
    }
    // An SPKI the parser accepted, signed directly (the RenewAgent path signs what it parsed).
    if let Ok(spki) = parsed
        && let Ok(svid) = ca
            .ca
            .sign_x509_svid(want_id, &spki, Duration::from_secs(60), &[])
    {
        check_svid(&svid.cert_der, want_id, &[], &spki, &ca.cert);
    }
});
