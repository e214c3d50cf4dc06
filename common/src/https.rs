//! A small blocking HTTP(S)/1.1 client for the few control-plane calls attestors make (the
//! kubelet's `/pods`, the API server's TokenReview). One request per connection, bounded
//! sizes and timeouts, rustls for TLS.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

/// Largest response body accepted.
const MAX_BODY: usize = 32 * 1024 * 1024;

/// How to authenticate the server.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// Verify against these CA certificates (DER).
    Roots(Vec<Vec<u8>>),
    /// Do not verify the server (`insecure` modes only; named so in config).
    InsecureSkipVerify,
    /// Verify with this verifier (e.g. a SPIFFE ID check against a trust bundle).
    Verifier(Arc<dyn rustls::client::danger::ServerCertVerifier>),
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not http(s)://host[:port]/path.
    #[error("invalid URL {0:?}")]
    Url(String),
    /// Connecting, TLS or I/O failed.
    #[error("{url}: {reason}")]
    Io {
        /// The URL.
        url: String,
        /// What happened.
        reason: String,
    },
    /// The response was not HTTP/1.1 as expected.
    #[error("{url}: malformed response: {reason}")]
    Malformed {
        /// The URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

/// A response: status code and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Body (de-chunked).
    pub body: Vec<u8>,
}

pub(crate) fn tls_config(trust: &ServerTrust) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    Ok(match trust {
        ServerTrust::Roots(roots) => {
            let mut store = rustls::RootCertStore::empty();
            for r in roots {
                store
                    .add(rustls_pki_types::CertificateDer::from(r.clone()))
                    .map_err(|e| e.to_string())?;
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
        ServerTrust::InsecureSkipVerify => builder
            .dangerous()
            .with_custom_certificate_verifier(crate::tls::danger::AcceptAnyServerCert::new())
            .with_no_client_auth(),
        ServerTrust::Verifier(v) => builder
            .dangerous()
            .with_custom_certificate_verifier(v.clone())
            .with_no_client_auth(),
    })
}

/// Sends one request (`body` with `content_type` for POST) and reads the whole response.
pub fn request(
    method: &str,
    url: &str,
    trust: &ServerTrust,
    bearer: Option<&str>,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    request_capped(method, url, trust, bearer, body, timeout, MAX_BODY)
}

/// [`request`], refusing a response (headers and body) larger than `max_response` bytes.
pub fn request_capped(
    method: &str,
    url: &str,
    trust: &ServerTrust,
    bearer: Option<&str>,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
    max_response: usize,
) -> Result<Response, HttpError> {
    let target = Target::parse(url)?;
    let head = request_head(method, &target, bearer, body);
    let mut stream = open(url, &target, trust, timeout)?;
    let raw =
        exchange(&mut *stream, &head, body, timeout, max_response).map_err(|e| HttpError::Io {
            url: url.into(),
            reason: e,
        })?;
    parse_response(url, &raw)
}

/// A connection to `target` (TLS when its scheme says so), with `timeout` on every read and
/// write.
pub(crate) fn open(
    url: &str,
    target: &Target<'_>,
    trust: &ServerTrust,
    timeout: Duration,
) -> Result<Box<dyn ReadWrite + Send>, HttpError> {
    let io = |e: String| HttpError::Io {
        url: url.into(),
        reason: e,
    };
    let tcp =
        TcpStream::connect((target.host.as_str(), target.port)).map_err(|e| io(e.to_string()))?;
    tcp.set_read_timeout(Some(timeout))
        .map_err(|e| io(e.to_string()))?;
    tcp.set_write_timeout(Some(timeout))
        .map_err(|e| io(e.to_string()))?;
    if !target.tls {
        return Ok(Box::new(tcp));
    }
    let cfg = tls_config(trust).map_err(io)?;
    let name = rustls_pki_types::ServerName::try_from(target.host.clone())
        .map_err(|e| io(e.to_string()))?;
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| io(e.to_string()))?;
    Ok(Box::new(rustls::StreamOwned::new(conn, tcp)))
}

