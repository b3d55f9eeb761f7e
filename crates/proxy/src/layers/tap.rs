//! Hands the metadata of each finished request to live tap subscribers (`trellis tap`).
//! While nobody taps, a request costs one atomic load here.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use tower::{Layer, Service};

use super::{HttpRequest, HttpResponse};
use crate::http::RequestMeta;
use crate::tap::{Tap, TapRecord};
use crate::trace::{TraceIds, hex};

#[derive(Clone)]
pub struct TapLayer {
    tap: Tap,
}

impl TapLayer {
    pub fn new(tap: Tap) -> Self {
        Self { tap }
    }
}

impl<S> Layer<S> for TapLayer {
    type Service = TapService<S>;
    fn layer(&self, inner: S) -> TapService<S> {
        TapService {
            inner,
            tap: self.tap.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TapService<S> {
    inner: S,
    tap: Tap,
}

/// What is known when the request arrives.
struct Pending {
    tap: Tap,
    record: TapRecord,
    start: Instant,
}

impl<S> Service<HttpRequest> for TapService<S>
where
    S: Service<HttpRequest, Response = HttpResponse>,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = TapFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let pending = self.tap.is_active().then(|| {
            let meta = req.extensions().get::<RequestMeta>();
            let now = SystemTime::now();
            Box::new(Pending {
                tap: self.tap.clone(),
                record: TapRecord {
                    time: trellis_core::time::rfc3339(now),
                    unix_ms: now
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64),
                    direction: meta.map_or("inbound", |m| m.direction.as_str()),
                    src: meta.map(|m| m.src.to_string()).unwrap_or_default(),
                    dst: meta.map(|m| m.dst.to_string()).unwrap_or_default(),
                    route: meta.map(|m| m.route.to_string()).unwrap_or_default(),
                    method: req.method().to_string(),
                    path: req.uri().path().chars().take(512).collect(),
                    status: 0,
                    latency_ms: 0.0,
                    trace_id: req
                        .extensions()
                        .get::<TraceIds>()
                        .map(|t| hex(&t.trace_id))
                        .unwrap_or_default(),
                    tls: meta.is_some_and(|m| m.tls),
                },
                start: Instant::now(),
            })
        });
        TapFuture {
            inner: self.inner.call(req),
            pending,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct TapFuture<F> {
        #[pin]
        inner: F,
        pending: Option<Box<Pending>>,
    }
}

impl<F, E> Future for TapFuture<F>
where
    F: Future<Output = Result<HttpResponse, E>>,
{
    type Output = Result<HttpResponse, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        if let (Some(p), Ok(rsp)) = (this.pending.take(), &result) {
            let Pending {
                tap,
                mut record,
                start,
            } = *p;
            record.status = rsp.status().as_u16();
            record.latency_ms = start.elapsed().as_secs_f64() * 1000.0;
            tap.publish(&record);
        }
        Poll::Ready(result)
    }
}
