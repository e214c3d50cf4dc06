use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

use super::*;

/// A P-256 key: the pair and its SubjectPublicKeyInfo.
fn key() -> (EcdsaKeyPair, Vec<u8>) {
    let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let point = kp.public_key().as_ref().to_vec();
    let jwk = json!({"kty": "EC", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])});
    (kp, to_spki(&jwk).unwrap())
}

fn jwk_of(spki: &[u8], kid: &str) -> Map<String, Value> {
    let mut jwk = from_spki(spki).unwrap();
    jwk.insert("kid".into(), kid.into());
    jwk.insert("alg".into(), "ES256".into());
    jwk
}

/// The endorsement of `new` (version `n`) by `prev` (version `n - 1`).
fn endorse(prev: &EcdsaKeyPair, n: u32, new_spki: &[u8]) -> String {
    let s = Statement {
        trust_domain: "example.org".into(),
        engine: "ledger".into(),
        key: "signing".into(),
        version: n,
        kid: format!("signing-v{n}"),
        jwk: jwk_of(new_spki, &format!("signing-v{n}")),
        previous_version: n - 1,
        previous_kid: format!("signing-v{}", n - 1),
        iat: 1_700_000_000 + i64::from(n),
    };
    let input = s.signing_input("ES256").unwrap();
    let sig = prev.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    compact(&input, sig.as_ref())
}

/// Six versions and the document publishing the five endorsements.
fn chain() -> (Vec<(EcdsaKeyPair, Vec<u8>)>, Value) {
    let keys: Vec<_> = (0..6).map(|_| key()).collect();
    let list: Vec<Value> = (2..=6u32)
        .map(|n| {
            let jws = endorse(&keys[n as usize - 2].0, n, &keys[n as usize - 1].1);
            json!({"key": "signing", "version": n, "kid": format!("signing-v{n}"), "state": "ENABLED", "jws": jws})
        })
        .collect();
    (keys, json!({"keys": [], "endorsements": list}))
}

fn err(doc: &Value, pinned: &[u8]) -> ChainError {
    verify_chain(doc, "signing", pinned).unwrap_err()
}

#[test]
fn a_pinned_first_version_reaches_the_sixth_and_verifies_its_signature() {
    let (keys, doc) = chain();
    let c = verify_chain(&doc, "signing", &keys[0].1).unwrap();
    let versions: Vec<u32> = c.path.iter().map(|s| s.version).collect();
    assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
    assert_eq!(c.path[5].kid, "signing-v6");
    assert_eq!(c.reached_spki, keys[5].1);
    assert_eq!(c.reached_alg, "ES256");
    let sig = keys[5].0.sign(&SystemRandom::new(), b"m").unwrap();
    assert!(verify_signature(
        &c.reached_spki,
        "ES256",
        b"m",
        sig.as_ref(),
        true
    ));
    assert!(!verify_signature(
        &c.reached_spki,
        "ES256",
        b"n",
        sig.as_ref(),
        true
    ));
    // A later pinned version starts there.
    let c = verify_chain(&doc, "signing", &keys[3].1).unwrap();
    assert_eq!(
        c.path.iter().map(|s| s.version).collect::<Vec<_>>(),
        [4, 5, 6]
    );
    assert_eq!(c.path[0].kid, "signing-v4");
    // Entry order in the document does not matter.
    let mut reversed = doc.clone();
    reversed["endorsements"].as_array_mut().unwrap().reverse();
    assert!(verify_chain(&reversed, "signing", &keys[0].1).is_ok());
}

