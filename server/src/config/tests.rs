//! Unit tests of server.toml parsing: defaults, the full example, and errors that name their key.

use super::*;

fn parse(s: &str) -> Result<Config, ConfigError> {
    Config::parse(s, Path::new("server.toml"))
}

#[test]
fn defaults_apply() {
    let c = parse("trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"").unwrap();
    assert_eq!(c.ca_ttl, Duration::from_secs(86400));
    assert_eq!(c.max_encryptions_per_key_version, 1 << 31);
    assert_eq!(
        c.key_manager,
        KeyManagerConfig::Disk {
            dir: "/tmp/x/keys".into()
        }
    );
    assert!(
        c.datastore_url
            .starts_with("sqlite:///tmp/x/datastore.sqlite3")
    );
}

#[test]
fn full_example_documents_every_key_and_parses() {
    let text = include_str!("../../../deploy/server.full.toml");
    parse(text).unwrap();
    for key in [
        "trust_domain",
        "data_dir",
        "bind_address",
        "admin_socket",
        "ca_key_type",
        "ca_ttl",
        "default_x509_svid_ttl",
        "default_jwt_svid_ttl",
        "jwt_issuer",
        "log_level",
        "log_format",
        "[datastore]",
        "url",
        "[key_manager]",
        "kind",
        "module",
        "token_label",
        "pin_env",
        "pin_file",
        "[health]",
        "[metrics]",
        "[engines]",
        "max_encryptions_per_key_version",
        "[integrity]",
        "verify_interval",
        "[agent_api]",
        "max_connections_per_ip",
        "max_concurrent_streams",
        "handshake_timeout",
        "first_message_timeout",
        "request_timeout",
        "keepalive_interval",
        "keepalive_timeout",
        "svids_per_second",
        "svid_burst",
        "engine_calls_per_second",
        "engine_call_burst",
        "[federation.bundle_endpoint]",
        "profile",
        "cert_file",
        "key_file",
        "[upstream_authority]",
        "cert_file",
        "bundle_file",
        "key_file",
        "key_label",
    ] {
        assert!(
            text.contains(key),
            "deploy/server.full.toml does not document {key}"
        );
    }
}

#[test]
fn psat_key_cache_settings_are_checked_and_name_their_key() {
    let c = |extra: &str, source: &str| {
        parse(&format!(
            "trust_domain = \"e.org\"\n[node_attestors.k8s_psat.clusters.c1]\nservice_account_allow_list = [\"a:b\"]\n{source}\n{extra}"
        ))
    };
    let oidc = "oidc_discovery_url = \"https://oidc.example\"";
    let cfg = c("", oidc).unwrap();
    let continuity_attestors::k8s_psat::Validation::OidcDiscovery {
        cache_ttl,
        refresh_interval,
        ..
    } = &cfg.psat_clusters[0].validation
    else {
        panic!("not OIDC discovery");
    };
    assert_eq!(
        (*cache_ttl, *refresh_interval),
        (
            continuity_attestors::k8s_psat::DEFAULT_JWKS_CACHE_TTL,
            continuity_attestors::k8s_psat::DEFAULT_JWKS_REFRESH_INTERVAL
        )
    );
    for (extra, source, key) in [
        ("jwks_cache_ttl = \"soon\"", oidc, "jwks_cache_ttl"),
        (
            "jwks_refresh_interval = \"0s\"",
            oidc,
            "jwks_refresh_interval",
        ),
        (
            "jwks_cache_ttl = \"10s\"\njwks_refresh_interval = \"1m\"",
            oidc,
            "jwks_refresh_interval",
        ),
        (
            "jwks_cache_ttl = \"1m\"",
            "jwks_path = \"/j.json\"",
            "jwks_cache_ttl",
        ),
    ] {
        let e = c(extra, source).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("c1"), "{key}: {e}");
    }
}

