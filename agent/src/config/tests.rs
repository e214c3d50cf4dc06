//! Tests of agent.toml parsing and validation.

use super::*;

fn parse(s: &str) -> Result<Config, ConfigError> {
    Config::parse(s, Path::new("agent.toml"))
}

#[test]
fn errors_name_the_key() {
    let base = "trust_domain = \"example.org\"\ninsecure_bootstrap = true\n";
    for (extra, key) in [
        ("sokcet_path = \"/x\"\n", "sokcet_path"),
        ("server_address = \"nope\"\n", "server_address"),
        ("sync_interval = \"often\"\n", "sync_interval"),
        (
            "[workload_attestors.unix]\ndiscover_path = true\n",
            "discover_path",
        ),
        (
            "[workload_attestors.unix]\nhash_cache_size = 0\n",
            "workload_attestors.unix.hash_cache_size",
        ),
        (
            "[workload_attestors.unix]\nmax_concurrent_hashes = 0\n",
            "workload_attestors.unix.max_concurrent_hashes",
        ),
        (
            "[workload_attestors.unix]\nworkload_size_limit = -1\n",
            "workload_size_limit",
        ),
    ] {
        let e = parse(&format!("{base}{extra}")).unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    }
    for (extra, key) in [
        ("[workload_api]\nmax_conections = 5\n", "max_conections"),
        (
            "[workload_api]\nmax_connections = 0\n",
            "workload_api.max_connections",
        ),
        (
            "[workload_api]\nmax_connections = 10\nmax_connections_per_uid = 11\n",
            "workload_api.max_connections_per_uid",
        ),
        (
            "[workload_api]\nmax_concurrent_streams = 0\n",
            "workload_api.max_concurrent_streams",
        ),
        (
            "[workload_api]\nidle_timeout = \"soon\"\n",
            "workload_api.idle_timeout",
        ),
        (
            "[workload_api]\nidle_timeout = \"0s\"\n",
            "workload_api.idle_timeout",
        ),
        (
            "[workload_api]\nidle_timeout = \"30d\"\n",
            "workload_api.idle_timeout",
        ),
        (
            "[workload_api]\nrequest_timeout = \"0s\"\n",
            "workload_api.request_timeout",
        ),
        (
            "[workload_api]\njwt_cache_size = 0\n",
            "workload_api.jwt_cache_size",
        ),
        (
            "[workload_api]\njwt_cache_size = 1000000000000\n",
            "workload_api.jwt_cache_size",
        ),
        (
            "[workload_api]\nmax_audiences = 0\n",
            "workload_api.max_audiences",
        ),
        (
            "[workload_api]\nmax_audience_length = 1000000\n",
            "workload_api.max_audience_length",
        ),
        (
            "[workload_api]\nserver_calls_per_second = 0\n",
            "workload_api.server_calls_per_second",
        ),
        (
            "[workload_api]\nserver_calls_per_second = nan\n",
            "workload_api.server_calls_per_second",
        ),
        (
            "[workload_api]\nserver_calls_burst = 0\n",
            "workload_api.server_calls_burst",
        ),
        ("[workload_api]\nmax_audiences = -1\n", "max_audiences"),
    ] {
        let e = parse(&format!("{base}{extra}")).unwrap_err().to_string();
        assert!(e.contains(key), "{extra}: {e}");
    }
    let e = parse("trust_domain = \"example.org\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("trust_bundle_path"), "{e}");
}

#[test]
fn workload_api_defaults_and_values() {
    let base = "trust_domain = \"example.org\"\ninsecure_bootstrap = true\n";
    assert_eq!(
        parse(base).unwrap().workload_api,
        WorkloadApiConfig::default()
    );
    let c = parse(&format!(
        "{base}[workload_api]\nmax_connections = 64\nidle_timeout = \"2s\"\nrequest_timeout = \"5s\"\nserver_calls_per_second = 1\nserver_calls_burst = 3\njwt_cache_size = 100\n"
    ))
    .unwrap()
    .workload_api;
    assert_eq!(c.max_connections, 64);
    // The per-uid default never exceeds the total.
    assert_eq!(c.max_connections_per_uid, 64);
    assert_eq!(c.idle_timeout, Duration::from_secs(2));
    assert_eq!(c.request_timeout, Duration::from_secs(5));
    assert_eq!(c.max_concurrent_streams, 16);
    assert_eq!(c.server_calls_per_second, 1.0);
    assert_eq!(c.server_calls_burst, 3);
    assert_eq!(c.jwt_cache_size, 100);
    assert_eq!(c.max_audiences, 16);
}

#[test]
fn unix_defaults_and_explicit_no_size_limit() {
    let base = "trust_domain = \"example.org\"\ninsecure_bootstrap = true\n";
    for extra in ["", "[workload_attestors.unix]\n"] {
        let u = parse(&format!("{base}{extra}")).unwrap().unix.unwrap();
        assert!(!u.discover_workload_path, "SPIRE's default: no unix:path");
        assert_eq!(u.workload_size_limit, 256 << 20);
        assert_eq!(u.hash_cache_size, 4096);
        assert_eq!(u.max_concurrent_hashes, 2);
    }
    let u = parse(&format!(
        "{base}[workload_attestors.unix]\nworkload_size_limit = 0\nhash_cache_size = 10\nmax_concurrent_hashes = 4\ndiscover_workload_path = true\n"
    ))
    .unwrap()
    .unix
    .unwrap();
    assert!(u.discover_workload_path);
    assert_eq!(
        (
            u.workload_size_limit,
            u.hash_cache_size,
            u.max_concurrent_hashes
        ),
        (0, 10, 4)
    );
}

#[test]
fn full_example_documents_every_key_and_parses() {
    let text = include_str!("../../../deploy/agent.full.toml");
    parse(text).unwrap();
    for key in [
        "trust_domain",
        "server_address",
        "data_dir",
        "socket_path",
        "trust_bundle_path",
        "insecure_bootstrap",
        "join_token",
        "sync_interval",
        "[workload_attestors.unix]",
        "discover_workload_path",
        "workload_size_limit",
        "hash_cache_size",
        "max_concurrent_hashes",
        "[health]",
        "[metrics]",
        "[workload_api]",
        "max_connections",
        "max_connections_per_uid",
        "max_concurrent_streams",
        "idle_timeout",
        "request_timeout",
        "jwt_cache_size",
        "max_audiences",
        "max_audience_length",
        "server_calls_per_second",
        "server_calls_burst",
        "log_level",
        "log_format",
    ] {
        assert!(
            text.contains(key),
            "deploy/agent.full.toml does not document {key}"
        );
    }
}

#[test]
fn server_address_is_one_address_or_an_array() {
    let base = "trust_domain = \"example.org\"\ninsecure_bootstrap = true\n";
    let one = parse(&format!("{base}server_address = \"s.example:8081\"\n")).unwrap();
    assert_eq!(
        one.server_addresses,
        vec![ServerAddress::parse("s.example:8081").unwrap()]
    );
    let default = parse(base).unwrap();
    assert_eq!(
        default.server_addresses[0].to_string(),
        DEFAULT_SERVER_ADDRESS
    );
    let many = parse(&format!(
        "{base}server_address = [\"a.example:8081\", \"10.0.0.7:8081\", \"[fd00::1]:8081\"]\n"
    ))
    .unwrap();
    let shown: Vec<String> = many
        .server_addresses
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(shown, ["a.example:8081", "10.0.0.7:8081", "[fd00::1]:8081"]);
    for bad in [
        "[]",
        "[\"a:1\", \"\"]",
        "[\"a:1\", true]",
        "{ host = \"a\" }",
    ] {
        let e = parse(&format!("{base}server_address = {bad}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("server_address"), "{bad}: {e}");
    }
}
