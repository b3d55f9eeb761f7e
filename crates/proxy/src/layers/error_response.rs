//! Turns a [`ProxyError`] into the response the caller sees: the classified status, the
//! `x-trellis-error` header and a one-line text body. gRPC callers get a trailers-only response
//! with `grpc-status`, because gRPC clients read that rather than the HTTP status. Counts every
//! generated error by reason.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use tower::{Layer, Service};

use super::{HttpRequest, HttpResponse};
use crate::body;
use crate::error::{ERROR_HEADER, Fault, ProxyError};
use crate::http::RequestMeta;
use crate::http::headers::is_grpc;
use crate::metrics::{Metrics, ProxyErrorLabels};

#[derive(Clone)]
pub struct ErrorResponseLayer {
    metrics: Metrics,
}

impl ErrorResponseLayer {
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for ErrorResponseLayer {
    type Service = ErrorResponse<S>;
    fn layer(&self, inner: S) -> ErrorResponse<S> {
        ErrorResponse {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ErrorResponse<S> {
    inner: S,
    metrics: Metrics,
}

impl<S> Service<HttpRequest> for ErrorResponse<S>
where
    S: Service<HttpRequest, Response = HttpResponse, Error = ProxyError>,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = ErrorResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Our inner services are always ready (they are boxed clones); an error here would be a
        // bug, and is reported on `call` instead of poisoning the connection.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let grpc = is_grpc(&req);
        let direction = req
            .extensions()
            .get::<RequestMeta>()
            .map(|m| m.direction.as_str())
            .unwrap_or("unknown");
        ErrorResponseFuture {
            inner: self.inner.call(req),
            grpc,
            direction,
            metrics: self.metrics.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct ErrorResponseFuture<F> {
        #[pin]
        inner: F,
        grpc: bool,
        direction: &'static str,
        metrics: Metrics,
    }
}

impl<F: Future<Output = Result<HttpResponse, ProxyError>>> Future for ErrorResponseFuture<F> {
    type Output = Result<HttpResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let err = match std::task::ready!(this.inner.poll(cx)) {
            Ok(rsp) => return Poll::Ready(Ok(rsp)),
            Err(err) => err,
        };
        match err.fault() {
            Fault::Client => tracing::debug!(error = %err, "request refused"),
            Fault::Upstream | Fault::Proxy => tracing::info!(error = %err, "request failed"),
        }
        this.metrics
            .proxy_errors
            .get_or_create(&ProxyErrorLabels {
                direction: this.direction,
                reason: err.reason(),
            })
            .inc();
        Poll::Ready(Ok(error_response(&err, *this.grpc)))
    }
}

/// The response for `err`; `grpc` selects the gRPC trailers-only form.
pub fn error_response(err: &ProxyError, grpc: bool) -> HttpResponse {
    let reason = err.header_value();
    let mut rsp = if grpc {
        let mut rsp = Response::new(body::empty());
        let headers = rsp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(
            "grpc-status",
            HeaderValue::from(u16::from(err.grpc_status())),
        );
        if let Ok(msg) = HeaderValue::from_str(&err.to_string()) {
            headers.insert("grpc-message", msg);
        }
        rsp
    } else {
        let mut rsp = Response::new(body::full(format!("{err}\n")));
        *rsp.status_mut() = err.status();
        rsp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        rsp
    };
    rsp.headers_mut().insert(ERROR_HEADER, reason);
    if let Some(secs) = err.retry_after() {
        rsp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    rsp
}

/// A bare HTTP/1.1 error response for connections refused before hyper ran (malformed head).
pub fn raw_http1_error(status: StatusCode, reason: &str) -> Vec<u8> {
    let body = format!(
        "{}: {reason}\n",
        status.canonical_reason().unwrap_or("error")
    );
    format!(
        "HTTP/1.1 {} {}\r\n{ERROR_HEADER}: {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn maps_errors_to_classified_responses() {
        let svc = ErrorResponseLayer::new(Metrics::for_test()).layer(tower::service_fn(
            |_req: HttpRequest| async {
                Err::<HttpResponse, _>(ProxyError::NoEndpoints {
                    service: "payments".into(),
                })
            },
        ));
        let rsp = svc
            .clone()
            .oneshot(HttpRequest::new(body::empty()))
            .await
            .expect("infallible");
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(rsp.headers()[ERROR_HEADER], "no-endpoints");

        let grpc_req = http::Request::post("/pkg.Svc/Method")
            .header("content-type", "application/grpc")
            .body(body::empty())
            .expect("req");
        let rsp = svc.oneshot(grpc_req).await.expect("infallible");
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()["grpc-status"], "14");
        assert_eq!(rsp.headers()[ERROR_HEADER], "no-endpoints");
    }

    #[test]
    fn raw_error_is_a_complete_response() {
        let raw = String::from_utf8(raw_http1_error(
            StatusCode::BAD_REQUEST,
            "malformed-request",
        ))
        .expect("utf8");
        assert!(raw.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(raw.contains("x-trellis-error: malformed-request\r\n"));
        let (head, body) = raw.split_once("\r\n\r\n").expect("head");
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }
}
