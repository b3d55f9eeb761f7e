//! The HTTP stacks, one builder per direction. Read top to bottom: each stage is one layer from
//! [`crate::layers`], outermost first, with the reason it sits where it does.

use std::convert::Infallible;

use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::access_log::AccessLog;
use crate::http::headers::CLIENT_ID;
use crate::http::inbound::ForwardToApp;
use crate::http::outbound::Forward;
use crate::identity::InboundPolicyCell;
use crate::layers::access_log::AccessLogLayer;
use crate::layers::authz::AuthorizeLayer;
use crate::layers::error_response::ErrorResponseLayer;
use crate::layers::metrics::MetricsLayer;
use crate::layers::strip_header::StripHeaderLayer;
use crate::layers::timeout::TimeoutLayer;
use crate::layers::{HttpRequest, HttpResponse};
use crate::metrics::Metrics;

/// A complete per-direction stack: never fails (errors are already responses).
pub type HttpStack = BoxCloneSyncService<HttpRequest, HttpResponse, Infallible>;

/// From the app to another service.
pub fn outbound(forward: Forward, metrics: &Metrics, access_log: &AccessLog) -> HttpStack {
    let stack = ServiceBuilder::new()
        // Outermost, so the line shows what the app really got, proxy errors included.
        .layer(AccessLogLayer::new(access_log.clone()))
        // Golden signals as the app sees them (status after error mapping, full latency).
        .layer(MetricsLayer::new(metrics.clone()))
        // Every failure below becomes a classified response with `x-trellis-error`.
        .layer(ErrorResponseLayer::new(metrics.clone()))
        // The app must not be able to claim an identity.
        .layer(StripHeaderLayer::new(CLIENT_ID))
        // Per-destination deadline on response headers.
        .layer(TimeoutLayer)
        // Pick an endpoint and send.
        .service(forward);
    BoxCloneSyncService::new(stack)
}

/// From another proxy (or outside the mesh) to the local app.
pub fn inbound(
    forward: ForwardToApp,
    metrics: &Metrics,
    access_log: &AccessLog,
    policy: std::sync::Arc<InboundPolicyCell>,
) -> HttpStack {
    let app_port = forward.app_port();
    let stack = ServiceBuilder::new()
        // What the caller got, proxy errors included.
        .layer(AccessLogLayer::new(access_log.clone()))
        // Golden signals of this service as its callers see them.
        .layer(MetricsLayer::new(metrics.clone()))
        // Failures (app unreachable) become classified responses.
        .layer(ErrorResponseLayer::new(metrics.clone()))
        // Identity comes from the connection (mTLS), never from a header a caller sent.
        .layer(StripHeaderLayer::new(CLIENT_ID))
        // Who may call: a denial is a classified 403; an allowed request carries the caller's
        // verified identity to the app.
        .layer(AuthorizeLayer::new(policy, metrics.clone(), app_port))
        // Hand to the app in the caller's original protocol.
        .service(forward);
    BoxCloneSyncService::new(stack)
}
