//! Accepts gRPC clients that send a Unix socket path as the HTTP/2 `:authority`.
//!
//! gRPC C-core (py-spiffe) and Java clients send the percent-encoded socket path (for example
//! `tmp%2Fagent%2Fapi.sock`) as `:authority`; h2 rejects it and resets every stream. This
//! adapter sits on each accepted stream and decodes the client's first HPACK header block. If
//! its `:authority` is one h2 accepts, the block and everything after it pass through byte for
//! byte (no decoding cost for well-behaved clients). Otherwise every header block of the
//! connection is decoded, the `:authority` replaced with `localhost`, and re-encoded as
//! literals (so our encoding never touches the dynamic table h2 keeps for us). Every other
//! byte — the preface, DATA, SETTINGS, everything the server writes — passes through untouched.
//!
//! Every byte here comes from an unauthenticated local process, so the adapter holds the client
//! to the limits the agent advertises, as h2 does, before it spends anything on a frame: a frame
//! longer than [`MAX_FRAME_SIZE`], an encoded header block longer than
//! [`MAX_HEADER_LIST_SIZE`], a decoded header list larger than that (counted as HTTP/2 does:
//! name + value + 32 per field), a dynamic-table size update above [`HEADER_TABLE_SIZE`], or a
//! frame interleaved into a header block closes the connection with one log line. Decoding
//! borrows indexed fields from the dynamic table and stops keeping fields once the list is over
//! budget, so no allocation grows with a client's multiplier (an indexed reference repeated a
//! hundred thousand times costs nothing but the bytes that carry it). The buffers are bounded
//! too: one frame and one read of input, one header block, and output up to a high-water mark
//! past which parsing waits for h2 to take what is there. Rewritten blocks may not decode to
//! more than [`MAX_EXPANSION`] times what the client sent (after a 1 MiB allowance), so a
//! stream of tiny blocks that each reference a large table entry cannot turn the adapter into
//! an amplifier.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, BytesMut};

use self::hpack::{encode_literal, valid_authority};

mod async_io;
mod hpack;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE the agent advertises (HTTP/2's initial value): the largest frame a
/// client may send us, and the largest we emit.
pub const MAX_FRAME_SIZE: u32 = 16_384;
/// SETTINGS_MAX_HEADER_LIST_SIZE the agent advertises (h2's and hyper's default, 16 KiB).
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// SETTINGS_HEADER_TABLE_SIZE the agent's HTTP/2 stack uses (the protocol default, never raised).
pub const HEADER_TABLE_SIZE: usize = 4_096;
const MAX_FRAME: usize = MAX_FRAME_SIZE as usize;
/// The largest encoded header block (all its frames' fragments) we collect: h2 caps the block
/// it buffers at the header-list limit, and so do we.
const MAX_HEADER_BLOCK: usize = MAX_HEADER_LIST_SIZE as usize;
/// The largest first header block kept as received (fragments plus frame headers and padding),
/// so that a flood of empty CONTINUATION frames cannot grow it.
const MAX_RAW_BLOCK: usize = 2 * MAX_HEADER_BLOCK;
/// HTTP/2's per-field overhead in the header-list size (RFC 9113 §6.5.2).
const FIELD_OVERHEAD: usize = 32;
/// Output beyond which parsing pauses until the reader has taken it (one rewritten block plus a
/// frame), so a burst of small frames that each expand cannot pile up output.
const OUTPUT_HIGH_WATER: usize = MAX_HEADER_LIST_SIZE as usize + MAX_FRAME;
/// Decoded header bytes a rewritten connection may produce per byte it sent (after a free
/// allowance): tiny blocks referencing the dynamic table expand, but not without bound.
const MAX_EXPANSION: u64 = 64;
/// Decoded header bytes every connection may produce before [`MAX_EXPANSION`] applies.
const EXPANSION_ALLOWANCE: u64 = 1 << 20;

/// A decoded header field: name and value.
type Field = (Vec<u8>, Vec<u8>);

/// Why a client's connection was closed: it broke a limit the agent advertised.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    /// A frame longer than SETTINGS_MAX_FRAME_SIZE.
    #[error("frame of {0} bytes exceeds the advertised max frame size ({MAX_FRAME_SIZE})")]
    FrameTooLarge(usize),
    /// An encoded header block longer than the header-list limit.
    #[error("header block exceeds {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge,
    /// A decoded header list larger than SETTINGS_MAX_HEADER_LIST_SIZE.
    #[error("decoded header list exceeds the advertised {MAX_HEADER_LIST_SIZE} bytes")]
    ListTooLarge,
    /// A frame other than CONTINUATION inside a header block.
    #[error("frame type {0:#x} inside a header block")]
    Interleaved(u8),
    /// A malformed HEADERS or CONTINUATION frame.
    #[error("malformed header frame: {0}")]
    Malformed(&'static str),
    /// HPACK the decoder refused (a table size update above the advertised size among them).
    #[error("HPACK: {0}")]
    Hpack(String),
    /// Header blocks that decode to far more than the connection ever sent.
    #[error("header blocks decode to {decoded} bytes from {received} received")]
    Expansion {
        /// Header-list bytes decoded so far.
        decoded: u64,
        /// Bytes the client sent so far.
        received: u64,
    },
}

impl From<Violation> for io::Error {
    fn from(v: Violation) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, v)
    }
}

