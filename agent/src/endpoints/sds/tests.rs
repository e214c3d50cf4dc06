use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use continuity_attestors::Selector;
use continuity_common::secret::SecretBytes;
use continuity_proto::envoy::config::core::v3::{BuildVersion, Node, node};
use continuity_proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use continuity_proto::envoy::r#type::v3::SemanticVersion;
use prost::Message;
use tonic::Code;

use super::resources::use_spiffe_validator;
use super::*;
use crate::manager::cache::{Identity, PublishedBundle, Snapshot};

fn selector() -> Selector {
    Selector {
        kind: "unix".into(),
        value: "uid:1000".into(),
    }
}

fn identity(id: &str, generation: u64) -> Arc<Identity> {
    Arc::new(Identity {
        entry_id: format!("entry-{id}"),
        spiffe_id: id.into(),
        selectors: vec![selector()],
        hint: String::new(),
        // Two certificates' worth of DER framing (a SEQUENCE each).
        x509_svid: Bytes::from_static(&[0x30, 0x01, 0x01, 0x30, 0x01, 0x02]),
        key: SecretBytes::new(vec![0x30, 0x01, 0x09]),
        expires_at: 0,
        generation,
        created_at: 0,
        engine: None,
    })
}

fn snapshot(ids: Vec<Arc<Identity>>) -> Snapshot {
    Snapshot {
        bundle: Arc::new(PublishedBundle {
            sequence: 1,
            trust_domain_id: "spiffe://example.org".into(),
            x509: Bytes::from_static(&[0x30, 0x01, 0x07]),
            ..Default::default()
        }),
        identities: ids,
        engine_jwks: Arc::default(),
    }
}

fn view(ids: Vec<Arc<Identity>>) -> View {
    View::new(&snapshot(ids), &HashSet::from([selector()]))
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

fn decoded(any: &[prost_types::Any]) -> Vec<Secret> {
    any.iter()
        .map(|a| Secret::decode(a.value.as_slice()).unwrap())
        .collect()
}

#[test]
fn default_is_the_first_identity_and_ids_name_their_own() {
    let v = view(vec![
        identity("spiffe://example.org/a", 1),
        identity("spiffe://example.org/b", 2),
    ]);
    let got = decoded(&answer(&v, &names(&["default", "spiffe://example.org/b"]), true).unwrap());
    assert_eq!(got.len(), 2);
    for s in &got {
        let Some(secret::Type::TlsCertificate(t)) = &s.r#type else {
            panic!("{}: not a TlsCertificate", s.name);
        };
        assert!(t.certificate_chain.is_some() && t.private_key.is_some());
    }
    assert_eq!(v.version_of("default", &got[0]), "svid-1");
    assert_eq!(v.version_of("spiffe://example.org/b", &got[1]), "svid-2");
}

#[test]
fn unknown_names_are_refused_together_and_duplicates_answered_once() {
    let v = view(vec![identity("spiffe://example.org/a", 1)]);
    let err = answer(&v, &names(&["zz", "default", "spiffe://other.org"]), true).unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains(r#"["spiffe://other.org", "zz"]"#),
        "{err}"
    );
    let got = answer(&v, &names(&["ROOTCA", "ROOTCA", ""]), true).unwrap();
    assert_eq!(got.len(), 1);
}

#[test]
fn all_needs_the_spiffe_validator_and_a_workload_without_ids_gets_bundles() {
    let v = view(vec![]);
    assert_eq!(
        answer(&v, &names(&["ALL"]), false).unwrap_err().code(),
        Code::Internal
    );
    assert_eq!(
        answer(&v, &names(&["ALL", "ROOTCA"]), true).unwrap().len(),
        2
    );
    assert_eq!(v.all_names(), ["spiffe://example.org"]);
    assert_eq!(
        answer(&v, &names(&["default"]), true).unwrap_err().code(),
        Code::InvalidArgument
    );
}

fn node_with(metadata: Option<prost_types::Value>, version: Option<(u32, u32)>) -> Node {
    Node {
        metadata: metadata.map(|v| prost_types::Struct {
            fields: BTreeMap::from([("disable_spiffe_cert_validation".to_string(), v)]),
        }),
        user_agent_version_type: version.map(|(major, minor)| {
            node::UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
                version: Some(SemanticVersion {
                    major_number: major,
                    minor_number: minor,
                    patch: 0,
                }),
                metadata: None,
            })
        }),
        ..Default::default()
    }
}

#[test]
fn the_spiffe_validator_is_used_unless_disabled_or_envoy_is_too_old() {
    use prost_types::value::Kind;
    let val = |k| Some(prost_types::Value { kind: Some(k) });
    assert!(use_spiffe_validator(None));
    assert!(use_spiffe_validator(Some(&node_with(None, None))));
    assert!(!use_spiffe_validator(Some(&node_with(
        val(Kind::BoolValue(true)),
        None
    ))));
    assert!(!use_spiffe_validator(Some(&node_with(
        val(Kind::StringValue("T".into())),
        None
    ))));
    assert!(use_spiffe_validator(Some(&node_with(
        val(Kind::StringValue("false".into())),
        None
    ))));
    // A value Go's ParseBool refuses is ignored, as SPIRE does.
    assert!(use_spiffe_validator(Some(&node_with(
        val(Kind::StringValue("yes".into())),
        None
    ))));
    assert!(use_spiffe_validator(Some(&node_with(
        val(Kind::NumberValue(1.0)),
        None
    ))));
    assert!(!use_spiffe_validator(Some(&node_with(None, Some((1, 17))))));
    assert!(use_spiffe_validator(Some(&node_with(None, Some((1, 18))))));
    assert!(use_spiffe_validator(Some(&node_with(None, Some((2, 0))))));
}

#[test]
fn type_urls_and_name_counts_are_checked() {
    assert!(check_type_url("").is_ok());
    assert!(check_type_url(SECRET_TYPE_URL).is_ok());
    assert_eq!(
        check_type_url("type.googleapis.com/envoy.config.cluster.v3.Cluster")
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert!(check_names(MAX_RESOURCE_NAMES).is_ok());
    assert!(check_names(MAX_RESOURCE_NAMES + 1).is_err());
}
