//! What `engine key import` reads from the operator's files before anything is kept: the
//! `--public-key` SubjectPublicKeyInfo, checked for each key type and then used to verify the
//! token's proof signature, and the AES-KWP part of a wrapped blob (RFC 5649) once its RSA-OAEP
//! part is open. No panic; an accepted public key is the bit string the input carried and
//! survives the server's own re-encoding (what the version then publishes); an unwrapped
//! material is shorter than its wrapping and wraps back to exactly the input.
#![no_main]

use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrapPadded};
use continuity_server::keys::import_wrap::{spki_raw, unwrap_padded, verifies};
use continuity_server::keys::{KeyType, spki_of};
use libfuzzer_sys::fuzz_target;

/// The ephemeral AES-256 key the seeds' KWP parts are wrapped under (fuzz/seeds/make_seeds.py).
const KEK: [u8; 32] = [0x42; 32];

const TYPES: [KeyType; 5] = [
    KeyType::EcP256,
    KeyType::EcP384,
    KeyType::Rsa2048,
    KeyType::Rsa3072,
    KeyType::Rsa4096,
];

/// The public-key file, and a proof signature checked with what it yields.
fn public_key(kt: KeyType, input: &[u8]) {
    let Ok(raw) = spki_raw(input, kt) else {
        return;
    };
    assert!(
        raw.is_empty() || input.windows(raw.len()).any(|w| w == raw.as_slice()),
        "the raw key is not from the input"
    );
    let again = spki_raw(&spki_of(kt, &raw), kt).expect("the server's own encoding is accepted");
    assert_eq!(again, raw, "re-encoding changed the key");
    // Whatever the key holds, checking a signature must not panic (the signature here is the
    // input's tail: never a valid one for an honest key).
    let sig = &input[input.len().saturating_sub(512)..];
    let _ = verifies(kt, &raw, b"continuity import proof", sig);
}

/// The AES-KWP part under the ephemeral key.
fn kwp(input: &[u8]) {
    let Ok(material) = unwrap_padded(&KEK, input) else {
        return;
    };
    assert!(material.len() + 8 <= input.len(), "unwrapped more than was wrapped");
    let kek = AesKek::new(&AES_256, &KEK).expect("an AES-256 KEK");
    let mut out = vec![0u8; material.len() + 16];
    let wrapped = kek
        .wrap_with_padding(&material, &mut out)
        .expect("what unwraps wraps again");
    assert_eq!(&*wrapped, input, "RFC 5649 is deterministic: the wrap must be the input");
}

fuzz_target!(|input: &[u8]| {
    let Some((&pick, rest)) = input.split_first() else {
        return;
    };
    match pick % 3 {
        0 => public_key(TYPES[usize::from(pick / 3) % TYPES.len()], rest),
        1 => kwp(rest),
        // A KEK of the input's choosing (any length): refused or used, never a panic.
        _ => {
            let (kek, body) = rest.split_at(rest.len().min(usize::from(pick / 3) % 48));
            let _ = unwrap_padded(kek, body);
        }
    }
});
