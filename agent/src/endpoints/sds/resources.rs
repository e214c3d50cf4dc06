//! What each SDS resource name resolves to, by SPIRE's naming rules: `default` (the workload's
//! first SVID), a SPIFFE ID (that SVID), `ROOTCA` (the local bundle), `ALL` (every bundle the
//! workload may see, in one SPIFFE validator config) and a trust domain ID (that bundle).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use continuity_attestors::Selector;
use continuity_common::x509::pem_encode;
use continuity_proto::envoy::config::core::v3::{
    DataSource, Node, TypedExtensionConfig, data_source, node,
};
use continuity_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config::TrustDomain,
};
use prost::Message;
use tonic::Status;

use crate::manager::cache::{Identity, Snapshot};

/// The resource name of the workload's default (first) SVID.
pub const DEFAULT_SVID: &str = "default";
/// The resource name of the local trust domain's bundle.
pub const ROOT_CA: &str = "ROOTCA";
/// The resource name of every bundle the workload may see, as one SPIFFE validator config.
pub const ALL_BUNDLES: &str = "ALL";
/// The type URL of every SDS resource.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The type URL of Envoy's SPIFFE certificate validator config.
const SPIFFE_VALIDATOR_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
/// The name of Envoy's SPIFFE certificate validator extension.
const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
/// Node metadata key that turns the SPIFFE validator off for one Envoy (SPIRE's key).
const DISABLE_SPIFFE_KEY: &str = "disable_spiffe_cert_validation";

/// What one workload may see at one moment: the bundles and its identities (entry order).
#[derive(Debug, Clone)]
pub struct View {
    /// `spiffe://<td>` of the local trust domain.
    local: String,
    /// Trust domain ID → concatenated DER CA certificates (empty bundles left out).
    bundles: BTreeMap<String, Bytes>,
    /// The workload's identities; the first is its default SVID.
    identities: Vec<Arc<Identity>>,
}

/// What changes when something a workload may see changes (bundle bytes, SVID generations).
pub type ViewKey = (BTreeMap<String, Bytes>, Vec<u64>);

impl View {
    /// The view of a workload with `selectors` on `snap`.
    pub fn new(snap: &Snapshot, selectors: &HashSet<Selector>) -> Self {
        let identities = snap.served(selectors);
        Self {
            local: snap.bundle.trust_domain_id.clone(),
            bundles: visible_bundles(snap, &identities),
            identities,
        }
    }

    /// The key that changes whenever a resource of this view may have changed.
    pub fn key(&self) -> ViewKey {
        (
            self.bundles.clone(),
            self.identities.iter().map(|i| i.generation).collect(),
        )
    }

    /// The names an empty (wildcard) request resolves to: every bundle by trust domain ID and
    /// every SVID by SPIFFE ID, as SPIRE answers one.
    pub fn all_names(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        self.bundles
            .keys()
            .chain(self.identities.iter().map(|i| &i.spiffe_id))
            .filter(|n| seen.insert(n.as_str()))
            .cloned()
            .collect()
    }

    /// The secret `name` resolves to; None when this workload has no such resource.
    pub fn resolve(&self, name: &str, spiffe: bool) -> Result<Option<Secret>, Status> {
        if name == DEFAULT_SVID {
            return Ok(self.identities.first().map(|i| tls_secret(name, i)));
        }
        if name == ROOT_CA {
            return self.validation(name, &self.local, spiffe).map(Some);
        }
        if name == ALL_BUNDLES {
            if !spiffe {
                return Err(Status::internal(
                    "unable to use \"SPIFFE validator\" on Envoy below 1.17",
                ));
            }
            return Ok(Some(self.all_bundles(name)));
        }
        if self.bundles.contains_key(name) {
            return self.validation(name, name, spiffe).map(Some);
        }
        Ok(self
            .identities
            .iter()
            .find(|i| i.spiffe_id == name)
            .map(|i| tls_secret(name, i)))
    }

    /// A per-resource version: the SVID's generation, or a digest of a (public) bundle secret.
    pub fn version_of(&self, name: &str, secret: &Secret) -> String {
        if let Some(secret::Type::TlsCertificate(_)) = secret.r#type {
            let id = if name == DEFAULT_SVID {
                self.identities.first()
            } else {
                self.identities.iter().find(|i| i.spiffe_id == name)
            };
            if let Some(i) = id {
                return format!("svid-{}", i.generation);
            }
        }
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &secret.encode_to_vec());
        hex::encode(&digest.as_ref()[..12])
    }

    /// One trust domain's bundle: a SPIFFE validator config, or `trusted_ca` when the SPIFFE
    /// validator is off (NotFound when the workload may not see that bundle).
    fn validation(&self, name: &str, td: &str, spiffe: bool) -> Result<Secret, Status> {
        let Some(der) = self.bundles.get(td) else {
            return Err(Status::not_found(format!(
                "no bundle found for trust domain: {td:?}"
            )));
        };
        let context = if spiffe {
            spiffe_context(std::iter::once((td, der)))
        } else {
            CertificateValidationContext {
                trusted_ca: Some(inline(pem_chain(der).into_bytes())),
                custom_validator_config: None,
            }
        };
        Ok(validation_secret(name, context))
    }

    /// Every visible bundle in one SPIFFE validator config, ordered by trust domain name.
    fn all_bundles(&self, name: &str) -> Secret {
        let context = spiffe_context(self.bundles.iter().map(|(td, der)| (td.as_str(), der)));
        validation_secret(name, context)
    }
}