#[test]
fn forged_links_are_rejected_naming_the_link() {
    let (keys, doc) = chain();
    let pinned = &keys[0].1;
    // An unrelated key re-signs the endorsement of v3.
    let (stranger, _) = key();
    let mut d = doc.clone();
    d["endorsements"][1]["jws"] = endorse(&stranger, 3, &keys[2].1).into();
    let e = err(&d, pinned);
    assert_eq!(e.at, "link v2 -> v3");
    assert!(
        e.reason.contains("signature does not verify with v2's key"),
        "{e}"
    );
    // A modified public key in the claims of v4 (the signature no longer covers it).
    let mut d = doc.clone();
    let jws = d["endorsements"][2]["jws"].as_str().unwrap().to_string();
    let parts: Vec<&str> = jws.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let (_, other) = key();
    claims["jwk"] = Value::Object(jwk_of(&other, "signing-v4"));
    claims["jwk_thumbprint"] = thumbprint(claims["jwk"].as_object().unwrap())
        .unwrap()
        .into();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        parts[2]
    );
    d["endorsements"][2]["jws"] = forged.into();
    assert_eq!(err(&d, pinned).at, "link v3 -> v4");
    // A skipped version: v4's endorsement left out.
    let mut d = doc.clone();
    d["endorsements"].as_array_mut().unwrap().remove(2);
    let e = err(&d, pinned);
    assert_eq!(e.at, "link v4 -> v5");
    assert!(e.reason.contains("v4's own endorsement is missing"), "{e}");
    // ... and so with a pinned version the chain names: v3 is pinned, v4 is not endorsed.
    let e = err(&d, &keys[2].1);
    assert_eq!(e.at, "link v4 -> v5");
    assert!(e.reason.contains("v4 has no endorsement"), "{e}");
    // Swapped order: the entries of v3 and v5 hold each other's endorsement.
    let mut d = doc.clone();
    let (a, b) = (
        d["endorsements"][1]["jws"].clone(),
        d["endorsements"][3]["jws"].clone(),
    );
    d["endorsements"][1]["jws"] = b;
    d["endorsements"][3]["jws"] = a;
    let e = err(&d, pinned);
    assert_eq!(e.at, "endorsement of v3");
    assert!(e.reason.contains("claims state signing v5"), "{e}");
    // A key that is no version of this chain.
    let (_, unrelated) = key();
    let e = err(&doc, &unrelated);
    assert_eq!(e.at, "link v1 -> v2");
    assert!(e.reason.contains("the pinned key"), "{e}");
    // A link endorsed by the right key but naming another Engine is refused too.
    let mut d = doc.clone();
    let s = Statement {
        trust_domain: "example.org".into(),
        engine: "other".into(),
        key: "signing".into(),
        version: 6,
        kid: "signing-v6".into(),
        jwk: jwk_of(&keys[5].1, "signing-v6"),
        previous_version: 5,
        previous_kid: "signing-v5".into(),
        iat: 1,
    };
    let input = s.signing_input("ES256").unwrap();
    let sig = keys[4]
        .0
        .sign(&SystemRandom::new(), input.as_bytes())
        .unwrap();
    d["endorsements"][4]["jws"] = compact(&input, sig.as_ref()).into();
    let e = err(&d, pinned);
    assert_eq!(e.at, "link v5 -> v6");
    assert!(e.reason.contains("engine other"), "{e}");
    // Not a document with endorsements.
    assert_eq!(err(&json!({"keys": []}), pinned).at, "document");
}

#[test]
fn the_thumbprint_is_rfc_7638() {
    // RFC 7638 section 3.1's example key and thumbprint.
    let jwk = json!({"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"});
    assert_eq!(
        thumbprint(jwk.as_object().unwrap()).unwrap(),
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    );
}

#[test]
fn an_r_s_signature_starting_with_0x30_verifies_where_der_is_allowed() {
    let (kp, spki) = key();
    let rng = SystemRandom::new();
    // About one r‖s signature in 256 begins with the byte a DER SEQUENCE begins with.
    let sig = (0..100_000)
        .map(|_| kp.sign(&rng, b"msg").unwrap().as_ref().to_vec())
        .find(|s| s[0] == 0x30)
        .expect("an r||s signature beginning with 0x30");
    assert!(verify_signature(&spki, "ES256", b"msg", &sig, true));
    assert!(verify_signature(&spki, "ES256", b"msg", &sig, false));
    assert!(!verify_signature(&spki, "ES256", b"other", &sig, true));
    // And DER, where allowed only.
    let der = EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        kp.to_pkcs8v1().unwrap().as_ref(),
    )
    .unwrap()
    .sign(&rng, b"msg")
    .unwrap();
    assert!(verify_signature(&spki, "ES256", b"msg", der.as_ref(), true));
    assert!(!verify_signature(
        &spki,
        "ES256",
        b"msg",
        der.as_ref(),
        false
    ));
}
