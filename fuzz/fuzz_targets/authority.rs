//! The Workload API's `:authority` adapter fed whole client byte streams, delivered in
//! fuzz-chosen pieces (partial reads, `Pending` in between) and drained through read buffers of
//! fuzz-chosen sizes. It must never panic; errors close the connection.
#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use continuity_agent::endpoints::authority::AuthorityFix;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// A peer that hands out `data` in pieces whose sizes cycle through `sizes`, answering
/// `Pending` before every piece whose size byte is odd.
struct Pieces<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    turn: usize,
    pending: bool,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let size = match self.sizes {
            [] => usize::MAX,
            s => s[self.turn % s.len()] as usize,
        };
        if size % 2 == 1 && !self.pending {
            self.pending = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.pending = false;
        self.turn += 1;
        // A piece of 0 would read as end of stream: pieces are 1..=256 bytes (or everything).
        let n = size
            .saturating_add(1)
            .min(self.data.len())
            .min(buf.remaining());
        let (now, rest) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|input: &[u8]| {
    // Layout: [n] [n piece sizes] [read size] [the client's bytes...]
    let Some((&n, rest)) = input.split_first() else {
        return;
    };
    let n = (n as usize % 8).min(rest.len());
    let (sizes, rest) = rest.split_at(n);
    let Some((&read_size, data)) = rest.split_first() else {
        return;
    };
    let peer = Pieces {
        data,
        sizes,
        turn: 0,
        pending: false,
    };
    let mut fix = AuthorityFix::new(peer);
    let mut cx = Context::from_waker(Waker::noop());
    let mut buf = vec![0u8; read_size as usize + 1];
    // Each Pending is followed by progress, so this ends; the cap is a backstop for a hang
    // (libFuzzer's -timeout reports it) without looping forever on a bug.
    for _ in 0..10_000_000u32 {
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut fix).poll_read(&mut cx, &mut rb) {
            Poll::Pending => continue,
            Poll::Ready(Err(_)) => return,
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return,
            Poll::Ready(Ok(())) => {}
        }
    }
    panic!("the adapter neither finished nor failed");
});
