//! SPIFFE IDs, trust domains and selectors as entries, tokens and certificates carry them:
//! no panic, and what parses prints back to itself and parses again to the same value.
#![no_main]

use continuity_attestors::Selector;
use continuity_common::{SpiffeId, TrustDomain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::new(s) {
        assert_eq!(id.to_string(), s);
        assert_eq!(SpiffeId::new(id.as_str()).as_ref(), Ok(&id));
        let td = id.trust_domain();
        assert_eq!(format!("spiffe://{}{}", td.name(), id.path()), s);
        assert_eq!(td.id(id.path()).as_ref(), Ok(&id));
        assert_eq!(TrustDomain::new(td.name()).as_ref(), Ok(&td));
        assert!(id.path().is_empty() || id.path().starts_with('/'));
    }
    if let Ok(td) = TrustDomain::new(s) {
        assert_eq!(TrustDomain::new(td.name()).as_ref(), Ok(&td));
        assert_eq!(TrustDomain::new(&td.id_string()).as_ref(), Ok(&td));
        assert_eq!(
            SpiffeId::new(&td.id_string()).map(|i| i.trust_domain()),
            Ok(td)
        );
    }
    if let Ok(sel) = s.parse::<Selector>() {
        assert_eq!(sel.to_string(), s);
        assert_eq!(sel.to_string().parse::<Selector>().as_ref(), Ok(&sel));
        assert_eq!(Selector::new(&sel.kind, &sel.value).as_ref(), Ok(&sel));
    }
    // The two-part form: the first line is the type, the rest the value.
    if let Some((kind, value)) = s.split_once('\n')
        && let Ok(sel) = Selector::new(kind, value)
    {
        assert_eq!((sel.kind.as_str(), sel.value.as_str()), (kind, value));
        // Only types without ':' print back unambiguously.
        if !kind.contains(':') {
            assert_eq!(sel.to_string().parse::<Selector>().as_ref(), Ok(&sel));
        }
    }
});
