//! The bit of HPACK (RFC 7541) the adapter writes itself: literal fields, never indexed, so
//! rewritten blocks leave the dynamic table h2 keeps untouched.

/// Whether h2 would accept this `:authority`.
pub(super) fn valid_authority(v: &[u8]) -> bool {
    http::uri::Authority::try_from(v).is_ok()
}

/// HPACK integer with an `prefix`-bit prefix, first byte OR-ed with `mask`.
pub(super) fn encode_int(out: &mut Vec<u8>, mut value: usize, prefix: u8, mask: u8) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(mask | value as u8);
        return;
    }
    out.push(mask | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// "Literal Header Field without Indexing — New Name" (RFC 7541 §6.2.2), no Huffman.
pub(super) fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_int(out, name.len(), 7, 0);
    out.extend_from_slice(name);
    encode_int(out, value.len(), 7, 0);
    out.extend_from_slice(value);
}
