//! Stand-ins for Kubernetes pieces that cannot run here (the kubelet, the API server), each
//! speaking the real wire format over real HTTPS.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTPS server on 127.0.0.1 answering each request with `handler(method, path, bearer, body)
/// -> (status, json)`. Returns (port, CA PEM to trust it with).
pub async fn https_json<F>(handler: F) -> (u16, String)
where
    F: Fn(&str, &str, Option<&str>, &[u8]) -> (u16, serde_json::Value) + Send + Sync + 'static,
{
    let ca =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert_pem = ca.cert.pem();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(ca.signing_key.serialize_der().into());
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ca.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                answer_one(tls, &*handler).await;
            });
        }
    });
    (port, cert_pem)
}

type StandinTls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Reads one request from `tls`, answers it with `handler` and closes the connection.
async fn answer_one<F>(mut tls: StandinTls, handler: &F)
where
    F: Fn(&str, &str, Option<&str>, &[u8]) -> (u16, serde_json::Value),
{
    let Some((buf, head_end, length)) = read_request(&mut tls).await else {
        return;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut first = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        first.next().unwrap_or_default().to_string(),
        first.next().unwrap_or_default().to_string(),
    );
    let bearer = head
        .lines()
        .find_map(|l| l.strip_prefix("Authorization: Bearer ").map(str::to_string));
    let body = &buf[head_end..(head_end + length).min(buf.len())];
    let (status, json) = handler(&method, &path, bearer.as_deref(), body);
    let body = json.to_string();
    let resp = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tls.write_all(resp.as_bytes()).await;
    let _ = tls.shutdown().await;
}

/// Reads a request's head and its `Content-Length` bytes of body (fewer if the client stops):
/// (bytes read, end of the head, body length). None if the client left before the head ended.
async fn read_request(tls: &mut StandinTls) -> Option<(Vec<u8>, usize, usize)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head_end, length) = loop {
        let Ok(n) = tls.read(&mut chunk).await else {
            return None;
        };
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            break (i + 4, len);
        }
    };
    while buf.len() < head_end + length {
        let Ok(n) = tls.read(&mut chunk).await else {
            return None;
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((buf, head_end, length))
}

/// Signs a JWT (ES256) with `key` for the given claims.
pub fn es256_jwt(
    key: &aws_lc_rs::signature::EcdsaKeyPair,
    kid: &str,
    claims: &serde_json::Value,
) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = serde_json::json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key
        .sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes())
        .unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

/// A fresh P-256 issuer key (fixed-width signatures, as JWS wants) and its JWKS.
pub fn issuer(kid: &str) -> (aws_lc_rs::signature::EcdsaKeyPair, serde_json::Value) {
    use aws_lc_rs::signature::KeyPair;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let kp = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
    )
    .unwrap();
    let p = kp.public_key().as_ref().to_vec();
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..])}]});
    (kp, jwks)
}

/// Claims of a projected service-account token as the API server issues them.
pub fn sa_claims(
    iss: &str,
    aud: &str,
    ns: &str,
    sa: &str,
    node_uid: &str,
    exp: i64,
) -> serde_json::Value {
    serde_json::json!({
        "iss": iss, "aud": [aud], "exp": exp, "iat": exp - 3600, "nbf": exp - 3600,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": {
            "namespace": ns,
            "serviceaccount": {"name": sa, "uid": "sa-uid-1"},
            "pod": {"name": "continuity-agent-x7", "uid": "pod-uid-1"},
            "node": {"name": "node-a", "uid": node_uid}
        }
    })
}

/// What [`https_reply`]'s handler answers: one JSON document, or a chunked stream of JSON
/// lines (a watch) that ends when the sender is dropped.
pub enum Reply {
    /// Status and body.
    Json(u16, serde_json::Value),
    /// Status 200, `Transfer-Encoding: chunked`, one JSON object per line.
    Lines(tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>),
}

/// Like [`https_json`], but the handler may answer with a stream of lines (the API server's
/// `?watch=true`). Returns (port, CA PEM).
pub async fn https_reply<F>(handler: F) -> (u16, String)
where
    F: Fn(&str, &str, Option<&str>, &[u8]) -> Reply + Send + Sync + 'static,
{
    let ca =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert_pem = ca.cert.pem();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(ca.signing_key.serialize_der().into());
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ca.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                answer_reply(tls, &*handler).await;
            });
        }
    });
    (port, cert_pem)
}

/// Reads one request, answers it with `handler` (streaming when asked) and closes.
async fn answer_reply<F>(mut tls: StandinTls, handler: &F)
where
    F: Fn(&str, &str, Option<&str>, &[u8]) -> Reply,
{
    let Some((buf, head_end, length)) = read_request(&mut tls).await else {
        return;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut first = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        first.next().unwrap_or_default().to_string(),
        first.next().unwrap_or_default().to_string(),
    );
    let bearer = head
        .lines()
        .find_map(|l| l.strip_prefix("Authorization: Bearer ").map(str::to_string));
    let body = &buf[head_end..(head_end + length).min(buf.len())];
    match handler(&method, &path, bearer.as_deref(), body) {
        Reply::Json(status, json) => {
            let body = json.to_string();
            let resp = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tls.write_all(resp.as_bytes()).await;
        }
        Reply::Lines(mut rx) => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
            if tls.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            while let Some(v) = rx.recv().await {
                let line = format!("{v}\n");
                let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                if tls.write_all(chunk.as_bytes()).await.is_err() || tls.flush().await.is_err() {
                    return;
                }
            }
            let _ = tls.write_all(b"0\r\n\r\n").await;
        }
    }
    let _ = tls.shutdown().await;
}