/// Where the parser is in the client's byte stream.
enum State {
    Preface(usize),
    FrameHeader,
    /// Passing a non-header frame's payload through; bytes left.
    Passthrough(usize),
    /// Collecting a header block.
    HeaderPayload {
        remaining: usize,
    },
}

/// An I/O adapter fixing client header blocks on the read side.
pub struct AuthorityFix<S> {
    inner: S,
    state: State,
    input: BytesMut,
    output: BytesMut,
    decoder: loona_hpack::Decoder<'static>,
    /// Header block being collected: (stream id, END_STREAM, block bytes).
    block: Option<(u32, bool, Vec<u8>)>,
    /// Current frame's type and flags (for the payload phase).
    frame: (u8, u8, u32),
    /// The first header block's frames exactly as received (to pass them on untouched).
    raw_block: Vec<u8>,
    mode: Mode,
    eof: bool,
    activity: Activity,
    /// The frame being passed through completes a header block (a request has been sent once
    /// its last byte is through).
    completes_block: bool,
    /// Parsing paused at [`OUTPUT_HIGH_WATER`] with input left to process.
    backlog: bool,
    /// Bytes the client has sent, and header-list bytes decoded from them.
    received: u64,
    decoded: u64,
}

/// Whether a connection has sent a request yet (a complete header block), shared with the
/// accept loop so that connections which never send one can be told apart and closed.
#[derive(Debug, Clone, Default)]
pub struct Activity(Arc<AtomicBool>);

