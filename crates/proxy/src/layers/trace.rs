//! One span per hop: joins the trace the request carries (W3C `traceparent`, or B3) or starts
//! one, passes the context on with this hop's span as the parent, and queues the span when the
//! response headers are back. Outermost in both stacks, so the span covers everything the
//! proxy does and the access log and tap below see the trace id. Off (one atomic load) until
//! MeshConfig names an OTLP endpoint.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use tower::{Layer, Service};

use super::{HttpRequest, HttpResponse};
use crate::http::outbound::AnsweredBy;
use crate::http::{Direction, RequestMeta};
use crate::layers::authz::PeerIdentity;
use crate::trace::{
    AttributeValue, FinishedSpan, SpanEvents, SpanKind, TraceIds, Tracer, extract, inject,
    new_span_id, new_trace_id, unix_nanos,
};

#[derive(Clone)]
pub struct TraceLayer {
    tracer: Tracer,
}

impl TraceLayer {
    pub fn new(tracer: Tracer) -> Self {
        Self { tracer }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = TraceService<S>;
    fn layer(&self, inner: S) -> TraceService<S> {
        TraceService {
            inner,
            tracer: self.tracer.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TraceService<S> {
    inner: S,
    tracer: Tracer,
}

/// A sampled span waiting for its response.
struct OpenSpan {
    tracer: Tracer,
    span: FinishedSpan,
    events: SpanEvents,
}

impl<S> Service<HttpRequest> for TraceService<S>
where
    S: Service<HttpRequest, Response = HttpResponse>,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = TraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: HttpRequest) -> Self::Future {
        if !self.tracer.is_enabled() {
            return TraceFuture {
                inner: self.inner.call(req),
                open: None,
            };
        }
        let parent = extract(req.headers());
        let sampled = parent.map_or_else(|| self.tracer.sample(), |p| p.sampled);
        let trace_id = parent.map_or_else(new_trace_id, |p| p.trace_id);
        let span_id = new_span_id();
        let propagation = parent.map_or(crate::trace::Propagation::W3c, |p| p.propagation);
        inject(req.headers_mut(), &trace_id, &span_id, sampled, propagation);
        req.extensions_mut().insert(TraceIds { trace_id, span_id });
        let open = sampled.then(|| {
            let events = SpanEvents::default();
            req.extensions_mut().insert(events.clone());
            Box::new(OpenSpan {
                tracer: self.tracer.clone(),
                span: start_span(&req, trace_id, span_id, parent.map(|p| p.span_id)),
                events,
            })
        });
        TraceFuture {
            inner: self.inner.call(req),
            open,
        }
    }
}

fn start_span(
    req: &HttpRequest,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
) -> FinishedSpan {
    let meta = req.extensions().get::<RequestMeta>();
    let s = |v: &str| AttributeValue::Str(v.to_owned());
    let route = meta.map_or("default", |m| &m.route);
    let mut attributes = vec![
        ("http.request.method", s(req.method().as_str())),
        ("url.path", s(req.uri().path())),
        ("http.route", s(route)),
    ];
    let kind = match meta.map(|m| m.direction) {
        Some(Direction::Inbound) => SpanKind::Server,
        _ => SpanKind::Client,
    };
    if let Some(m) = meta {
        attributes.push(("trellis.direction", s(m.direction.as_str())));
        attributes.push(("trellis.src", s(&m.src)));
        attributes.push(("trellis.dst", s(&m.dst)));
        attributes.push(("trellis.tls", AttributeValue::Bool(m.tls)));
    }
    if let Some(peer) = req
        .extensions()
        .get::<PeerIdentity>()
        .and_then(|p| p.0.as_ref())
    {
        attributes.push((
            "trellis.peer.identity",
            AttributeValue::Str(peer.id.to_string()),
        ));
    }
    FinishedSpan {
        trace_id,
        span_id,
        parent_span_id,
        name: format!("{} {route}", req.method()),
        kind,
        start_unix_nanos: unix_nanos(SystemTime::now()),
        end_unix_nanos: 0,
        attributes,
        events: Vec::new(),
        error: false,
    }
}

pin_project_lite::pin_project! {
    pub struct TraceFuture<F> {
        #[pin]
        inner: F,
        open: Option<Box<OpenSpan>>,
    }
}

impl<F, E> Future for TraceFuture<F>
where
    F: Future<Output = Result<HttpResponse, E>>,
{
    type Output = Result<HttpResponse, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        if let Some(open) = this.open.take() {
            let OpenSpan {
                tracer,
                mut span,
                events,
            } = *open;
            span.end_unix_nanos = unix_nanos(SystemTime::now());
            span.events = events.take();
            match &result {
                Ok(rsp) => {
                    let status = rsp.status();
                    span.attributes.push((
                        "http.response.status_code",
                        AttributeValue::Int(i64::from(status.as_u16())),
                    ));
                    if let Some(err) = rsp
                        .headers()
                        .get(crate::error::ERROR_HEADER)
                        .and_then(|v| v.to_str().ok())
                    {
                        span.attributes
                            .push(("trellis.error", AttributeValue::Str(err.to_owned())));
                    }
                    if let Some(AnsweredBy(addr)) = rsp.extensions().get::<AnsweredBy>() {
                        span.attributes
                            .push(("server.address", AttributeValue::Str(addr.to_string())));
                    }
                    span.error = status.is_server_error();
                }
                Err(_) => span.error = true,
            }
            tracer.finish(span);
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use crate::trace::{TRACEPARENT, TraceResource, extract, hex};
    use prometheus_client::registry::Registry;
    use tower::ServiceExt;
    use trellis_core::resources::{OtlpProtocol, TracingConfig};

    fn tracer(sampling: f64) -> (Tracer, crate::trace::Exporter) {
        let (tracer, exporter) = Tracer::new(
            &mut Registry::default(),
            TraceResource {
                service: "web".into(),
                namespace: "default".into(),
                instance: "web-1".into(),
            },
        );
        tracer.configure(Some(&TracingConfig {
            sampling,
            otlp_endpoint: Some("http://127.0.0.1:1".into()),
            protocol: OtlpProtocol::Grpc,
        }));
        (tracer, exporter)
    }

    /// The inner service: records the traceparent it was given and a retry event.
    fn app() -> impl Service<
        HttpRequest,
        Response = HttpResponse,
        Error = std::convert::Infallible,
        Future = impl Future<Output = Result<HttpResponse, std::convert::Infallible>>,
    > + Clone {
        tower::service_fn(|req: HttpRequest| async move {
            if let Some(events) = req.extensions().get::<SpanEvents>() {
                events.add("retry", vec![("attempt", "1".into())]);
            }
            let mut rsp = HttpResponse::new(body::empty());
            if let Some(v) = req.headers().get(TRACEPARENT) {
                rsp.headers_mut().insert("x-seen-traceparent", v.clone());
            }
            *rsp.status_mut() = http::StatusCode::BAD_GATEWAY;
            Ok(rsp)
        })
    }

    #[tokio::test]
    async fn joins_the_callers_trace_and_becomes_the_next_parent() {
        let (tracer, mut exporter) = tracer(0.0);
        let svc = TraceLayer::new(tracer).layer(app());
        let req = http::Request::builder()
            .uri("/pay")
            .header(
                TRACEPARENT,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(body::empty())
            .expect("request");
        let rsp = svc.oneshot(req).await.expect("infallible");
        let mut seen = http::HeaderMap::new();
        seen.insert(TRACEPARENT, rsp.headers()["x-seen-traceparent"].clone());
        let next = extract(&seen).expect("propagated");
        let spans = exporter.queued();
        assert_eq!(spans.len(), 1, "sampled by the caller even at sampling 0");
        let span = &spans[0];
        assert_eq!(hex(&span.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            span.parent_span_id.map(|p| hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_eq!(
            next.span_id, span.span_id,
            "the app sees this span as its parent"
        );
        assert!(span.error, "502");
        assert_eq!(span.events.len(), 1);
        assert_eq!(span.events[0].name, "retry");
        assert!(
            span.attributes
                .contains(&("http.response.status_code", AttributeValue::Int(502)))
        );
    }

    #[tokio::test]
    async fn unsampled_requests_still_carry_context_but_make_no_span() {
        let (tracer, mut exporter) = tracer(0.0);
        let svc = TraceLayer::new(tracer.clone()).layer(app());
        let rsp = svc
            .clone()
            .oneshot(http::Request::new(body::empty()))
            .await
            .expect("infallible");
        let v = rsp.headers()["x-seen-traceparent"].to_str().expect("ascii");
        assert!(v.ends_with("-00"), "not sampled: {v}");
        assert!(exporter.queued().is_empty());

        // Sampling 1: every new trace is recorded.
        tracer.configure(Some(&TracingConfig {
            sampling: 1.0,
            otlp_endpoint: Some("http://127.0.0.1:1".into()),
            protocol: OtlpProtocol::Grpc,
        }));
        svc.oneshot(http::Request::new(body::empty()))
            .await
            .expect("infallible");
        let spans = exporter.queued();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].parent_span_id, None, "a root span");

        // Off: nothing added to requests at all.
        tracer.configure(None);
        let svc = TraceLayer::new(tracer).layer(app());
        let rsp = svc
            .oneshot(http::Request::new(body::empty()))
            .await
            .expect("infallible");
        assert!(!rsp.headers().contains_key("x-seen-traceparent"));
    }
}