#[test]
fn psat_label_keys_need_an_api_server_and_name_their_key() {
    let c = |extra: &str, source: &str| {
        parse(&format!(
            "trust_domain = \"e.org\"\n[node_attestors.k8s_psat.clusters.c1]\nservice_account_allow_list = [\"a:b\"]\n{source}\n{extra}"
        ))
    };
    let review = "token_review_api_server = \"https://k\"\ntoken_review_ca_path = \"/ca\"\ntoken_review_token_path = \"/t\"";
    let cfg = c(
        "allowed_node_label_keys = [\"zone\", \"topology.kubernetes.io/zone\"]\nallowed_pod_label_keys = [\"app\"]",
        review,
    )
    .unwrap();
    let l = &cfg.psat_clusters[0].labels;
    assert_eq!(l.node_keys, ["zone", "topology.kubernetes.io/zone"]);
    assert_eq!(l.pod_keys, ["app"]);
    assert!(c("", review).unwrap().psat_clusters[0].labels.is_empty());
    for (extra, source, key) in [
        (
            "allowed_node_label_keys = [\"zone\"]",
            "jwks_path = \"/j.json\"",
            "allowed_node_label_keys",
        ),
        (
            "allowed_pod_label_keys = [\"app\"]",
            "jwks_path = \"/j.json\"",
            "allowed_pod_label_keys",
        ),
        (
            "allowed_node_label_keys = [\"a:b\"]",
            review,
            "allowed_node_label_keys",
        ),
        (
            "allowed_pod_label_keys = [\"\"]",
            review,
            "allowed_pod_label_keys",
        ),
    ] {
        let e = c(extra, source).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("c1"), "{key}: {e}");
    }
}

#[test]
fn agent_api_defaults_and_errors_name_the_key() {
    let c = parse("trust_domain = \"e.org\"").unwrap();
    assert_eq!(c.agent_api, AgentApiConfig::default());
    assert_eq!(c.agent_api.max_concurrent_streams, 100);
    let c =
        parse("trust_domain = \"e.org\"\n[agent_api]\nsvid_burst = 7\nhandshake_timeout = \"2s\"")
            .unwrap();
    assert_eq!(c.agent_api.svid_burst, 7);
    assert_eq!(c.agent_api.handshake_timeout, Duration::from_secs(2));
    for (bad, key) in [
        ("max_connections = 0", "agent_api.max_connections"),
        (
            "max_concurrent_streams = 100000",
            "agent_api.max_concurrent_streams",
        ),
        ("handshake_timeout = \"0s\"", "agent_api.handshake_timeout"),
        (
            "first_message_timeout = \"soon\"",
            "agent_api.first_message_timeout",
        ),
        ("svids_per_second = -1.0", "agent_api.svids_per_second"),
        (
            "engine_calls_per_second = nan",
            "agent_api.engine_calls_per_second",
        ),
        ("svid_burst = 0", "agent_api.svid_burst"),
    ] {
        let e = parse(&format!("trust_domain = \"e.org\"\n[agent_api]\n{bad}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{bad}: {e}");
    }
    let e = parse("trust_domain = \"e.org\"\n[agent_api]\nmax_streams = 1")
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_streams"), "{e}");
}

#[test]
fn errors_name_the_key() {
    let e = parse("trust_domain = \"example.org\"\nca_tll = \"1h\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("ca_tll"), "{e}");
    let e = parse("trust_domain = \"example.org\"\nca_ttl = \"soon\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`ca_ttl`"), "{e}");
    let e = parse("trust_domain = \"Bad Domain\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`trust_domain`"), "{e}");
    let e = parse("trust_domain = \"e.org\"\n[key_manager]\nkind = \"pkcs11\"\nmodule = \"/x.so\"\ntoken_label = \"t\"\npin = \"1234\"").unwrap_err().to_string();
    assert!(e.contains("`key_manager.pin`"), "{e}");
    let e = parse("trust_domain = \"e.org\"\n[key_manager]\nkind = \"memory\"\ndirectory = \"/k\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`key_manager.directory`"), "{e}");
    let e = parse("trust_domain = \"e.org\"\n[cluster]\nlease_ttl = \"1s\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`cluster.lease_ttl`"), "{e}");
    let c = parse("trust_domain = \"e.org\"\n[key_manager]\ndirectory = \"/srv/keys\"").unwrap();
    assert_eq!(
        c.key_manager,
        KeyManagerConfig::Disk {
            dir: "/srv/keys".into()
        }
    );
    for bad in ["0", "-1", "4294967297"] {
        let e = parse(&format!(
            "trust_domain = \"e.org\"\n[engines]\nmax_encryptions_per_key_version = {bad}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`engines.max_encryptions_per_key_version`"),
            "{e}"
        );
    }
    let c =
        parse("trust_domain = \"e.org\"\n[engines]\nmax_encryptions_per_key_version = 10").unwrap();
    assert_eq!(c.max_encryptions_per_key_version, 10);
    let e = parse("trust_domain = \"e.org\"\nca_key_type = \"dsa\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`ca_key_type`"), "{e}");
    for bad in ["soon", "1h"] {
        let e = parse(&format!(
            "trust_domain = \"e.org\"\n[agent_api]\nprevious_svid_grace = \"{bad}\""
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("`agent_api.previous_svid_grace`"), "{e}");
    }
    let c = parse("trust_domain = \"e.org\"\n[agent_api]\nprevious_svid_grace = \"0s\"").unwrap();
    assert_eq!(c.previous_svid_grace, Duration::ZERO);
}

