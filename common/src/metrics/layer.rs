//! The tower layer that records every call of a tonic server in an [`RpcMetrics`]: its path,
//! its gRPC status (from the response headers for a trailers-only reply, else from the
//! trailers at the end of the body) and how long it took until the status was known. A call
//! whose body is dropped before its status (the client went away) counts as `CANCELLED`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use super::{RpcMetrics, code_name};

/// Wraps a service so every call is recorded in the shared [`RpcMetrics`].
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<RpcMetrics>,
}

impl RpcMetricsLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: Arc<RpcMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RpcMetricsLayer`] makes.
#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

/// A call whose status is not known yet; recorded once, at the latest when dropped.
#[derive(Debug)]
struct Pending {
    metrics: Arc<RpcMetrics>,
    path: String,
    start: Instant,
    done: bool,
}

impl Pending {
    fn finish(&mut self, code: &'static str) {
        if !self.done {
            self.done = true;
            self.metrics.record(&self.path, code, self.start.elapsed());
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<MeteredBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut pending = Pending {
            metrics: self.metrics.clone(),
            path: req.uri().path().to_string(),
            start: Instant::now(),
            done: false,
        };
        // The clone that was made ready is the one called (tower's documented pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = match inner.call(req).await {
                Ok(r) => r,
                Err(e) => {
                    pending.finish("INTERNAL");
                    return Err(e);
                }
            };
            if let Some(status) = resp.headers().get("grpc-status") {
                pending.finish(code_name(status.as_bytes()));
            }
            Ok(resp.map(|body| MeteredBody {
                inner: Box::pin(body),
                pending: Some(pending),
            }))
        })
    }
}

/// A response body that records its call when the trailers carrying its status pass.
pub struct MeteredBody<B> {
    inner: Pin<Box<B>>,
    pending: Option<Pending>,
}

impl<B> std::fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody").finish_non_exhaustive()
    }
}

impl<B> MeteredBody<B> {
    fn finish(&mut self, code: &'static str) {
        if let Some(p) = self.pending.as_mut() {
            p.finish(code);
        }
    }
}

impl<B: http_body::Body> http_body::Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(status) = frame.trailers_ref().and_then(|t| t.get("grpc-status")) {
                    this.finish(code_name(status.as_bytes()));
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish("INTERNAL"),
            // The body ended without a status (already recorded if it came in the headers).
            Poll::Ready(None) => this.finish("UNKNOWN"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