/// Where a URL points: scheme, host, port, and the `Host` and request-target it is sent with.
pub(crate) struct Target<'a> {
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) hostport: &'a str,
    pub(crate) path: &'a str,
}

impl<'a> Target<'a> {
    /// Splits `http(s)://host[:port]/path` (an IPv6 host in brackets).
    pub(crate) fn parse(url: &'a str) -> Result<Self, HttpError> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(HttpError::Url(url.into()));
        };
        let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (
                h.trim_matches(['[', ']']).to_string(),
                p.parse::<u16>().map_err(|_| HttpError::Url(url.into()))?,
            ),
            _ => (hostport.to_string(), if tls { 443 } else { 80 }),
        };
        Ok(Self {
            tls,
            host,
            port,
            hostport,
            path,
        })
    }
}

/// The request line and headers, up to and including the empty line.
pub(crate) fn request_head(
    method: &str,
    target: &Target<'_>,
    bearer: Option<&str>,
    body: Option<(&str, &[u8])>,
) -> String {
    let (path, hostport) = (target.path, target.hostport);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if let Some(t) = bearer {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some((ctype, b)) = body {
        head.push_str(&format!(
            "Content-Type: {ctype}\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    head
}

/// Writes the request and reads the response until the peer closes (at most `max_response`
/// bytes, each read within `timeout`).
fn exchange(
    s: &mut dyn ReadWrite,
    head: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
    max_response: usize,
) -> Result<Vec<u8>, String> {
    s.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    if let Some((_, b)) = body {
        s.write_all(b).map_err(|e| e.to_string())?;
    }
    s.flush().map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(raw),
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > max_response {
                    return Err(format!("response larger than {max_response} bytes"));
                }
            }
            // A peer closing TLS without close_notify after a complete response is common.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(raw),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("no answer within {}s", timeout.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

pub(crate) trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn parse_response(url: &str, raw: &[u8]) -> Result<Response, HttpError> {
    let bad = |r: &str| HttpError::Malformed {
        url: url.into(),
        reason: r.into(),
    };
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
            if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest, &bad)?
    } else {
        match length {
            Some(n) if n <= rest.len() => rest[..n].to_vec(),
            Some(_) => return Err(bad("body shorter than Content-Length")),
            None => rest.to_vec(),
        }
    };
    Ok(Response { status, body })
}

/// The body of a chunked response (chunk extensions ignored, trailers not read).
fn dechunk(mut r: &[u8], bad: &dyn Fn(&str) -> HttpError) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::new();
    loop {
        let end = r
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("truncated chunk"))?;
        let size_text = std::str::from_utf8(&r[..end]).map_err(|_| bad("bad chunk size"))?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunk size"))?;
        r = r.get(end + 2..).ok_or_else(|| bad("truncated chunk"))?;
        if size == 0 {
            return Ok(out);
        }
        // The size is the peer's: never add to it unchecked (ffffffffffffffff + 2 wraps).
        let (chunk, after) = size
            .checked_add(2)
            .and_then(|total| r.get(..total))
            .map(|c| (&c[..size], &r[c.len()..]))
            .ok_or_else(|| bad("truncated chunk"))?;
        out.extend_from_slice(chunk);
        r = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_and_sized_bodies() {
        let r = parse_response("u", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello world"[..]));
        let r = parse_response(
            "u",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"no"[..]));
        assert!(parse_response("u", b"garbage").is_err());
    }

    #[test]
    fn a_huge_chunk_size_is_an_error_not_an_overflow() {
        for size in ["ffffffffffffffff", "fffffffffffffffe", "7fffffffffffffff"] {
            let raw = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nab\r\n0\r\n\r\n"
            );
            assert!(
                matches!(
                    parse_response("u", raw.as_bytes()),
                    Err(HttpError::Malformed { .. })
                ),
                "chunk size {size}"
            );
        }
        // A chunk size line with nothing after it, and a chunk without its CRLF.
        assert!(
            parse_response(
                "u",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n"
            )
            .is_err()
        );
        assert!(
            parse_response(
                "u",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello"
            )
            .is_err()
        );
    }
}
