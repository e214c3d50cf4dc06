use super::hpack::encode_int;
use super::*;
use tokio::io::AsyncReadExt;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![
        (payload.len() >> 16) as u8,
        (payload.len() >> 8) as u8,
        payload.len() as u8,
        kind,
        flags,
    ];
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

async fn run(input: Vec<u8>) -> Vec<u8> {
    let mut fix = AuthorityFix::new(std::io::Cursor::new(input));
    let mut out = Vec::new();
    fix.read_to_end(&mut out).await.unwrap();
    out
}

fn decode_headers(out: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut rest = &out[PREFACE_LEN..];
    let mut d = loona_hpack::Decoder::new();
    let mut all = Vec::new();
    while rest.len() >= FRAME_HEADER {
        let len = (rest[0] as usize) << 16 | (rest[1] as usize) << 8 | rest[2] as usize;
        if rest[3] == HEADERS {
            all.extend(d.decode(&rest[FRAME_HEADER..FRAME_HEADER + len]).unwrap());
        }
        rest = &rest[FRAME_HEADER + len..];
    }
    all
}

#[tokio::test]
async fn rewrites_a_percent_encoded_socket_path_and_passes_the_rest() {
    let mut enc = loona_hpack::Encoder::new();
    let block = enc.encode(vec![
        (&b":method"[..], &b"POST"[..]),
        (b":authority", b"tmp%2Fagent%2Fapi.sock"),
        (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
        (b"workload.spiffe.io", b"true"),
    ]);
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
    input.extend(&settings);
    // Padded HEADERS split over a CONTINUATION.
    let (a, b) = block.split_at(5);
    let mut padded = vec![2u8];
    padded.extend_from_slice(a);
    padded.extend_from_slice(&[0, 0]);
    input.extend(frame(HEADERS, PADDED, 1, &padded));
    input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
    let data = frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]);
    input.extend(&data);
    let out = run(input).await;
    assert_eq!(&out[..PREFACE_LEN], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    assert_eq!(
        &out[PREFACE_LEN..PREFACE_LEN + settings.len()],
        &settings[..]
    );
    assert!(out.ends_with(&data));
    let headers = decode_headers(&out);
    assert!(headers.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
    assert!(headers.contains(&(b"workload.spiffe.io".to_vec(), b"true".to_vec())));
    assert!(headers.contains(&(
        b":path".to_vec(),
        b"/SpiffeWorkloadAPI/FetchX509SVID".to_vec()
    )));
}

/// A connection's bytes: preface, then the frames.
fn connection(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    for f in frames {
        input.extend(f);
    }
    input
}

/// Splits a header block into a HEADERS frame and CONTINUATIONs of at most `MAX_FRAME`.
fn header_frames(block: &[u8]) -> Vec<Vec<u8>> {
    let chunks: Vec<&[u8]> = block.chunks(MAX_FRAME).collect();
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let last = if i + 1 == chunks.len() {
                END_HEADERS
            } else {
                0
            };
            frame(if i == 0 { HEADERS } else { CONTINUATION }, last, 1, c)
        })
        .collect()
}

async fn violation(input: Vec<u8>) -> io::Error {
    let mut fix = AuthorityFix::new(std::io::Cursor::new(input));
    let mut out = Vec::new();
    let err = fix.read_to_end(&mut out).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    err
}

/// The expansion bomb: one ~4 KB literal entered into the dynamic table, then one-byte
/// references to it. Unbounded, 250,000 references decode to ~1 GB.
fn bomb(references: usize) -> Vec<u8> {
    let mut block = vec![0x40]; // literal with incremental indexing, new name
    encode_int(&mut block, 1, 7, 0);
    block.push(b'x');
    encode_int(&mut block, 4000, 7, 0);
    block.extend(std::iter::repeat_n(b'a', 4000));
    block.extend(std::iter::repeat_n(0xbe, references)); // index 62: that entry
    block
}

