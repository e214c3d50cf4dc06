//! The `ClusterSPIFFEID` resource and pod objects as the controller reads them, label
//! selectors, and the ID templates (SPIRE controller-manager's syntax, a fixed subset):
//! `{{ .TrustDomain }}`, `{{ .ClusterName }}`, `{{ .PodMeta.Name }}`, `{{ .PodMeta.Namespace }}`,
//! `{{ .PodMeta.UID }}`, `{{ .PodSpec.ServiceAccountName }}`, `{{ .PodSpec.NodeName }}` and
//! `{{ index .PodMeta.Labels "KEY" }}`. Anything else in `{{ }}` is an error.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Object metadata (the fields the controller uses).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectMeta {
    /// Name.
    pub name: String,
    /// Namespace (empty for cluster-scoped objects).
    pub namespace: String,
    /// UID.
    pub uid: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A pod (the fields the controller uses).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Pod {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: PodSpec,
    /// Status.
    pub status: PodStatus,
}

/// `Pod.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PodSpec {
    /// Service account.
    pub service_account_name: String,
    /// Node it is scheduled on (empty: not scheduled).
    pub node_name: String,
}

/// `Pod.status`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PodStatus {
    /// Pending, Running, Succeeded, Failed, Unknown.
    pub phase: String,
}

impl Pod {
    /// Whether the pod can still run a workload: scheduled and not finished.
    pub fn is_live(&self) -> bool {
        !self.metadata.uid.is_empty()
            && !self.spec.node_name.is_empty()
            && !matches!(self.status.phase.as_str(), "Succeeded" | "Failed")
    }
}

/// A namespace (its metadata only).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Namespace {
    /// Metadata.
    pub metadata: ObjectMeta,
}

/// A `ClusterSPIFFEID` resource.
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterSpiffeId {
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: ClusterSpiffeIdSpec,
}

/// `ClusterSPIFFEID.spec`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpiffeIdSpec {
    /// Template of the SPIFFE ID.
    #[serde(rename = "spiffeIDTemplate")]
    pub spiffe_id_template: String,
    /// Pods it applies to (absent: every pod).
    #[serde(default)]
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces it applies to (absent: every namespace).
    #[serde(default)]
    pub namespace_selector: Option<LabelSelector>,
    /// Engine the entries are bound to.
    #[serde(default)]
    pub engine: Option<String>,
    /// Templates of DNS SANs.
    #[serde(default)]
    pub dns_name_templates: Vec<String>,
}

/// A Kubernetes label selector: all of `matchLabels` and all of `matchExpressions` must hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LabelSelector {
    /// Labels that must be present with these values.
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements.
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` requirement.
#[derive(Debug, Clone, Deserialize)]
pub struct Requirement {
    /// Label key.
    pub key: String,
    /// In | NotIn | Exists | DoesNotExist.
    pub operator: String,
    /// Values for In and NotIn.
    #[serde(default)]
    pub values: Vec<String>,
}

impl LabelSelector {
    /// Whether `labels` satisfy the selector; an unknown operator matches nothing.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let plain = self
            .match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v));
        plain
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => value.is_some_and(|v| r.values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !r.values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }
}

/// What a template is rendered against.
pub struct Context<'a> {
    /// The server's trust domain.
    pub trust_domain: &'a str,
    /// `[controller] cluster_name`.
    pub cluster_name: &'a str,
    /// The pod.
    pub pod: &'a Pod,
}

/// Renders `template`; the error names the part that could not be rendered.
pub fn render(template: &str, ctx: &Context<'_>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unclosed {{{{ in {template:?}"))?;
        out.push_str(&field(after[..end].trim(), ctx)?);
        rest = &after[end + 2..];
    }
    if rest.contains("}}") {
        return Err(format!("unopened }}}} in {template:?}"));
    }
    out.push_str(rest);
    Ok(out)
}

/// The value of one `{{ }}` expression.
fn field(expr: &str, ctx: &Context<'_>) -> Result<String, String> {
    let pod = ctx.pod;
    let v = match expr {
        ".TrustDomain" => ctx.trust_domain,
        ".ClusterName" => ctx.cluster_name,
        ".PodMeta.Name" => &pod.metadata.name,
        ".PodMeta.Namespace" => &pod.metadata.namespace,
        ".PodMeta.UID" => &pod.metadata.uid,
        ".PodSpec.ServiceAccountName" => &pod.spec.service_account_name,
        ".PodSpec.NodeName" => &pod.spec.node_name,
        other => {
            let key = other
                .strip_prefix("index .PodMeta.Labels ")
                .map(str::trim)
                .and_then(|k| k.strip_prefix('"')?.strip_suffix('"'))
                .ok_or_else(|| format!("unknown template expression {{{{ {other} }}}}"))?;
            pod.metadata
                .labels
                .get(key)
                .ok_or_else(|| format!("pod has no label {key:?}"))?
        }
    };
    if v.is_empty() {
        return Err(format!("{{{{ {expr} }}}} is empty for this pod"));
    }
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1",
                         "labels": {"app": "web"}},
            "spec": {"serviceAccountName": "web-sa", "nodeName": "node-a"},
            "status": {"phase": "Running"}
        }))
        .unwrap()
    }

    #[test]
    fn templates_render_pod_fields_and_labels() {
        let p = pod();
        let ctx = Context {
            trust_domain: "example.org",
            cluster_name: "demo",
            pod: &p,
        };
        let t = "spiffe://{{ .TrustDomain }}/ns/{{.PodMeta.Namespace}}/sa/{{ .PodSpec.ServiceAccountName }}/{{ index .PodMeta.Labels \"app\" }}/{{ .ClusterName }}";
        assert_eq!(
            render(t, &ctx).unwrap(),
            "spiffe://example.org/ns/shop/sa/web-sa/web/demo"
        );
        assert!(
            render("{{ .PodMeta.Secret }}", &ctx)
                .unwrap_err()
                .contains("unknown")
        );
        assert!(render("{{ index .PodMeta.Labels \"x\" }}", &ctx).is_err());
        assert!(render("a{{ .PodMeta.Name", &ctx).is_err());
        assert!(render("a }}", &ctx).is_err());
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())]
            .into_iter()
            .collect();
        let sel = |j: serde_json::Value| serde_json::from_value::<LabelSelector>(j).unwrap();
        assert!(sel(serde_json::json!({"matchLabels": {"app": "web"}})).matches(&labels));
        assert!(!sel(serde_json::json!({"matchLabels": {"app": "db"}})).matches(&labels));
        let expr = |op: &str, v: &[&str]| {
            sel(serde_json::json!({"matchExpressions": [{"key": "app", "operator": op, "values": v}]}))
                .matches(&labels)
        };
        assert!(expr("In", &["web", "x"]));
        assert!(!expr("NotIn", &["web"]));
        assert!(expr("Exists", &[]));
        assert!(!expr("DoesNotExist", &[]));
        assert!(!expr("Bogus", &[]));
    }

    #[test]
    fn finished_or_unscheduled_pods_are_not_live() {
        let mut p = pod();
        assert!(p.is_live());
        p.status.phase = "Succeeded".into();
        assert!(!p.is_live());
        let mut p = pod();
        p.spec.node_name.clear();
        assert!(!p.is_live());
    }
}