#[test]
fn a_ca_ttl_the_ca_cannot_add_to_now_is_refused() {
    // The server_config fuzz target refuses these: u64::MAX seconds became -1 as i64 in
    // the CA, and 2^63 - 808 overflowed now + ttl (a panic in debug builds).
    for ttl in ["18446744073709551615", "9223372036854775000", "36501d"] {
        let e = parse(&format!("trust_domain = \"e.org\"\nca_ttl = \"{ttl}\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`ca_ttl`") && e.contains("at most"), "{e}");
    }
    assert!(parse("trust_domain = \"e.org\"\nca_ttl = \"36500d\"").is_ok());
}

#[test]
fn upstream_authority_parses_and_errors_name_the_key() {
    let td = "trust_domain = \"e.org\"\n[upstream_authority]\n";
    let c = parse(&format!(
        "{td}kind = \"disk\"\ncert_file = \"/u.pem\"\nkey_file = \"/u.key\""
    ))
    .unwrap();
    assert_eq!(
        c.upstream_authority,
        Some(UpstreamConfig {
            cert_file: "/u.pem".into(),
            bundle_file: None,
            key: UpstreamKey::Disk {
                key_file: "/u.key".into()
            },
        })
    );
    let c = parse(&format!(
        "{td}kind = \"pkcs11\"\ncert_file = \"/u.pem\"\nbundle_file = \"/r.pem\"\nmodule = \"/m.so\"\ntoken_label = \"t\"\nkey_label = \"k\"\npin_env = \"P\""
    ))
    .unwrap();
    assert!(matches!(
        c.upstream_authority.unwrap().key,
        UpstreamKey::Pkcs11 { ref key_label, pin: PinSource::Env(ref v), .. } if key_label == "k" && v == "P"
    ));
    assert!(
        parse("trust_domain = \"e.org\"")
            .unwrap()
            .upstream_authority
            .is_none()
    );
    for (body, key) in [
        ("cert_file = \"/u.pem\"", "upstream_authority.kind"),
        (
            "kind = \"vault\"\ncert_file = \"/u.pem\"",
            "upstream_authority.kind",
        ),
        (
            "kind = \"disk\"\nkey_file = \"/u.key\"",
            "upstream_authority.cert_file",
        ),
        (
            "kind = \"disk\"\ncert_file = \"/u.pem\"",
            "upstream_authority.key_file",
        ),
        (
            "kind = \"disk\"\ncert_file = \"/u.pem\"\nkey_file = \"/k\"\nkey_label = \"x\"",
            "upstream_authority.kind",
        ),
        (
            "kind = \"pkcs11\"\ncert_file = \"/u.pem\"\nmodule = \"/m.so\"\ntoken_label = \"t\"\npin_env = \"P\"",
            "upstream_authority.key_label",
        ),
        (
            "kind = \"pkcs11\"\ncert_file = \"/u.pem\"\nmodule = \"/m.so\"\ntoken_label = \"t\"\nkey_label = \"k\"",
            "upstream_authority.pin_env",
        ),
        (
            "kind = \"pkcs11\"\ncert_file = \"/u.pem\"\nkey_file = \"/k\"",
            "upstream_authority.key_file",
        ),
        (
            "kind = \"pkcs11\"\ncert_file = \"/u.pem\"\npin = \"1234\"",
            "upstream_authority.pin",
        ),
        (
            "kind = \"disk\"\ncert_file = \"/u.pem\"\nkey_file = \"/k\"\nttl = \"1h\"",
            "ttl",
        ),
    ] {
        let e = parse(&format!("{td}{body}")).unwrap_err().to_string();
        assert!(e.contains(key), "{body}: {e}");
    }
}