#[tokio::test]
async fn an_hpack_expansion_bomb_closes_the_connection() {
    // Small enough to pass the block limit: the decoded-list budget stops it.
    let small = bomb(10_000);
    assert!(small.len() <= MAX_HEADER_BLOCK);
    let err = violation(connection(&header_frames(&small))).await;
    assert!(err.to_string().contains("header list"), "{err}");
    // The full-size bomb never gets as far as the decoder.
    let err = violation(connection(&header_frames(&bomb(250_000)))).await;
    assert!(err.to_string().contains("header block"), "{err}");
}

/// A socket-path client that enters a ~4 KB field into the table, then sends `n` tiny
/// blocks of four references to it (each within the header-list budget).
fn expanding_connection(n: usize) -> Vec<u8> {
    let mut first = Vec::new();
    encode_literal(&mut first, b":authority", b"tmp%2Fagent%2Fapi.sock");
    first.push(0x40);
    encode_int(&mut first, 1, 7, 0);
    first.push(b'x');
    encode_int(&mut first, 4000, 7, 0);
    first.extend(std::iter::repeat_n(b'a', 4000));
    let mut frames = vec![frame(HEADERS, END_HEADERS, 1, &first)];
    frames.extend((0..n).map(|i| frame(HEADERS, END_HEADERS, 3 + 2 * i as u32, &[0xbe; 4])));
    connection(&frames)
}

#[tokio::test]
async fn tiny_blocks_that_expand_are_not_amplified() {
    let input = expanding_connection(4000);
    let sent = input.len();
    let mut fix = AuthorityFix::new(std::io::Cursor::new(input));
    // One read takes the whole input in: output must stop at the high-water mark.
    let mut one = [0u8; 1];
    assert_eq!(fix.read(&mut one).await.unwrap(), 1);
    assert!(
        fix.output.len() <= OUTPUT_HIGH_WATER + MAX_HEADER_LIST_SIZE as usize,
        "{} bytes of output pending",
        fix.output.len()
    );
    let mut out = Vec::new();
    let err = fix.read_to_end(&mut out).await.unwrap_err();
    assert!(err.to_string().contains("decode to"), "{err}");
    // Unbounded, 4,000 blocks would have come out as ~64 MB.
    let bound = (EXPANSION_ALLOWANCE + MAX_EXPANSION * sent as u64) as usize;
    assert!(out.len() < bound, "{} bytes out of {sent} in", out.len());
}

#[tokio::test]
async fn a_request_counts_only_once_its_header_block_is_complete() {
    let mut fix = AuthorityFix::new(std::io::Cursor::new(connection(&[frame(
        HEADERS,
        0,
        1,
        &[0x82],
    )])));
    let activity = fix.activity();
    let mut out = Vec::new();
    fix.read_to_end(&mut out).await.unwrap();
    assert!(
        !activity.request_seen(),
        "a HEADERS frame without END_HEADERS"
    );
    let mut fix = AuthorityFix::new(std::io::Cursor::new(connection(&[
        frame(HEADERS, 0, 1, &[0x82]),
        frame(CONTINUATION, END_HEADERS, 1, &[0x84]),
    ])));
    let activity = fix.activity();
    fix.read_to_end(&mut out).await.unwrap();
    assert!(activity.request_seen());
}

#[tokio::test]
async fn a_table_size_update_above_the_advertised_size_is_refused() {
    let mut block = Vec::new();
    encode_int(&mut block, 1 << 27, 5, 0x20);
    block.push(0x82); // :method GET
    let err = violation(connection(&header_frames(&block))).await;
    assert!(err.to_string().contains("HPACK"), "{err}");
}