impl Activity {
    /// True once the client has sent the complete header block of a request.
    pub fn request_seen(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Whether this connection needs its header blocks rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Until the first header block is seen.
    Undecided,
    /// The client sends a valid `:authority`: every byte passes through, nothing is decoded.
    Passthrough,
    /// The client sends a socket path: every header block is decoded and re-encoded.
    Rewrite,
}

impl<S> AuthorityFix<S> {
    /// Wraps an accepted stream.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            state: State::Preface(PREFACE_LEN),
            input: BytesMut::with_capacity(8 * 1024),
            output: BytesMut::with_capacity(8 * 1024),
            decoder: bounded_decoder(),
            block: None,
            frame: (0, 0, 0),
            raw_block: Vec::new(),
            mode: Mode::Undecided,
            eof: false,
            activity: Activity::default(),
            completes_block: false,
            backlog: false,
            received: 0,
            decoded: 0,
        }
    }

    /// A handle telling whether this connection has sent a request yet.
    pub fn activity(&self) -> Activity {
        self.activity.clone()
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves parsed bytes from `input` to `output`, as far as the input allows or until the
    /// output reaches [`OUTPUT_HIGH_WATER`] (then `backlog` is set).
    fn process(&mut self) -> Result<(), Violation> {
        loop {
            self.backlog = self.output.len() >= OUTPUT_HIGH_WATER;
            if self.backlog {
                return Ok(());
            }
            let progressed = match self.state {
                State::Preface(left) => self.preface(left),
                State::Passthrough(left) => self.pass_payload(left),
                State::FrameHeader => self.frame_header()?,
                State::HeaderPayload { remaining } => self.header_payload(remaining)?,
            };
            if !progressed {
                return Ok(());
            }
        }
    }

    /// Passes up to `left` bytes of the connection preface on; false when input ran out.
    fn preface(&mut self, left: usize) -> bool {
        let n = left.min(self.input.len());
        if n == 0 {
            return false;
        }
        self.output.extend_from_slice(&self.input.split_to(n));
        self.state = if left == n {
            State::FrameHeader
        } else {
            State::Preface(left - n)
        };
        true
    }

    /// Passes up to `left` bytes of a frame's payload on; false when input ran out.
    fn pass_payload(&mut self, left: usize) -> bool {
        let n = left.min(self.input.len());
        if n == 0 && left > 0 {
            return false;
        }
        self.output.extend_from_slice(&self.input.split_to(n));
        self.state = if left == n {
            if std::mem::take(&mut self.completes_block) {
                self.activity.mark();
            }
            State::FrameHeader
        } else {
            State::Passthrough(left - n)
        };
        true
    }

    /// Reads a frame header and decides whether its payload is collected (a header block we
    /// may rewrite) or passed through; false when the header is not all here yet.
    fn frame_header(&mut self) -> Result<bool, Violation> {
        if self.input.len() < FRAME_HEADER {
            return Ok(false);
        }
        let h = &self.input[..FRAME_HEADER];
        let len = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        if len > MAX_FRAME {
            return Err(Violation::FrameTooLarge(len));
        }
        if self.block.is_some() && kind != CONTINUATION {
            return Err(Violation::Interleaved(kind));
        }
        let headers = kind == HEADERS || (kind == CONTINUATION && self.block.is_some());
        if headers && self.mode != Mode::Passthrough {
            if self.mode == Mode::Undecided {
                if self.raw_block.len() + FRAME_HEADER + len > MAX_RAW_BLOCK {
                    return Err(Violation::BlockTooLarge);
                }
                self.raw_block
                    .extend_from_slice(&self.input[..FRAME_HEADER]);
            }
            self.input.advance(FRAME_HEADER);
            self.frame = (kind, flags, stream);
            self.state = State::HeaderPayload { remaining: len };
        } else {
            self.output
                .extend_from_slice(&self.input.split_to(FRAME_HEADER));
            self.completes_block =
                (kind == HEADERS || kind == CONTINUATION) && flags & END_HEADERS != 0;
            self.state = State::Passthrough(len);
        }
        Ok(true)
    }

    /// Takes a whole header frame's payload once it is here; false until then.
    fn header_payload(&mut self, remaining: usize) -> Result<bool, Violation> {
        if self.input.len() < remaining {
            return Ok(false);
        }
        let payload = self.input.split_to(remaining);
        self.state = State::FrameHeader;
        if self.mode == Mode::Undecided {
            self.raw_block.extend_from_slice(&payload);
        }
        self.header_frame(&payload)?;
        Ok(true)
    }

    fn header_frame(&mut self, payload: &[u8]) -> Result<(), Violation> {
        let (kind, flags, stream) = self.frame;
        let bad = Violation::Malformed;
        let fragment = if kind == HEADERS {
            let mut p = payload;
            let mut pad = 0;
            if flags & PADDED != 0 {
                let (&n, rest) = p
                    .split_first()
                    .ok_or_else(|| bad("HEADERS frame too short for padding"))?;
                pad = n as usize;
                p = rest;
            }
            if flags & PRIORITY != 0 {
                p = p
                    .get(5..)
                    .ok_or_else(|| bad("HEADERS frame too short for priority"))?;
            }
            let end = p
                .len()
                .checked_sub(pad)
                .ok_or_else(|| bad("HEADERS padding exceeds payload"))?;
            self.block = Some((stream, flags & END_STREAM != 0, Vec::new()));
            &p[..end]
        } else {
            payload
        };
        let Some((_, _, block)) = self.block.as_mut() else {
            return Err(bad("CONTINUATION without HEADERS"));
        };
        if block.len() + fragment.len() > MAX_HEADER_BLOCK {
            return Err(Violation::BlockTooLarge);
        }
        block.extend_from_slice(fragment);
        if flags & END_HEADERS != 0
            && let Some((stream, end_stream, block)) = self.block.take()
        {
            self.emit_block(stream, end_stream, &block)?;
        }
        Ok(())
    }

    /// Decodes one header block within the header-list budget.
    fn decode_block(&mut self, block: &[u8]) -> Result<Vec<Field>, Violation> {
        let mut headers = Vec::new();
        let mut size = 0usize;
        let mut over = false;
        self.decoder
            .decode_with_cb(block, |name, value| {
                // Indexed fields arrive borrowed from the dynamic table: count them, and copy
                // them only while the list is within budget.
                size = size.saturating_add(name.len() + value.len() + FIELD_OVERHEAD);
                if size > MAX_HEADER_LIST_SIZE as usize {
                    over = true;
                }
                if !over {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| Violation::Hpack(format!("{e:?}")))?;
        if over {
            return Err(Violation::ListTooLarge);
        }
        self.decoded = self.decoded.saturating_add(size as u64);
        if self.decoded
            > self
                .received
                .saturating_mul(MAX_EXPANSION)
                .saturating_add(EXPANSION_ALLOWANCE)
        {
            return Err(Violation::Expansion {
                decoded: self.decoded,
                received: self.received,
            });
        }
        Ok(headers)
    }

    fn emit_block(&mut self, stream: u32, end_stream: bool, block: &[u8]) -> Result<(), Violation> {
        if self.mode == Mode::Undecided
            && hpack::scan_first_block(block, MAX_HEADER_LIST_SIZE as usize, HEADER_TABLE_SIZE)
                == hpack::FirstBlock::Acceptable
        {
            // The common case, decided without an HPACK decoder (which builds a Huffman table
            // for every string it decodes): pass the client's own bytes on.
            self.activity.mark();
            self.output
                .extend_from_slice(&std::mem::take(&mut self.raw_block));
            self.mode = Mode::Passthrough;
            return Ok(());
        }
        let headers = self.decode_block(block)?;
        self.activity.mark();
        if self.mode == Mode::Undecided {
            let raw = std::mem::take(&mut self.raw_block);
            if headers
                .iter()
                .all(|(n, v)| n.as_slice() != b":authority" || valid_authority(v))
            {
                // A client h2 accepts as it is: hand on its own bytes and stop looking.
                self.output.extend_from_slice(&raw);
                self.mode = Mode::Passthrough;
                return Ok(());
            }
            self.mode = Mode::Rewrite;
        }
        let mut out = Vec::with_capacity(block.len() + 32);
        for (name, value) in &headers {
            let value: &[u8] = if name.as_slice() == b":authority" && !valid_authority(value) {
                b"localhost"
            } else {
                value
            };
            encode_literal(&mut out, name, value);
        }
        let mut first = true;
        let mut chunks = out.chunks(MAX_FRAME).peekable();
        if chunks.peek().is_none() {
            self.write_frame(
                HEADERS,
                if end_stream { END_STREAM } else { 0 } | END_HEADERS,
                stream,
                &[],
            );
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let mut flags = if last { END_HEADERS } else { 0 };
            if first && end_stream {
                flags |= END_STREAM;
            }
            self.write_frame(
                if first { HEADERS } else { CONTINUATION },
                flags,
                stream,
                chunk,
            );
            first = false;
        }
        Ok(())
    }

    fn write_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len();
        self.output.extend_from_slice(&[
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
        ]);
        self.output.extend_from_slice(&stream.to_be_bytes());
        self.output.extend_from_slice(payload);
    }
}

impl<S> AuthorityFix<S> {
    /// Processes buffered input; a violation frees everything this client made us hold, logs
    /// one line, and ends the connection (nothing more is read from it).
    fn run(&mut self) -> io::Result<()> {
        self.process().map_err(|v| {
            tracing::warn!(reason = %v, "closing a Workload API connection that broke the HTTP/2 limits");
            self.eof = true;
            self.backlog = false;
            self.input = BytesMut::new();
            self.output = BytesMut::new();
            self.block = None;
            self.raw_block = Vec::new();
            v.into()
        })
    }
}

/// An HPACK decoder that refuses dynamic-table size updates above what the agent advertised.
fn bounded_decoder() -> loona_hpack::Decoder<'static> {
    let mut d = loona_hpack::Decoder::new();
    d.set_max_allowed_table_size(HEADER_TABLE_SIZE);
    d
}

#[cfg(test)]
mod tests;
