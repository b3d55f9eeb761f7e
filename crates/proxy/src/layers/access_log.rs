//! Access logging per HTTP request. The line is written when the response body ends (or the
//! client goes away), so it carries the real byte counts and total duration. Request and
//! response bodies are wrapped to count bytes; nothing is buffered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

use super::{HttpRequest, HttpResponse};
use crate::access_log::{AccessLog, Entry, rfc3339_now};
use crate::body::{self, BodyEnd, ObservedBody};
use crate::error::ERROR_HEADER;
use crate::http::RequestMeta;
use crate::http::headers::authority;

#[derive(Clone)]
pub struct AccessLogLayer {
    log: AccessLog,
}

impl AccessLogLayer {
    pub fn new(log: AccessLog) -> Self {
        Self { log }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLogService<S>;
    fn layer(&self, inner: S) -> AccessLogService<S> {
        AccessLogService {
            inner,
            log: self.log.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AccessLogService<S> {
    inner: S,
    log: AccessLog,
}

struct RequestFacts {
    meta: Option<RequestMeta>,
    client_id: Option<String>,
    method: http::Method,
    authority: Option<String>,
    path: String,
    version: http::Version,
    start: Instant,
    bytes_in: Arc<AtomicU64>,
    trace_id: Option<String>,
}

impl<S> Service<HttpRequest> for AccessLogService<S>
where
    S: Service<HttpRequest, Response = HttpResponse>,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = AccessLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        if !self.log.is_enabled() {
            return AccessLogFuture {
                inner: self.inner.call(req),
                facts: None,
                log: None,
            };
        }
        let bytes_in = Arc::new(AtomicU64::new(0));
        let facts = RequestFacts {
            meta: req.extensions().get::<RequestMeta>().cloned(),
            client_id: req
                .extensions()
                .get::<crate::layers::authz::PeerIdentity>()
                .and_then(|p| p.0.as_ref().map(|p| p.id.to_string())),
            method: req.method().clone(),
            authority: authority(&req).map(str::to_owned),
            path: req.uri().path().to_owned(),
            version: req.version(),
            trace_id: req
                .extensions()
                .get::<crate::trace::TraceIds>()
                .map(|t| crate::trace::hex(&t.trace_id)),
            start: Instant::now(),
            bytes_in: bytes_in.clone(),
        };
        let req = req.map(|b| {
            body::boxed(ObservedBody::new(b, move |n, _end| {
                bytes_in.store(n, Ordering::Relaxed)
            }))
        });
        AccessLogFuture {
            inner: self.inner.call(req),
            facts: Some(facts),
            log: Some(self.log.clone()),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct AccessLogFuture<F> {
        #[pin]
        inner: F,
        facts: Option<RequestFacts>,
        log: Option<AccessLog>,
    }
}

impl<F, E> Future for AccessLogFuture<F>
where
    F: Future<Output = Result<HttpResponse, E>>,
{
    type Output = Result<HttpResponse, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let rsp = std::task::ready!(this.inner.poll(cx))?;
        let (Some(facts), Some(log)) = (this.facts.take(), this.log.take()) else {
            return Poll::Ready(Ok(rsp));
        };
        let status = rsp.status().as_u16();
        let error = rsp
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Poll::Ready(Ok(rsp.map(|b| {
            body::boxed(ObservedBody::new(b, move |bytes_out, end: BodyEnd| {
                write_entry(&log, &facts, status, bytes_out, end, error.as_deref())
            }))
        })))
    }
}

fn write_entry(
    log: &AccessLog,
    f: &RequestFacts,
    status: u16,
    bytes_out: u64,
    end: BodyEnd,
    error: Option<&str>,
) {
    let error = error.or(match end {
        BodyEnd::Complete => None,
        BodyEnd::Error => Some("response-body-error"),
        BodyEnd::Cancelled => Some("client-cancelled"),
    });
    let (direction, src, src_service, dst_service) = match &f.meta {
        Some(m) => (m.direction.as_str(), m.client.to_string(), &*m.src, &*m.dst),
        None => ("unknown", String::new(), "", ""),
    };
    log.record(&Entry {
        time: rfc3339_now(),
        kind: "http",
        direction,
        src,
        src_service,
        client_id: f.client_id.clone(),
        dst_service,
        method: Some(f.method.as_str()),
        authority: f.authority.as_deref(),
        path: Some(&f.path),
        protocol: Some(match f.version {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }),
        status: Some(status),
        duration_ms: f.start.elapsed().as_secs_f64() * 1000.0,
        bytes_in: f.bytes_in.load(Ordering::Relaxed),
        bytes_out,
        error,
        trace_id: f.trace_id.clone(),
    });
}
