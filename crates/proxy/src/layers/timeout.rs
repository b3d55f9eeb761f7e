//! Request timeout: fails a request with [`ProxyError::Timeout`] (504 `timeout`) when response
//! headers don't arrive in time. The deadline comes from the request's [`RequestTimeout`]
//! extension, set from the destination's config when the request is routed; requests without
//! one are not limited here.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service};

use super::{HttpRequest, HttpResponse};
use crate::error::ProxyError;

/// Extension: how long the proxy waits for response headers.
#[derive(Debug, Clone, Copy)]
pub struct RequestTimeout(pub Duration);

#[derive(Debug, Clone, Copy, Default)]
pub struct TimeoutLayer;

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
}

impl<S> Service<HttpRequest> for Timeout<S>
where
    S: Service<HttpRequest, Response = HttpResponse, Error = ProxyError>,
{
    type Response = HttpResponse;
    type Error = ProxyError;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let limit = req.extensions().get::<RequestTimeout>().map(|t| t.0);
        TimeoutFuture {
            inner: self.inner.call(req),
            sleep: limit.map(tokio::time::sleep),
            limit: limit.unwrap_or_default(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner future raced against an optional deadline.
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        limit: Duration,
    }
}

impl<F: Future<Output = Result<HttpResponse, ProxyError>>> Future for TimeoutFuture<F> {
    type Output = Result<HttpResponse, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result);
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(ProxyError::Timeout(*this.limit))),
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use tower::ServiceExt;

    fn slow(
        delay: Duration,
    ) -> impl Service<
        HttpRequest,
        Response = HttpResponse,
        Error = ProxyError,
        Future: Send + 'static,
    > + Clone {
        tower::service_fn(move |_req: HttpRequest| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, ProxyError>(HttpResponse::new(body::empty()))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_slow_responses() {
        let svc = TimeoutLayer.layer(slow(Duration::from_secs(5)));
        let mut req = HttpRequest::new(body::empty());
        req.extensions_mut()
            .insert(RequestTimeout(Duration::from_secs(1)));
        let err = svc.oneshot(req).await.expect_err("timeout");
        assert!(matches!(err, ProxyError::Timeout(d) if d == Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn passes_fast_responses_and_unlimited_requests() {
        let svc = TimeoutLayer.layer(slow(Duration::from_millis(10)));
        let mut req = HttpRequest::new(body::empty());
        req.extensions_mut()
            .insert(RequestTimeout(Duration::from_secs(1)));
        assert!(svc.clone().oneshot(req).await.is_ok());
        let svc = TimeoutLayer.layer(slow(Duration::from_secs(3600)));
        assert!(svc.oneshot(HttpRequest::new(body::empty())).await.is_ok());
    }
}