/// The bundles a workload may see, by trust domain ID: the local bundle and the foreign
/// bundles its `identities` federate with (exactly those the Workload API would send it);
/// everything downstream (names, `ALL`, versions) is driven by this map.
fn visible_bundles(snap: &Snapshot, identities: &[Arc<Identity>]) -> BTreeMap<String, Bytes> {
    let b = &snap.bundle;
    let mut out: BTreeMap<String, Bytes> = snap
        .federated_for(identities)
        .into_iter()
        .filter(|(_, f)| !f.x509.is_empty())
        .map(|(td, f)| (td, f.x509.clone()))
        .collect();
    if !b.x509.is_empty() && !b.trust_domain_id.is_empty() {
        out.insert(b.trust_domain_id.clone(), b.x509.clone());
    }
    out
}

/// Whether to describe bundles with Envoy's SPIFFE validator: yes, unless the node's metadata
/// sets `disable_spiffe_cert_validation` or its build is older than Envoy 1.18 (as SPIRE).
pub fn use_spiffe_validator(node: Option<&Node>) -> bool {
    let Some(node) = node else {
        return true;
    };
    let disabled = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(DISABLE_SPIFFE_KEY))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::BoolValue(b)) => Some(*b),
            Some(prost_types::value::Kind::StringValue(s)) => parse_go_bool(s),
            _ => None,
        })
        .unwrap_or(false);
    let supported = match &node.user_agent_version_type {
        Some(node::UserAgentVersionType::UserAgentBuildVersion(b)) => {
            let (major, minor) = b
                .version
                .as_ref()
                .map_or((0, 0), |v| (v.major_number, v.minor_number));
            (major == 1 && minor > 17) || major > 1
        }
        _ => true,
    };
    supported && !disabled
}

/// A boolean as Go's `strconv.ParseBool` reads one (what SPIRE accepts in node metadata).
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A validation context holding Envoy's SPIFFE validator over `bundles` (td ID → DER).
fn spiffe_context<'a>(
    bundles: impl Iterator<Item = (&'a str, &'a Bytes)>,
) -> CertificateValidationContext {
    let mut trust_domains: Vec<TrustDomain> = bundles
        .map(|(td, der)| TrustDomain {
            name: td.trim_start_matches("spiffe://").to_string(),
            trust_bundle: Some(inline(pem_chain(der).into_bytes())),
            workload_trust_domain: String::new(),
        })
        .collect();
    trust_domains.sort_by(|a, b| a.name.cmp(&b.name));
    let config = SpiffeCertValidatorConfig {
        trust_domains,
        trust_bundles: None,
    };
    CertificateValidationContext {
        trusted_ca: None,
        custom_validator_config: Some(TypedExtensionConfig {
            name: SPIFFE_VALIDATOR.to_string(),
            typed_config: Some(prost_types::Any {
                type_url: SPIFFE_VALIDATOR_TYPE_URL.to_string(),
                value: config.encode_to_vec(),
            }),
        }),
    }
}

fn validation_secret(name: &str, context: CertificateValidationContext) -> Secret {
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::ValidationContext(context)),
    }
}

/// An SVID as Envoy's TlsCertificate: the chain and the PKCS#8 key, both PEM, inline.
fn tls_secret(name: &str, id: &Identity) -> Secret {
    let key = pem_encode("PRIVATE KEY", id.key.expose());
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(pem_chain(&id.x509_svid).into_bytes())),
            private_key: Some(inline(key.into_bytes())),
        })),
    }
}

/// A secret packed as the `Any` a DiscoveryResponse carries.
pub fn to_any(secret: &Secret) -> prost_types::Any {
    prost_types::Any {
        type_url: SECRET_TYPE_URL.to_string(),
        value: secret.encode_to_vec(),
    }
}

fn inline(bytes: Vec<u8>) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
    }
}

/// A DER concatenation as PEM certificates (stops at the first malformed one; the cache only
/// holds chains that parsed).
fn pem_chain(concat: &[u8]) -> String {
    let mut out = String::new();
    let mut rest = concat;
    while let Ok((_, _, tail)) = continuity_common::der::read_tlv(rest) {
        out.push_str(&pem_encode("CERTIFICATE", &rest[..rest.len() - tail.len()]));
        rest = tail;
        if rest.is_empty() {
            break;
        }
    }
    out
}
