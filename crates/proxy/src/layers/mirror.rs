//! The route's `RequestMirror` filter: a share of requests is copied to a shadow service in the
//! background. The copy's response is dropped and its failure is only counted: the primary
//! request never waits for it. Mirrors are bounded (at most [`MAX_IN_FLIGHT`] copies at once,
//! each with [`MIRROR_TIMEOUT`]); beyond that, copies are skipped, never queued. Only requests
//! without a body are copied, so the primary's body is never buffered for a shadow.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use http_body::Body as _;
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use super::{HttpRequest, HttpResponse, ResponseFuture};
use crate::body;
use crate::error::ProxyError;
use crate::http::RequestMeta;
use crate::http::destinations::{Destinations, Target, random_below};
use crate::http::outbound::{Forward, SelectedRoute};
use crate::metrics::{Metrics, MirrorLabels};

/// Most mirrored copies in flight per proxy.
pub const MAX_IN_FLIGHT: usize = 256;
/// A mirrored copy is abandoned after this long.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct MirrorLayer {
    destinations: Arc<Destinations>,
    forward: Forward,
    slots: Arc<Semaphore>,
    metrics: Metrics,
}

impl MirrorLayer {
    pub fn new(destinations: Arc<Destinations>, forward: Forward, metrics: Metrics) -> Self {
        Self {
            destinations,
            forward,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            metrics,
        }
    }
}

impl<S> Layer<S> for MirrorLayer {
    type Service = Mirror<S>;
    fn layer(&self, inner: S) -> Mirror<S> {
        Mirror {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Mirror<S> {
    inner: S,
    layer: MirrorLayer,
}

impl<S> Mirror<S> {
    /// Starts the shadow copy of `req`, if its route mirrors and the draw says so.
    fn shadow(&self, req: &HttpRequest) {
        let Some(mirror) = req
            .extensions()
            .get::<SelectedRoute>()
            .and_then(|r| r.0.mirror.as_ref())
        else {
            return;
        };
        if (random_below(1_000_000) as f64) >= mirror.percent * 10_000.0 {
            return;
        }
        let count = |result: &'static str| {
            self.layer
                .metrics
                .mirrored
                .get_or_create(&MirrorLabels {
                    mirror: mirror.service.as_str().into(),
                    result,
                })
                .inc();
        };
        if !req.body().is_end_stream() {
            count("skipped-body");
            return;
        }
        let Some(dest) = self
            .layer
            .destinations
            .get_or_discover(mirror.service.as_str())
        else {
            count("unknown-service");
            return;
        };
        let Ok(permit) = self.layer.slots.clone().try_acquire_owned() else {
            count("skipped-busy");
            return;
        };
        let mut copy = Request::new(body::empty());
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        if let Some(meta) = req.extensions().get::<RequestMeta>() {
            copy.extensions_mut().insert(meta.clone());
        }
        copy.extensions_mut().insert(Target::Known(dest));
        let mut forward = self.layer.forward.clone();
        let metrics = self.layer.metrics.clone();
        let service = mirror.service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // `Forward` is always ready.
            let call: ResponseFuture = forward.call(copy);
            let result = tokio::time::timeout(MIRROR_TIMEOUT, call).await;
            let outcome = match result {
                Ok(Ok(rsp)) if !rsp.status().is_server_error() => "ok",
                Ok(Ok(_)) => "server-error",
                Ok(Err(_)) => "failed",
                Err(_) => "timeout",
            };
            metrics
                .mirrored
                .get_or_create(&MirrorLabels {
                    mirror: service.as_str().into(),
                    result: outcome,
                })
                .inc();
        });
    }
}

impl<S> Service<HttpRequest> for Mirror<S>
where
    S: Service<HttpRequest, Response = HttpResponse, Error = ProxyError>,
{
    type Response = HttpResponse;
    type Error = ProxyError;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        self.shadow(&req);
        self.inner.call(req)
    }
}
