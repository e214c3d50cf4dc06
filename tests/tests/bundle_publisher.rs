#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]
//! The bundle publisher (`[k8s_bundle]`) against an API-server stand-in: a real server keeps
//! the ConfigMap holding its current bundle, retries API errors, and follows a CA rotation.

use std::time::{Duration, Instant};

use continuity_tests::cluster::within;
use continuity_tests::k8s_standin::ApiServerStandin;
use continuity_tests::server::{ServerOptions, TestServer};

const NS: &str = "continuity";
const NAME: &str = "continuity-bundle";
const KEY: &str = "bundle.crt";

fn ders(pem: &str) -> Vec<Vec<u8>> {
    continuity_common::x509::pem_decode_all("CERTIFICATE", pem).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_map_holds_the_bundle_retries_errors_and_follows_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServerStandin::start("publisher-token").await;
    // The first two requests fail: the publisher must retry until the ConfigMap is created.
    api.fail_next(2);
    std::fs::write(dir.path().join("api-ca.pem"), &api.ca_pem).unwrap();
    std::fs::write(dir.path().join("token"), "publisher-token\n").unwrap();
    let extra = format!(
        "default_jwt_svid_ttl = \"20s\"\n[k8s_bundle]\nnamespace = \"{NS}\"\nconfig_map = \"{NAME}\"\napi_server = \"https://127.0.0.1:{}\"\nca_path = \"{}\"\ntoken_path = \"{}\"\n",
        api.port,
        dir.path().join("api-ca.pem").display(),
        dir.path().join("token").display()
    );
    let server = TestServer::start(
        &dir.path().join("server"),
        ServerOptions {
            extra_toml: extra,
            // Next authority prepared (published in the bundle) 30 s after start.
            ca_ttl: "1m".into(),
            x509_ttl: "20s".into(),
            ..ServerOptions::default()
        },
    );
    let first = server.bundle_der();
    assert_eq!(first.len(), 1);
    let published = within(Duration::from_secs(20), "bundle in the ConfigMap", || {
        api.config_map_data(NS, NAME, KEY)
    });
    assert_eq!(
        ders(&published),
        first,
        "ConfigMap holds the server's bundle"
    );
    let reqs = api.requests();
    assert_eq!(reqs[0].status, 500, "{reqs:?}");
    assert_eq!(reqs[1].status, 500, "{reqs:?}");
    let created = reqs
        .iter()
        .find(|r| r.method == "POST" && r.status == 201)
        .unwrap_or_else(|| panic!("no ConfigMap created: {reqs:?}"));
    assert_eq!(created.path, format!("/api/v1/namespaces/{NS}/configmaps"));
    assert_eq!(created.body["metadata"]["name"], NAME);
    assert_eq!(created.body["metadata"]["namespace"], NS);
    assert_eq!(ders(created.body["data"][KEY].as_str().unwrap()), first);
    assert!(
        server.log().contains("bundle not published; retrying"),
        "{}",
        server.log()
    );

    // The rotation: once the server's bundle holds the next authority, the ConfigMap follows
    // within 5 s (a merge PATCH of the key).
    let rotated = within(Duration::from_secs(90), "next authority prepared", || {
        let b = server.bundle_der();
        (b.len() == 2).then_some(b)
    });
    let seen = Instant::now();
    within(
        Duration::from_secs(5),
        "ConfigMap updated after the rotation",
        || {
            let d = api.config_map_data(NS, NAME, KEY)?;
            (ders(&d) == rotated).then_some(())
        },
    );
    assert!(seen.elapsed() <= Duration::from_secs(5));
    let patch = api
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.method == "PATCH" && r.status == 200)
        .expect("the update is a PATCH");
    assert_eq!(
        patch.path,
        format!("/api/v1/namespaces/{NS}/configmaps/{NAME}")
    );
    assert_eq!(ders(patch.body["data"][KEY].as_str().unwrap()), rotated);
    assert!(
        patch.body.get("metadata").is_none(),
        "a merge patch of the data only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edited_or_deleted_config_map_is_restored_within_the_refresh_period() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServerStandin::start("publisher-token").await;
    std::fs::write(dir.path().join("api-ca.pem"), &api.ca_pem).unwrap();
    std::fs::write(dir.path().join("token"), "publisher-token\n").unwrap();
    let extra = format!(
        "[k8s_bundle]\nnamespace = \"{NS}\"\nconfig_map = \"{NAME}\"\nrefresh_interval = \"1s\"\napi_server = \"https://127.0.0.1:{}\"\nca_path = \"{}\"\ntoken_path = \"{}\"\n",
        api.port,
        dir.path().join("api-ca.pem").display(),
        dir.path().join("token").display()
    );
    // A CA that does not rotate during the test: any restore is the refresh's doing.
    let server = TestServer::start(
        &dir.path().join("server"),
        ServerOptions {
            extra_toml: extra,
            ..ServerOptions::default()
        },
    );
    let bundle = server.bundle_der();
    let published = within(Duration::from_secs(20), "bundle in the ConfigMap", || {
        api.config_map_data(NS, NAME, KEY)
    });
    assert_eq!(ders(&published), bundle);

    // A hand edit of the key is overwritten with the bundle again.
    assert!(api.edit_config_map(NS, NAME, KEY, "not a bundle"));
    assert_eq!(
        api.config_map_data(NS, NAME, KEY).as_deref(),
        Some("not a bundle")
    );
    let restored = within(Duration::from_secs(10), "edited ConfigMap restored", || {
        api.config_map_data(NS, NAME, KEY)
            .filter(|d| d != "not a bundle")
    });
    assert_eq!(
        ders(&restored),
        bundle,
        "the edit is replaced by the bundle"
    );

    // A deleted ConfigMap is created again.
    let posts_before = api
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.status == 201)
        .count();
    assert!(api.delete_config_map(NS, NAME));
    assert_eq!(api.config_map_data(NS, NAME, KEY), None);
    let recreated = within(
        Duration::from_secs(10),
        "deleted ConfigMap recreated",
        || api.config_map_data(NS, NAME, KEY),
    );
    assert_eq!(ders(&recreated), bundle);
    let posts_after = api
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.status == 201)
        .count();
    assert_eq!(posts_after, posts_before + 1, "recreated with one POST");
    assert_eq!(server.bundle_der(), bundle, "no bundle change was involved");
}

#[test]
fn a_bad_key_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::configure(
        dir.path(),
        ServerOptions {
            extra_toml: "[k8s_bundle]\nkey = \"a/b\"\n".into(),
            ..ServerOptions::default()
        },
    );
    let (ok, stderr) = server
        .run_until_exit(Duration::from_secs(20))
        .expect("server must exit");
    assert!(!ok);
    assert!(stderr.contains("k8s_bundle.key"), "{stderr}");
}