#[tokio::test]
async fn an_oversized_frame_is_refused_before_its_payload_arrives() {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let mut head = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    head.extend_from_slice(&[0xff, 0xff, 0xff, HEADERS, 0, 0, 0, 0, 1]);
    tokio::io::AsyncWriteExt::write_all(&mut client, &head)
        .await
        .unwrap();
    let mut fix = AuthorityFix::new(server);
    let mut buf = vec![0u8; 1024];
    let mut seen = Vec::new();
    let err = loop {
        match fix.read(&mut buf).await {
            Ok(0) => panic!("EOF instead of a refusal"),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert!(err.to_string().contains("max frame size"), "{err}");
    assert!(seen.len() <= PREFACE_LEN);
    // A large DATA frame is refused as well, even on a passthrough connection.
    let data = frame(0x0, 0, 1, &vec![0; MAX_FRAME + 1]);
    let err = violation(connection(&[data])).await;
    assert!(err.to_string().contains("max frame size"), "{err}");
}

#[tokio::test]
async fn a_flood_of_empty_continuations_is_refused() {
    let mut frames = vec![frame(HEADERS, 0, 1, &[0x82])];
    frames.extend((0..10_000).map(|_| frame(CONTINUATION, 0, 1, &[])));
    let err = violation(connection(&frames)).await;
    assert!(err.to_string().contains("header block"), "{err}");
}

#[tokio::test]
async fn a_frame_inside_a_header_block_is_refused() {
    let frames = [
        frame(HEADERS, 0, 1, &[0x82]),
        frame(0x0, 0, 1, &[0; 4]),
        frame(CONTINUATION, END_HEADERS, 1, &[0x84]),
    ];
    let err = violation(connection(&frames)).await;
    assert!(err.to_string().contains("inside a header block"), "{err}");
}

#[tokio::test]
async fn a_large_but_legal_request_still_passes() {
    let mut enc = loona_hpack::Encoder::new();
    let value = vec![b'v'; 12 * 1024];
    let block = enc.encode(vec![
        (&b":authority"[..], &b"tmp%2Fagent%2Fapi.sock"[..]),
        (b"x-big", &value[..]),
    ]);
    let headers = decode_headers(&run(connection(&header_frames(&block))).await);
    assert!(headers.contains(&(b"x-big".to_vec(), value)));
    assert!(headers.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
}

#[tokio::test]
async fn keeps_a_valid_authority() {
    let mut enc = loona_hpack::Encoder::new();
    let block = enc.encode(vec![(&b":authority"[..], &b"localhost:1234"[..])]);
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &block));
    let out = run(input).await;
    assert_eq!(out[PREFACE_LEN + 4], END_HEADERS | END_STREAM);
    assert_eq!(
        decode_headers(&out),
        vec![(b":authority".to_vec(), b"localhost:1234".to_vec())]
    );
}

#[tokio::test]
async fn a_client_with_a_valid_authority_is_passed_through_untouched() {
    let mut enc = loona_hpack::Encoder::new();
    let first = enc.encode(vec![
        (&b":authority"[..], &b"localhost"[..]),
        (b":path", b"/x"),
    ]);
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    input.extend(frame(HEADERS, END_HEADERS, 1, &first));
    // Not even valid HPACK: proves later blocks are no longer decoded.
    let later = frame(HEADERS, END_HEADERS, 3, &[0xff, 0xff, 0xff]);
    input.extend(&later);
    let out = run(input.clone()).await;
    assert_eq!(out, input, "byte for byte");
}

#[tokio::test]
async fn a_socket_path_client_has_every_block_rewritten() {
    let mut enc = loona_hpack::Encoder::new();
    let first = enc.encode(vec![(&b":authority"[..], &b"%2Ftmp%2Fa.sock"[..])]);
    let second = enc.encode(vec![
        (&b":authority"[..], &b"%2Ftmp%2Fa.sock"[..]),
        (b":path", b"/y"),
    ]);
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    input.extend(frame(HEADERS, END_HEADERS, 1, &first));
    input.extend(frame(HEADERS, END_HEADERS, 3, &second));
    let headers = decode_headers(&run(input).await);
    let authorities: Vec<_> = headers
        .iter()
        .filter(|(n, _)| n == b":authority")
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(
        authorities,
        vec![b"localhost".to_vec(), b"localhost".to_vec()]
    );
}

mod first_block_scan {
    use super::super::hpack::{FirstBlock, HUFFMAN_AUTHORITY, encode_int, scan_first_block};
    use super::*;

    fn scan(block: &[u8]) -> FirstBlock {
        scan_first_block(block, MAX_HEADER_LIST_SIZE as usize, HEADER_TABLE_SIZE)
    }

    /// A literal field with a Huffman-coded name (new name, without indexing) and a raw value.
    fn huffman_named(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut b = vec![0x00];
        encode_int(&mut b, name.len(), 7, 0x80);
        b.extend_from_slice(name);
        encode_int(&mut b, value.len(), 7, 0);
        b.extend_from_slice(value);
        b
    }

    #[test]
    fn the_huffman_coded_authority_name_is_exact() {
        let mut d = loona_hpack::huffman::HuffmanDecoder::new();
        assert_eq!(d.decode(&HUFFMAN_AUTHORITY).unwrap(), b":authority");
    }

    #[test]
    fn only_blocks_whose_every_authority_h2_accepts_skip_the_decoder() {
        let mut enc = loona_hpack::Encoder::new();
        let good = enc.encode(vec![
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"localhost"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b"workload.spiffe.io", b"true"),
        ]);
        assert_eq!(scan(&good), FirstBlock::Acceptable);
        let mut enc = loona_hpack::Encoder::new();
        let socket_path = enc.encode(vec![
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"tmp%2Fagent%2Fapi.sock"),
        ]);
        assert_eq!(scan(&socket_path), FirstBlock::Decode);
        // The name spelled in Huffman code is still `:authority`.
        assert_eq!(
            scan(&huffman_named(&HUFFMAN_AUTHORITY, b"tmp%2Fapi.sock")),
            FirstBlock::Decode
        );
        assert_eq!(
            scan(&huffman_named(&HUFFMAN_AUTHORITY, b"localhost")),
            FirstBlock::Acceptable
        );
        // The static `:authority` (empty value), an invalid one entered into the table and
        // then referenced, a size update, an index beyond the table, a truncated string.
        assert_eq!(scan(&[0x81]), FirstBlock::Decode);
        let mut entered = vec![0x41];
        encode_int(&mut entered, 3, 7, 0);
        entered.extend_from_slice(b"a b");
        assert_eq!(scan(&entered), FirstBlock::Decode);
        let mut entered_ok = vec![0x41];
        encode_int(&mut entered_ok, 9, 7, 0);
        entered_ok.extend_from_slice(b"localhost");
        entered_ok.push(0xbe);
        assert_eq!(scan(&entered_ok), FirstBlock::Acceptable);
        assert_eq!(scan(&[0x3f, 0xe1, 0x1f, 0x82]), FirstBlock::Decode);
        assert_eq!(scan(&[0xbe]), FirstBlock::Decode);
        assert_eq!(scan(&[0x04, 0x05, b'/', b'a']), FirstBlock::Decode);
    }

    #[test]
    fn blocks_over_the_budget_or_evicting_are_left_to_the_decoder() {
        assert_eq!(scan(&bomb(10_000)), FirstBlock::Decode);
        // Two ~3 KB entries: the second would evict the first.
        let mut block = Vec::new();
        for name in [b"x", b"y"] {
            block.push(0x40);
            encode_int(&mut block, 1, 7, 0);
            block.extend_from_slice(name);
            encode_int(&mut block, 3000, 7, 0);
            block.extend(std::iter::repeat_n(b'a', 3000));
        }
        assert_eq!(scan(&block), FirstBlock::Decode);
        // The same fields decode fine: the shortcut only ever declines.
        let mut d = bounded_decoder();
        assert_eq!(d.decode(&block).unwrap().len(), 2);
    }
}
