//! Fault injection (FaultInjection resources) for resilience testing: calls to the targeted
//! service are delayed and/or answered with an error status by percent, on the caller's side,
//! so the caller's own retries, timeouts and fallbacks are what gets exercised. Injected
//! responses carry `x-trellis-error: fault-injected`.

use std::task::{Context, Poll};

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use tower::{Layer, Service};

use super::{HttpRequest, HttpResponse, MaybeBoxed, ResponseFuture};
use crate::body;
use crate::error::{ERROR_HEADER, ProxyError};
use crate::http::destinations::{Target, random_below};
use crate::http::headers::is_grpc;
use crate::metrics::{FaultLabels, Metrics};

/// True with probability `percent` / 100.
fn roll(percent: f64) -> bool {
    (random_below(1_000_000) as f64) < percent * 10_000.0
}

#[derive(Clone)]
pub struct FaultLayer {
    metrics: Metrics,
}

impl FaultLayer {
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;
    fn layer(&self, inner: S) -> Fault<S> {
        Fault {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Fault<S> {
    inner: S,
    metrics: Metrics,
}

fn injected(status: u16, grpc: bool) -> HttpResponse {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut rsp = Response::new(body::full(format!("fault injected: {status}\n")));
    if grpc {
        // gRPC clients read grpc-status, not the HTTP status.
        let code: u16 = match status.as_u16() {
            429 => 8,
            504 => 4,
            403 => 7,
            401 => 16,
            501 => 12,
            503 | 502 => 14,
            _ => 2,
        };
        rsp = Response::new(body::empty());
        rsp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        rsp.headers_mut()
            .insert("grpc-status", HeaderValue::from(code));
    } else {
        *rsp.status_mut() = status;
    }
    rsp.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static("fault-injected"));
    rsp
}

impl<S> Service<HttpRequest> for Fault<S>
where
    S: Service<HttpRequest, Response = HttpResponse, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = ProxyError;
    type Future = MaybeBoxed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let Some(Target::Known(dest)) = req
            .extensions()
            .get::<Target>()
            .filter(|t| matches!(t, Target::Known(d) if d.injects_faults()))
        else {
            return MaybeBoxed::direct(self.inner.call(req));
        };
        let snap = dest.snapshot();
        let Some(fault) = &snap.policy.fault else {
            return MaybeBoxed::direct(self.inner.call(req));
        };
        let count = |kind: &'static str| {
            self.metrics
                .faults
                .get_or_create(&FaultLabels {
                    dst: dest.label.clone(),
                    kind,
                })
                .inc();
        };
        let delay = fault.delay.filter(|(_, pct)| roll(*pct)).map(|(d, _)| d);
        let abort = fault.abort.filter(|(_, pct)| roll(*pct)).map(|(s, _)| s);
        if delay.is_some() {
            count("delay");
        }
        if abort.is_some() {
            count("abort");
        }
        let grpc = is_grpc(&req);
        // An aborted request is never sent; a delayed one is sent after the delay (so the
        // delay does not eat into the route's timeout, as in Envoy).
        if let Some(status) = abort {
            let rsp = injected(status, grpc);
            return MaybeBoxed::boxed(async move {
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                Ok(rsp)
            });
        }
        let Some(d) = delay else {
            return MaybeBoxed::direct(self.inner.call(req));
        };
        let mut inner = self.inner.clone();
        MaybeBoxed::boxed(async move {
            tokio::time::sleep(d).await;
            let call: ResponseFuture = Box::pin(inner.call(req));
            call.await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roll_follows_the_percentage() {
        let n = 20_000;
        let hits = (0..n).filter(|_| roll(25.0)).count() as f64 / n as f64;
        assert!((0.23..0.27).contains(&hits), "{hits}");
        assert!((0..1000).all(|_| !roll(0.0)));
        assert!((0..1000).all(|_| roll(100.0)));
    }

    #[test]
    fn injected_responses_say_so() {
        let rsp = injected(503, false);
        assert_eq!(rsp.status(), 503);
        assert_eq!(rsp.headers()[ERROR_HEADER], "fault-injected");
        let rsp = injected(503, true);
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.headers()["grpc-status"], "14");
    }
}
