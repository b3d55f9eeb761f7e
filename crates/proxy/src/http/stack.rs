//! The HTTP stacks, one builder per direction. Read top to bottom: each stage is one layer from
//! [`crate::layers`], outermost first, with the reason it sits where it does.

use std::convert::Infallible;
use std::sync::Arc;

use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::access_log::AccessLog;
use crate::http::destinations::Destinations;
use crate::http::headers::CLIENT_ID;
use crate::http::inbound::ForwardToApp;
use crate::http::outbound::Forward;
use crate::identity::InboundPolicyCell;
use crate::layers::access_log::AccessLogLayer;
use crate::layers::authz::AuthorizeLayer;
use crate::layers::concurrency::ConcurrencyLimitLayer;
use crate::layers::error_response::ErrorResponseLayer;
use crate::layers::fault::FaultLayer;
use crate::layers::header_modifier::HeaderModifierLayer;
use crate::layers::metrics::MetricsLayer;
use crate::layers::mirror::MirrorLayer;
use crate::layers::rate_limit::RateLimitLayer;
use crate::layers::retry::RetryLayer;
use crate::layers::strip_header::StripHeaderLayer;
use crate::layers::tap::TapLayer;
use crate::layers::timeout::TimeoutLayer;
use crate::layers::trace::TraceLayer;
use crate::layers::{HttpRequest, HttpResponse};
use crate::metrics::Metrics;
use crate::trace::Tracer;

/// A complete per-direction stack: never fails (errors are already responses).
pub type HttpStack = BoxCloneSyncService<HttpRequest, HttpResponse, Infallible>;

/// From the app to another service. The route and backend were chosen when the request
/// entered (`server::prepare`), so every layer here reads them from the request.
pub fn outbound(
    forward: Forward,
    destinations: Arc<Destinations>,
    metrics: &Metrics,
    access_log: &AccessLog,
    tracer: &Tracer,
) -> HttpStack {
    let stack = ServiceBuilder::new()
        // Outermost: the span covers the whole hop, and the trace id is known below.
        .layer(TraceLayer::new(tracer.clone()))
        // The line shows what the app really got, proxy errors included.
        .layer(AccessLogLayer::new(access_log.clone()))
        // Golden signals as the app sees them (status after error mapping, retries included).
        .layer(MetricsLayer::new(metrics.clone()))
        // Live tap sees the same requests as the metrics.
        .layer(TapLayer::new(metrics.tap.clone()))
        // Every failure below becomes a classified response with `x-trellis-error`.
        .layer(ErrorResponseLayer::new(metrics.clone()))
        // The app must not be able to claim an identity.
        .layer(StripHeaderLayer::new(CLIENT_ID))
        // The route's header filters: requests as the backend should see them, responses
        // as the app should.
        .layer(HeaderModifierLayer)
        // Shadow copies see the request as sent, and never wait on or affect the primary.
        .layer(MirrorLayer::new(
            destinations,
            forward.clone(),
            metrics.clone(),
        ))
        // Injected faults stand in for the destination, before any of its protections.
        .layer(FaultLayer::new(metrics.clone()))
        // The route's overall deadline: all tries and backoff together.
        .layer(TimeoutLayer)
        // One slot per request (not per try), refused at once when the queue is full.
        .layer(ConcurrencyLimitLayer)
        // Tries again within the budget; each try picks its own endpoint below.
        .layer(RetryLayer::new(metrics.clone()))
        // Pick an available endpoint, send with the per-try timeout, feed outlier detection.
        .service(forward);
    BoxCloneSyncService::new(stack)
}

/// From another proxy (or outside the mesh) to the local app.
pub fn inbound(
    forward: ForwardToApp,
    metrics: &Metrics,
    access_log: &AccessLog,
    tracer: &Tracer,
    policy: std::sync::Arc<InboundPolicyCell>,
) -> HttpStack {
    let app_port = forward.app_port();
    let stack = ServiceBuilder::new()
        // The server span of this hop; the app receives this span as its parent.
        .layer(TraceLayer::new(tracer.clone()))
        // What the caller got, proxy errors included.
        .layer(AccessLogLayer::new(access_log.clone()))
        // Golden signals of this service as its callers see them.
        .layer(MetricsLayer::new(metrics.clone()))
        .layer(TapLayer::new(metrics.tap.clone()))
        // Failures (app unreachable) become classified responses.
        .layer(ErrorResponseLayer::new(metrics.clone()))
        // Identity comes from the connection (mTLS), never from a header a caller sent.
        .layer(StripHeaderLayer::new(CLIENT_ID))
        // Over-limit callers are refused before anything else is spent on them.
        .layer(RateLimitLayer::new(policy.clone(), metrics.clone()))
        // Who may call: a denial is a classified 403; an allowed request carries the caller's
        // verified identity to the app.
        .layer(AuthorizeLayer::new(policy, metrics.clone(), app_port))
        // Hand to the app in the caller's original protocol.
        .service(forward);
    BoxCloneSyncService::new(stack)
}
