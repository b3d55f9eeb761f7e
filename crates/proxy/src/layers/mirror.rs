//! The route's `RequestMirror` filter: a share of requests is copied to a shadow service in the
//! background. The copy's response is dropped and its failure is only counted: the primary
//! request never waits for it. Mirrors are bounded (at most [`MAX_IN_FLIGHT`] copies at once,
//! each with [`MIRROR_TIMEOUT`]); beyond that, copies are skipped, never queued. A request body
//! streams to the primary untouched while a copy of it is kept (up to [`MAX_MIRROR_BODY`]);
//! the shadow copy is sent once the body has ended, and not at all if it was larger or failed.

use std::pin::Pin;
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
/// Largest request body copied to a mirror.
pub const MAX_MIRROR_BODY: usize = 64 * 1024;

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
    /// Starts the shadow copy of `req` (now, or when its body has ended), if its route
    /// mirrors and the draw says so.
    fn shadow(&self, req: &mut HttpRequest) {
        let Some(mirror) = req
            .extensions()
            .get::<SelectedRoute>()
            .and_then(|r| r.0.mirror.clone())
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
        let too_large = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|n| n > MAX_MIRROR_BODY);
        if too_large {
            count("skipped-body-too-large");
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
        let send = move |copy: HttpRequest| async move {
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
        };
        if req.body().is_end_stream() {
            tokio::spawn(send(copy));
            return;
        }
        // Tee the body: the primary streams it as before; the copy leaves when it ends.
        let body = std::mem::replace(req.body_mut(), body::empty());
        let metrics = self.layer.metrics.clone();
        let service = mirror.service.clone();
        *req.body_mut() = body::boxed(TeeBody::new(
            body,
            MAX_MIRROR_BODY,
            move |copied| match copied {
                Some(bytes) => {
                    *copy.body_mut() = body::full(bytes);
                    tokio::spawn(send(copy));
                }
                None => {
                    metrics
                        .mirrored
                        .get_or_create(&MirrorLabels {
                            mirror: service.as_str().into(),
                            result: "skipped-body",
                        })
                        .inc();
                }
            },
        ));
    }
}

pin_project_lite::pin_project! {
    /// Passes a body through while keeping a copy (up to `limit`); calls `done` once with the
    /// whole copy at the end, or `None` if the body was too large, failed or was dropped early.
    struct TeeBody<F: FnOnce(Option<bytes::Bytes>)> {
        #[pin]
        inner: body::Body,
        copy: bytes::BytesMut,
        limit: usize,
        overflow: bool,
        done: Option<F>,
    }

    impl<F: FnOnce(Option<bytes::Bytes>)> PinnedDrop for TeeBody<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(done) = this.project().done.take() {
                done(None);
            }
        }
    }
}

impl<F: FnOnce(Option<bytes::Bytes>)> TeeBody<F> {
    fn new(inner: body::Body, limit: usize, done: F) -> Self {
        Self {
            inner,
            copy: bytes::BytesMut::new(),
            limit,
            overflow: false,
            done: Some(done),
        }
    }
}

impl<F: FnOnce(Option<bytes::Bytes>)> http_body::Body for TeeBody<F> {
    type Data = bytes::Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, crate::BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && !*this.overflow
                {
                    if this.copy.len() + data.len() > *this.limit {
                        *this.overflow = true;
                        *this.copy = bytes::BytesMut::new();
                    } else {
                        this.copy.extend_from_slice(data);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(done) = this.done.take() {
                    done((!*this.overflow).then(|| std::mem::take(this.copy).freeze()));
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(done) = this.done.take() {
                    done(None);
                }
            }
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

    fn call(&mut self, mut req: HttpRequest) -> Self::Future {
        self.shadow(&mut req);
        self.inner.call(req)
    }
}
