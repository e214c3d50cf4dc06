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

/// RFC 7541 Appendix A: name and value lengths of the static table entries 1..=61, for the
/// header-list size of indexed fields.
const STATIC_SIZES: [(u8, u8); 61] = [
    (10, 0),  // :authority
    (7, 3),   // :method GET
    (7, 4),   // :method POST
    (5, 1),   // :path /
    (5, 11),  // :path /index.html
    (7, 4),   // :scheme http
    (7, 5),   // :scheme https
    (7, 3),   // :status 200
    (7, 3),   // :status 204
    (7, 3),   // :status 206
    (7, 3),   // :status 304
    (7, 3),   // :status 400
    (7, 3),   // :status 404
    (7, 3),   // :status 500
    (14, 0),  // accept-charset
    (15, 13), // accept-encoding gzip, deflate
    (15, 0),  // accept-language
    (13, 0),  // accept-ranges
    (6, 0),   // accept
    (27, 0),  // access-control-allow-origin
    (3, 0),   // age
    (5, 0),   // allow
    (13, 0),  // authorization
    (13, 0),  // cache-control
    (19, 0),  // content-disposition
    (16, 0),  // content-encoding
    (16, 0),  // content-language
    (14, 0),  // content-length
    (16, 0),  // content-location
    (13, 0),  // content-range
    (12, 0),  // content-type
    (6, 0),   // cookie
    (4, 0),   // date
    (4, 0),   // etag
    (6, 0),   // expect
    (7, 0),   // expires
    (4, 0),   // from
    (4, 0),   // host
    (8, 0),   // if-match
    (17, 0),  // if-modified-since
    (13, 0),  // if-none-match
    (8, 0),   // if-range
    (19, 0),  // if-unmodified-since
    (13, 0),  // last-modified
    (4, 0),   // link
    (8, 0),   // location
    (12, 0),  // max-forwards
    (18, 0),  // proxy-authenticate
    (19, 0),  // proxy-authorization
    (5, 0),   // range
    (7, 0),   // referer
    (7, 0),   // refresh
    (11, 0),  // retry-after
    (6, 0),   // server
    (10, 0),  // set-cookie
    (25, 0),  // strict-transport-security
    (17, 0),  // transfer-encoding
    (10, 0),  // user-agent
    (4, 0),   // vary
    (3, 0),   // via
    (16, 0),  // www-authenticate
];

/// `:authority` Huffman-coded (RFC 7541 Appendix B), padded with the EOS prefix: a prefix code
/// with fixed padding encodes a string one way only, so a Huffman-coded name is `:authority`
/// exactly when its bytes are these.
pub(super) const HUFFMAN_AUTHORITY: [u8; 8] = [0xb8, 0x3b, 0x53, 0x39, 0xec, 0x32, 0x7d, 0x7f];

/// What a quick look at the first header block of a connection decided.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum FirstBlock {
    /// Every `:authority` in it is one h2 accepts, and the block is within the header-list
    /// budget: the connection can pass through untouched.
    Acceptable,
    /// Anything else (an authority h2 refuses, a size update, a dynamic-table eviction, a
    /// budget that an upper bound cannot clear, malformed input): decode it fully.
    Decode,
}

/// A field as the scan sees it: its decoded size (an upper bound for Huffman strings) and
/// whether it is an `:authority` h2 would refuse.
#[derive(Clone, Copy)]
struct Seen {
    size: usize,
    authority: Option<bool>,
}

/// Decides, without building a decoder, whether a connection's first header block may pass
/// through: its fields are walked once (RFC 7541 §6), only an `:authority` value is
/// Huffman-decoded, and sizes of other Huffman strings are bounded above (8 bits per 5).
/// A pure shortcut: whenever it cannot be sure, the caller decodes the block as before.
pub(super) fn scan_first_block(block: &[u8], list_budget: usize, table_size: usize) -> FirstBlock {
    scan(block, list_budget, table_size).unwrap_or(FirstBlock::Decode)
}

