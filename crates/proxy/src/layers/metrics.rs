//! Golden-signal metrics per request: count by status and classification, and latency to
//! response headers, labelled by direction, source, destination and route from the request's
//! [`RequestMeta`]. Recording happens when headers are back, so a long streaming body does not
//! distort latency.
//!
//! The same observation feeds the rolling golden-signal windows ([`crate::signals`]) that the
//! control plane merges for `trellis stat` and the dashboard.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

use super::{HttpRequest, HttpResponse};
use crate::http::{Direction, RequestMeta};
use crate::metrics::{HttpLabels, HttpLatencyLabels, Metrics};
use trellis_core::signals::{Direction as SignalDirection, Observation};

#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Metrics,
}

impl MetricsLayer {
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = RequestMetrics<S>;
    fn layer(&self, inner: S) -> RequestMetrics<S> {
        RequestMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestMetrics<S> {
    inner: S,
    metrics: Metrics,
}

/// `failure` for 5xx and for gRPC responses whose (trailers-only) status is not OK.
fn classify(rsp: &HttpResponse) -> &'static str {
    let grpc_failed = rsp
        .headers()
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() != b"0");
    if rsp.status().is_server_error() || grpc_failed {
        "failure"
    } else {
        "success"
    }
}

impl<S> Service<HttpRequest> for RequestMetrics<S>
where
    S: Service<HttpRequest, Response = HttpResponse>,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let meta = req.extensions().get::<RequestMeta>().cloned();
        // Cheap clones: standard methods are inline, the path shares the request's buffer.
        let method = req.method().clone();
        let path = req.uri().path_and_query().cloned();
        MetricsFuture {
            inner: self.inner.call(req),
            meta,
            method,
            path,
            start: Instant::now(),
            metrics: self.metrics.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        meta: Option<RequestMeta>,
        method: http::Method,
        path: Option<http::uri::PathAndQuery>,
        start: Instant,
        metrics: Metrics,
    }
}

impl<F, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<HttpResponse, E>>,
{
    type Output = Result<HttpResponse, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        if let (Some(meta), Ok(rsp)) = (this.meta.take(), &result) {
            let classification = classify(rsp);
            let elapsed = this.start.elapsed();
            this.metrics.signals.record(&Observation {
                direction: match meta.direction {
                    Direction::Inbound => SignalDirection::Inbound,
                    Direction::Outbound => SignalDirection::Outbound,
                },
                peer: match meta.direction {
                    Direction::Inbound => &meta.src,
                    Direction::Outbound => &meta.dst,
                },
                route: &meta.route,
                method: this.method.as_str(),
                path: this.path.as_ref().map_or("/", |p| p.path()),
                success: classification == "success",
                tls: meta.tls,
                latency_micros: elapsed.as_secs_f64() * 1e6,
            });
            this.metrics
                .http_duration
                .get_or_create(&HttpLatencyLabels {
                    direction: meta.direction.as_str(),
                    src: meta.src.clone(),
                    dst: meta.dst.clone(),
                    route: meta.route.clone(),
                    classification,
                    tls: if meta.tls { "true" } else { "false" },
                })
                .observe(elapsed.as_secs_f64());
            this.metrics
                .http_requests
                .get_or_create(&HttpLabels {
                    direction: meta.direction.as_str(),
                    src: meta.src,
                    dst: meta.dst,
                    route: meta.route,
                    code: rsp.status().as_u16(),
                    classification,
                    tls: if meta.tls { "true" } else { "false" },
                })
                .inc();
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use tower::ServiceExt;

    #[tokio::test]
    async fn counts_by_status_and_classification() {
        let metrics = Metrics::for_test();
        let svc = MetricsLayer::new(metrics.clone()).layer(tower::service_fn(
            |req: HttpRequest| async move {
                let mut rsp = HttpResponse::new(body::empty());
                if req.uri().path() == "/fail" {
                    *rsp.status_mut() = http::StatusCode::BAD_GATEWAY;
                }
                Ok::<_, std::convert::Infallible>(rsp)
            },
        ));
        let meta = RequestMeta {
            direction: Direction::Outbound,
            client: "127.0.0.1:1".parse().expect("addr"),
            src: "web".into(),
            dst: "payments".into(),
            route: "default".into(),
            tls: false,
        };
        for path in ["/ok", "/ok", "/fail"] {
            let mut req = http::Request::get(path).body(body::empty()).expect("req");
            req.extensions_mut().insert(meta.clone());
            svc.clone().oneshot(req).await.expect("ok");
        }
        let labels = |code, classification| HttpLabels {
            direction: "outbound",
            src: "web".into(),
            dst: "payments".into(),
            route: "default".into(),
            code,
            classification,
            tls: "false",
        };
        assert_eq!(
            metrics
                .http_requests
                .get_or_create(&labels(200, "success"))
                .get(),
            2
        );
        assert_eq!(
            metrics
                .http_requests
                .get_or_create(&labels(502, "failure"))
                .get(),
            1
        );

        // The same requests in the golden-signal windows: outbound, peer = the destination.
        let buckets = metrics.signals.last(60);
        let merged = trellis_core::signals::merge_buckets(&buckets);
        let bucket = merged.values().next().expect("a bucket");
        let series = &bucket.series[&trellis_core::signals::SeriesKey {
            direction: SignalDirection::Outbound,
            peer: "payments".into(),
            route: "default".into(),
        }];
        assert_eq!((series.requests, series.failures, series.tls), (3, 1, 0));
        let ok_path = bucket
            .paths
            .iter()
            .find(|(k, _)| k.path == "/ok")
            .expect("/ok kept");
        assert_eq!((ok_path.0.method.as_str(), ok_path.1.requests), ("GET", 2));
    }

    #[test]
    fn grpc_status_in_headers_is_a_failure() {
        let mut rsp = HttpResponse::new(body::empty());
        rsp.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(classify(&rsp), "failure");
    }
}
