//! Arbitrary text as the server's config file: a typed error or a config, never a panic; a
//! config that parses keeps the rules the server relies on at start.
#![no_main]

use std::path::Path;
use std::time::Duration;

use continuity_server::Config;
use continuity_server::config::{ConfigError, KeyManagerConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("/fuzz/server.toml")) {
        Ok(c) => {
            assert!(c.ca_ttl >= Duration::from_secs(60));
            // The CA computes key and SVID lifetimes as i64 Unix seconds (now + ttl) and
            // writes them into certificates (years up to 9999): any accepted ca_ttl must fit.
            let end = i64::try_from(c.ca_ttl.as_secs())
                .ok()
                .and_then(|t| t.checked_add(4_102_444_800)); // 2100-01-01
            assert!(
                end.is_some_and(|e| e < 253_402_300_800), // 9999-12-31
                "ca_ttl {:?} accepted",
                c.ca_ttl
            );
            for d in [c.default_x509_svid_ttl, c.default_jwt_svid_ttl] {
                assert!(!d.is_zero() && d < c.ca_ttl);
            }
            assert!(
                c.datastore_url.starts_with("sqlite://")
                    || c.datastore_url.starts_with("postgres://")
                    || c.datastore_url.starts_with("postgresql://")
            );
            assert_eq!(
                continuity_common::TrustDomain::new(c.trust_domain.name()).as_ref(),
                Ok(&c.trust_domain)
            );
            if let KeyManagerConfig::Disk { dir } = &c.key_manager {
                assert_eq!(dir, &c.data_dir.join("keys"));
            }
            for cl in &c.psat_clusters {
                for a in &cl.service_account_allow_list {
                    assert_eq!(a.split(':').count(), 2, "allow-list entry {a:?}");
                }
            }
        }
        // Every refusal names the file or the key: an operator can act on it.
        Err(e) => {
            let msg = e.to_string();
            match e {
                ConfigError::Invalid { .. } => assert!(msg.starts_with("config key `")),
                _ => assert!(msg.contains("/fuzz/server.toml"), "{msg}"),
            }
        }
    }
});
