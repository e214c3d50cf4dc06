//! Streaming GET over HTTP(S)/1.1 for the Kubernetes API server's `?watch=true`: the response
//! body (chunked or until close) is split into lines, each handed over as it arrives, so a
//! watch event is seen when it is sent rather than when the watch ends. Lines and headers are
//! bounded; an idle connection times out.

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use crate::https::{HttpError, ReadWrite, Response, ServerTrust, Target, request_head};

/// Largest header block accepted.
const MAX_HEAD: u64 = 64 * 1024;
/// Largest error body kept when the status is not 200.
const MAX_ERROR_BODY: u64 = 64 * 1024;

/// How a stream ended without an I/O error.
#[derive(Debug)]
pub enum StreamEnd {
    /// Status 200; the body ended (the peer finished the watch) or `on_line` asked to stop.
    Finished,
    /// Another status: the response (body cut at 64 KiB).
    Status(Response),
}

/// GETs `url` and calls `on_line` with each non-empty line of a 200 response body (without the
/// newline) until the body ends or `on_line` returns false. A line longer than `max_line`
/// bytes, or no byte for `idle_timeout`, is an error.
pub fn get_lines(
    url: &str,
    trust: &ServerTrust,
    bearer: Option<&str>,
    idle_timeout: Duration,
    max_line: usize,
    mut on_line: impl FnMut(&[u8]) -> bool,
) -> Result<StreamEnd, HttpError> {
    let io = |e: String| HttpError::Io {
        url: url.into(),
        reason: e,
    };
    let mut reader = BufReader::new(connect(url, trust, bearer, idle_timeout)?);
    let (status, chunked) = read_head(&mut reader).map_err(|r| HttpError::Malformed {
        url: url.into(),
        reason: r,
    })?;
    let mut body: Box<dyn BufRead> = if chunked {
        Box::new(BufReader::new(Chunked {
            inner: reader,
            left: 0,
            done: false,
        }))
    } else {
        Box::new(reader)
    };
    if status != 200 {
        let mut kept = Vec::new();
        let _ = body.take(MAX_ERROR_BODY).read_to_end(&mut kept);
        return Ok(StreamEnd::Status(Response { status, body: kept }));
    }
    let cap = u64::try_from(max_line)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut body)
            .take(cap)
            .read_until(b'\n', &mut line)
            .map_err(|e| io(describe(&e, idle_timeout)))?;
        if n == 0 {
            return Ok(StreamEnd::Finished);
        }
        if line.last() != Some(&b'\n') && line.len() > max_line {
            return Err(io(format!("a line is longer than {max_line} bytes")));
        }
        let text = line.trim_ascii();
        if !text.is_empty() && !on_line(text) {
            return Ok(StreamEnd::Finished);
        }
    }
}

/// Connects (TLS for https) and writes the GET request.
fn connect(
    url: &str,
    trust: &ServerTrust,
    bearer: Option<&str>,
    idle_timeout: Duration,
) -> Result<Box<dyn ReadWrite + Send>, HttpError> {
    let target = Target::parse(url)?;
    let io = |e: String| HttpError::Io {
        url: url.into(),
        reason: e,
    };
    let head = request_head("GET", &target, bearer, None);
    let mut stream = crate::https::open(url, &target, trust, idle_timeout)?;
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(|e| io(describe(&e, idle_timeout)))?;
    Ok(stream)
}

/// Reads the status line and headers: (status, whether the body is chunked).
fn read_head(r: &mut impl BufRead) -> Result<(u16, bool), String> {
    let mut head = Vec::new();
    let mut limited = r.take(MAX_HEAD);
    loop {
        let before = head.len();
        let n = limited
            .read_until(b'\n', &mut head)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the response ended inside its headers".into());
        }
        if head[before..].trim_ascii().is_empty() {
            break;
        }
    }
    let text = std::str::from_utf8(&head).map_err(|_| "headers are not UTF-8".to_string())?;
    let mut lines = text.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| "no status line".to_string())?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
        })
    });
    Ok((status, chunked))
}

fn describe(e: &std::io::Error, idle: Duration) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("nothing received for {}s", idle.as_secs())
        }
        _ => e.to_string(),
    }
}

/// A chunked transfer-coded body, decoded as it is read.
struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut size_line = Vec::new();
            (&mut self.inner)
                .take(1024)
                .read_until(b'\n', &mut size_line)?;
            let text = std::str::from_utf8(&size_line).map_err(|_| bad("bad chunk size"))?;
            let size = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = size;
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the body ended inside a chunk",
            ));
        }
        self.left -= n;
        if self.left == 0 {
            let mut crlf = [0u8; 2];
            self.inner.read_exact(&mut crlf)?;
            if &crlf != b"\r\n" {
                return Err(bad("a chunk does not end with CRLF"));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode_across_chunk_boundaries() {
        let raw: &[u8] = b"5\r\n{\"a\":\r\n4\r\n1}\n{\r\n3\r\n}\n\n\r\n0\r\n\r\n";
        let mut out = String::new();
        Chunked {
            inner: raw,
            left: 0,
            done: false,
        }
        .read_to_string(&mut out)
        .unwrap();
        assert_eq!(out, "{\"a\":1}\n{}\n\n");
    }

    #[test]
    fn bad_chunks_are_errors() {
        for raw in [
            &b"zz\r\nab\r\n0\r\n\r\n"[..],
            b"2\r\nabXX0\r\n\r\n",
            b"5\r\nab",
        ] {
            let mut out = Vec::new();
            let r = Chunked {
                inner: raw,
                left: 0,
                done: false,
            }
            .read_to_end(&mut out);
            assert!(r.is_err(), "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn heads_give_status_and_coding() {
        let mut r: &[u8] = b"HTTP/1.1 410 Gone\r\nTransfer-Encoding: chunked\r\n\r\nrest";
        assert_eq!(read_head(&mut r).unwrap(), (410, true));
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: x";
        assert!(read_head(&mut r).is_err());
    }
}