fn scan(mut p: &[u8], list_budget: usize, table_size: usize) -> Option<FirstBlock> {
    let mut table: Vec<Seen> = Vec::new(); // newest last; never evicted (see below)
    let (mut list, mut in_table) = (0usize, 0usize);
    while let Some(&b) = p.first() {
        let seen = if b & 0x80 != 0 {
            let index = decode_int(&mut p, 7)?;
            lookup(index, &table)?
        } else if b & 0xe0 == 0x20 {
            return None; // a dynamic-table size update
        } else {
            let indexing = b & 0xc0 == 0x40;
            let index = decode_int(&mut p, if indexing { 6 } else { 4 })?;
            let (name_size, is_authority) = if index == 0 {
                let (raw, huffman) = string(&mut p)?;
                let is = if huffman {
                    raw == HUFFMAN_AUTHORITY
                } else {
                    raw == b":authority"
                };
                (decoded_bound(raw, huffman), is)
            } else {
                let named = lookup(index, &table)?;
                (named.size - FIELD_OVERHEAD, named.authority.is_some())
            };
            let (raw, huffman) = string(&mut p)?;
            let authority = is_authority.then(|| authority_ok(raw, huffman));
            let seen = Seen {
                size: name_size + decoded_bound(raw, huffman) + FIELD_OVERHEAD,
                authority,
            };
            if indexing {
                in_table += seen.size;
                // Past the table size entries would be evicted: leave that to the decoder.
                if in_table > table_size {
                    return None;
                }
                table.push(seen);
            }
            seen
        };
        list += seen.size;
        if list > list_budget || seen.authority == Some(false) {
            return None;
        }
    }
    Some(FirstBlock::Acceptable)
}

const FIELD_OVERHEAD: usize = 32;

/// The field at an HPACK index: static (1..=61) or dynamic (62 = newest).
fn lookup(index: usize, table: &[Seen]) -> Option<Seen> {
    if index == 0 {
        return None;
    }
    if let Some(&(n, v)) = STATIC_SIZES.get(index - 1) {
        return Some(Seen {
            size: n as usize + v as usize + FIELD_OVERHEAD,
            // The static `:authority` has an empty value, which h2 refuses.
            authority: (index == 1).then_some(false),
        });
    }
    let back = index - STATIC_SIZES.len();
    table.len().checked_sub(back).map(|i| table[i])
}

/// Reads an HPACK integer with an `prefix`-bit prefix (RFC 7541 §5.1).
fn decode_int(p: &mut &[u8], prefix: u8) -> Option<usize> {
    let (&first, rest) = p.split_first()?;
    *p = rest;
    let max = (1usize << prefix) - 1;
    let mut value = (first as usize) & max;
    if value < max {
        return Some(value);
    }
    for shift in (0..28).step_by(7) {
        let (&b, rest) = p.split_first()?;
        *p = rest;
        value = value.checked_add(((b & 0x7f) as usize) << shift)?;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Reads a string literal: its raw bytes and whether they are Huffman-coded.
fn string<'a>(p: &mut &'a [u8]) -> Option<(&'a [u8], bool)> {
    let huffman = p.first()? & 0x80 != 0;
    let len = decode_int(p, 7)?;
    if len > p.len() {
        return None;
    }
    let (raw, rest) = p.split_at(len);
    *p = rest;
    Some((raw, huffman))
}

/// Decoded length of a string, bounded above for Huffman (no code is shorter than 5 bits).
fn decoded_bound(raw: &[u8], huffman: bool) -> usize {
    if huffman {
        raw.len() * 8 / 5
    } else {
        raw.len()
    }
}

/// Whether an `:authority` value is one h2 accepts (Huffman-decoded first if need be).
fn authority_ok(raw: &[u8], huffman: bool) -> bool {
    if !huffman {
        return valid_authority(raw);
    }
    thread_local! {
        static HUFFMAN: std::cell::RefCell<loona_hpack::huffman::HuffmanDecoder> =
            std::cell::RefCell::new(loona_hpack::huffman::HuffmanDecoder::new());
    }
    HUFFMAN
        .with(|d| d.borrow_mut().decode(raw).ok())
        .is_some_and(|v| valid_authority(&v))
}
