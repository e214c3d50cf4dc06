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
    https_reply(move |method, path, bearer, body| {
        let (status, json) = handler(method, path, bearer, body);
        Reply::Json(status, json)
    })
    .await
}

type StandinTls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

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

/// One request an [`ApiServerStandin`] received.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// The status it was answered with.
    pub status: u16,
    /// The JSON body (Null if none or not JSON).
    pub body: serde_json::Value,
}

/// What an [`ApiServerStandin`] holds: ConfigMaps by path, the requests, injected failures.
#[derive(Default)]
struct ApiState {
    config_maps: std::collections::BTreeMap<String, serde_json::Value>,
    requests: Vec<ApiRequest>,
    fail_next: usize,
    resource_version: u64,
}

/// An API server stand-in for core/v1 ConfigMaps (GET, POST to the collection, merge PATCH),
/// requiring one bearer token and recording every request; it can fail the next requests with 500.
pub struct ApiServerStandin {
    /// HTTPS port on 127.0.0.1.
    pub port: u16,
    /// CA PEM to trust it with.
    pub ca_pem: String,
    state: Arc<std::sync::Mutex<ApiState>>,
}

impl ApiServerStandin {
    /// Starts it; requests without `Authorization: Bearer <token>` get 401.
    pub async fn start(token: &str) -> Self {
        let state = Arc::new(std::sync::Mutex::new(ApiState::default()));
        let (s, token) = (state.clone(), token.to_string());
        let (port, ca_pem) = https_json(move |method, path, bearer, body| {
            let body: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let mut st = s.lock().unwrap();
            let (status, json) = if bearer != Some(token.as_str()) {
                (401, status_json(401, "Unauthorized"))
            } else if st.fail_next > 0 {
                st.fail_next -= 1;
                (500, status_json(500, "InternalError"))
            } else {
                st.answer(method, path, &body)
            };
            st.requests.push(ApiRequest {
                method: method.into(),
                path: path.into(),
                status,
                body,
            });
            (status, json)
        })
        .await;
        Self {
            port,
            ca_pem,
            state,
        }
    }

    /// Answers the next `n` requests with 500.
    pub fn fail_next(&self, n: usize) {
        self.state.lock().unwrap().fail_next = n;
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Sets `data[key]` of ConfigMap `ns/name` as a hand edit would (no request recorded);
    /// false if the ConfigMap does not exist.
    pub fn edit_config_map(&self, ns: &str, name: &str, key: &str, value: &str) -> bool {
        let path = format!("/api/v1/namespaces/{ns}/configmaps/{name}");
        let mut st = self.state.lock().unwrap();
        st.resource_version += 1;
        let rv = st.resource_version.to_string();
        let Some(cm) = st.config_maps.get_mut(&path) else {
            return false;
        };
        cm["data"][key] = value.into();
        cm["metadata"]["resourceVersion"] = rv.into();
        true
    }

    /// Deletes ConfigMap `ns/name` as `kubectl delete` would; false if it did not exist.
    pub fn delete_config_map(&self, ns: &str, name: &str) -> bool {
        let path = format!("/api/v1/namespaces/{ns}/configmaps/{name}");
        self.state
            .lock()
            .unwrap()
            .config_maps
            .remove(&path)
            .is_some()
    }

    /// `data[key]` of ConfigMap `ns/name`, if it exists and has that key.
    pub fn config_map_data(&self, ns: &str, name: &str, key: &str) -> Option<String> {
        let path = format!("/api/v1/namespaces/{ns}/configmaps/{name}");
        let st = self.state.lock().unwrap();
        st.config_maps.get(&path)?["data"][key]
            .as_str()
            .map(str::to_string)
    }
}

impl ApiState {
    /// The API server's answer to an authorized request.
    fn answer(
        &mut self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (collection, item) = match parts.as_slice() {
            ["api", "v1", "namespaces", _, "configmaps"] => (true, false),
            ["api", "v1", "namespaces", _, "configmaps", _] => (false, true),
            _ => (false, false),
        };
        self.resource_version += 1;
        let rv = self.resource_version.to_string();
        match (method, collection, item) {
            ("GET", _, true) => match self.config_maps.get(path) {
                Some(cm) => (200, cm.clone()),
                None => (404, status_json(404, "NotFound")),
            },
            ("POST", true, _) => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default();
                let item_path = format!("{path}/{name}");
                if name.is_empty() || body["kind"] != "ConfigMap" {
                    return (422, status_json(422, "Invalid"));
                }
                if self.config_maps.contains_key(&item_path) {
                    return (409, status_json(409, "AlreadyExists"));
                }
                let mut cm = body.clone();
                cm["metadata"]["resourceVersion"] = rv.into();
                self.config_maps.insert(item_path, cm.clone());
                (201, cm)
            }
            ("PATCH", _, true) => {
                let Some(cm) = self.config_maps.get_mut(path) else {
                    return (404, status_json(404, "NotFound"));
                };
                let Some(data) = body["data"].as_object() else {
                    return (422, status_json(422, "Invalid"));
                };
                for (k, v) in data {
                    cm["data"][k] = v.clone();
                }
                cm["metadata"]["resourceVersion"] = rv.into();
                (200, cm.clone())
            }
            _ => (405, status_json(405, "MethodNotAllowed")),
        }
    }
}

/// A `metav1.Status` failure body.
fn status_json(code: u16, reason: &str) -> serde_json::Value {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code})
}
