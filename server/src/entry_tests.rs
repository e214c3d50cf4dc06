use super::*;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn request() -> EntryRequest {
    EntryRequest {
        spiffe_id: "spiffe://example.org/web".into(),
        parent_id: "spiffe://example.org/continuity/agent/join_token/abc".into(),
        selectors: vec![("unix".into(), "uid:1000".into())],
        ..Default::default()
    }
}

/// The error message of validating `r`, with every Engine but `vault` missing.
fn refused(r: EntryRequest) -> String {
    r.validate(&td(), |n| n == "vault").unwrap_err().to_string()
}

#[test]
fn a_valid_request_becomes_an_entry_with_parsed_ids() {
    let mut r = request();
    r.engine = "vault".into();
    r.dns_names = vec!["*.web.example.org".into()];
    let e = r.validate(&td(), |n| n == "vault").unwrap();
    assert_eq!(e.spiffe_id.as_str(), "spiffe://example.org/web");
    assert_eq!(e.parent_id.path(), "/continuity/agent/join_token/abc");
    assert_eq!(e.selectors, vec![Selector::raw("unix", "uid:1000")]);
    assert_eq!(e.engine.as_deref(), Some("vault"));
    assert_eq!((e.revision, e.created_at), (0, 0));
}

#[test]
fn ids_must_parse_and_be_in_the_trust_domain() {
    let mut r = request();
    r.spiffe_id = "http://example.org/web".into();
    assert_eq!(
        refused(r),
        "spiffe_id: \"http://example.org/web\" is not a SPIFFE ID: it must start with \"spiffe://\""
    );
    let mut r = request();
    r.parent_id = "spiffe://other.org/agent".into();
    assert_eq!(
        refused(r),
        "parent_id: spiffe://other.org/agent is not in trust domain example.org"
    );
}

#[test]
fn workload_ids_need_a_path_outside_the_reserved_one() {
    let mut r = request();
    r.spiffe_id = "spiffe://example.org".into();
    assert_eq!(refused(r), "spiffe_id: a workload ID needs a path");
    let mut r = request();
    r.spiffe_id = "spiffe://example.org/continuity/agent/x".into();
    assert_eq!(
        refused(r),
        "spiffe_id: spiffe://example.org/continuity/agent/x is under /continuity/, which is reserved for agents and the server"
    );
}

#[test]
fn selectors_ttls_dns_names_and_federation_are_checked() {
    let mut r = request();
    r.selectors.clear();
    assert_eq!(
        refused(r),
        "at least one selector is required (e.g. unix:uid:1000)"
    );
    let mut r = request();
    r.selectors = vec![("unix".into(), String::new())];
    assert!(matches!(
        r.validate(&td(), |_| true),
        Err(EntryError::Selector(_))
    ));
    let mut r = request();
    r.jwt_svid_ttl = -1;
    assert_eq!(refused(r), "SVID TTLs must not be negative");
    for bad in ["", "-a.example.org", "a..b", "a.*.b", "under_score.org"] {
        let mut r = request();
        r.dns_names = vec!["ok.example.org".into(), bad.into()];
        assert_eq!(
            refused(r),
            format!("dns_name {bad:?} is not a valid DNS name")
        );
    }
    let mut r = request();
    r.federates_with = vec!["Other.org".into()];
    assert!(refused(r).starts_with("federates_with: "));
}

#[test]
fn a_missing_engine_is_named() {
    let mut r = request();
    r.engine = "ledger".into();
    let e = r.validate(&td(), |_| false).unwrap_err();
    assert!(matches!(e, EntryError::NoSuchEngine(_)));
    assert_eq!(
        e.to_string(),
        "engine \"ledger\" does not exist; create it with `engine create`"
    );
}

#[test]
fn the_first_broken_rule_is_the_error() {
    let mut r = request();
    r.parent_id = "bad".into();
    r.selectors.clear();
    r.engine = "ledger".into();
    assert!(refused(r).starts_with("parent_id: "));
}

#[test]
fn same_registration_ignores_selector_order_and_id() {
    let mut r = request();
    r.selectors.push(("unix".into(), "gid:1000".into()));
    let a = r.clone().validate(&td(), |_| true).unwrap();
    let mut b = a.clone();
    b.id = "other".into();
    b.selectors.reverse();
    assert!(a.same_registration(&b));
    b.selectors.pop();
    assert!(!a.same_registration(&b));
}

#[test]
fn filters_match_on_every_given_field() {
    let e = request().validate(&td(), |_| true).unwrap();
    assert!(EntryFilter::default().matches(&e));
    let by_selector = EntryFilter {
        selectors: vec![Selector::raw("unix", "uid:1000")],
        ..Default::default()
    };
    assert!(by_selector.matches(&e));
    let other_selector = EntryFilter {
        selectors: vec![Selector::raw("unix", "uid:0")],
        ..Default::default()
    };
    assert!(!other_selector.matches(&e));
    let by_parent = EntryFilter {
        parent_id: "spiffe://example.org/elsewhere".into(),
        ..Default::default()
    };
    assert!(!by_parent.matches(&e));
}
