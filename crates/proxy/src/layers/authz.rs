//! Inbound authorization: decides each request (and each TCP tunnel, a `CONNECT`) from the
//! caller's verified identity and the policies pushed for this service, counts the decision,
//! and hands the app the caller's identity as `x-trellis-client-id`.
//!
//! The policy set is read per request, so a change applies to requests on connections that
//! are already open.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Method};
use tower::{Layer, Service};
use trellis_core::authz::{AuthzRequest, authorize};
use trellis_core::identity::SpiffeId;

use super::{HttpRequest, HttpResponse};
use crate::error::ProxyError;
use crate::http::headers::CLIENT_ID;
use crate::identity::InboundPolicyCell;
use crate::metrics::{AuthzLabels, Label, Metrics};
use crate::signals::DenialKey;

/// Extension: the caller's identity from the mTLS handshake (`None`: plaintext).
#[derive(Debug, Clone, Default)]
pub struct PeerIdentity(pub Option<Arc<Peer>>);

/// A verified caller, with what every request from it needs computed once per connection.
#[derive(Debug)]
pub struct Peer {
    pub id: SpiffeId,
    /// The `x-trellis-client-id` value.
    pub header: Option<HeaderValue>,
    /// The `src` metric label.
    pub service: Label,
}

impl Peer {
    pub fn new(id: SpiffeId) -> Self {
        Self {
            header: HeaderValue::from_str(&id.to_string()).ok(),
            service: Label::from(id.service.as_str()),
            id,
        }
    }
}

#[derive(Clone)]
pub struct AuthorizeLayer {
    policy: Arc<InboundPolicyCell>,
    metrics: Metrics,
    app_port: u16,
}

impl AuthorizeLayer {
    pub fn new(policy: Arc<InboundPolicyCell>, metrics: Metrics, app_port: u16) -> Self {
        Self {
            policy,
            metrics,
            app_port,
        }
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    layer: AuthorizeLayer,
}

impl<S> Service<HttpRequest> for Authorize<S>
where
    S: Service<HttpRequest, Response = HttpResponse, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = ProxyError;
    type Future = decision::AuthorizeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: HttpRequest) -> Self::Future {
        let peer = req
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.0.clone());
        let policy = self.layer.policy.current();
        let tunnel = req.method() == Method::CONNECT;
        let route = (!tunnel).then(|| policy.route_of(&req)).flatten();
        let decision = authorize(
            &policy.policies,
            policy.default_policy,
            &AuthzRequest {
                caller: peer.as_deref().map(|p| &p.id),
                method: (!tunnel).then(|| req.method().as_str()),
                path: (!tunnel).then(|| req.uri().path()),
                port: self.layer.app_port,
                route,
            },
        );
        let count = |decision: &'static str, policy: &str| {
            self.layer
                .metrics
                .authz_decisions
                .get_or_create(&AuthzLabels {
                    decision,
                    policy: Label::from(policy),
                })
                .inc();
        };
        for audited in &decision.audited {
            count("audit", audited);
            tracing::info!(caller = ?peer.as_deref().map(|p| p.id.to_string()), method = %req.method(), path = req.uri().path(), policy = %audited, "audit: this request would be denied");
        }
        if !decision.allowed() {
            count("deny", &decision.reason);
            self.layer.metrics.denials.record(DenialKey {
                caller: peer
                    .as_deref()
                    .map_or_else(|| "unauthenticated".to_owned(), |p| p.id.to_string()),
                route: route.unwrap_or("default").to_owned(),
                policy: decision.reason.to_string(),
                method: req.method().to_string(),
                path: req.uri().path().chars().take(200).collect(),
            });
            tracing::info!(caller = ?peer.as_deref().map(|p| p.id.to_string()), method = %req.method(), path = req.uri().path(), policy = %decision.reason, "denied by authorization policy");
            return decision::AuthorizeFuture::Denied {
                error: Some(ProxyError::Denied {
                    detail: decision.denial_header(),
                }),
            };
        }
        count("allow", &decision.reason);
        if let Some(header) = peer.as_ref().and_then(|p| p.header.clone()) {
            req.headers_mut().insert(CLIENT_ID, header);
        }
        decision::AuthorizeFuture::Allowed {
            inner: self.inner.call(req),
        }
    }
}

mod decision {
    use super::*;

    pin_project_lite::pin_project! {
        /// The inner call, or an immediate denial.
        #[project = EitherProj]
        pub enum AuthorizeFuture<F> {
            Allowed { #[pin] inner: F },
            Denied { error: Option<ProxyError> },
        }
    }

    impl<F: Future<Output = Result<HttpResponse, ProxyError>>> Future for AuthorizeFuture<F> {
        type Output = Result<HttpResponse, ProxyError>;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.project() {
                EitherProj::Allowed { inner } => inner.poll(cx),
                EitherProj::Denied { error } => {
                    Poll::Ready(Err(error.take().unwrap_or(ProxyError::Denied {
                        detail: "denied".into(),
                    })))
                }
            }
        }
    }
}
