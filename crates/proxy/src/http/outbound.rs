//! Outbound: from the local app toward other services.
//!
//! A request names its destination service either by the listener it arrived on (an
//! `--upstream` port) or by its authority (`http://payments/x` or `Host: payments`, as sent
//! through `HTTP_PROXY`). [`Destinations::resolve`](crate::http::destinations::Destinations::resolve) maps that to a service; the
//! [`Forward`] service then picks an endpoint and sends the request: over the shared HTTP/2
//! connection to a peer proxy (HTTP/1 marked for restoration on the far side), or directly to a
//! plain server in the app's own protocol.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Uri, Version};
use tower::Service;
use trellis_core::discovery::RouteRule;
use trellis_core::{Endpoint, ProtocolHint, ServiceName};

use crate::body::{self, Body};
use crate::error::{Fault, ProxyError};
use crate::http::balance::InFlight;
use crate::http::client::{self, Clients, H2Pool};
use crate::http::destinations::{DestinationState, Target};
use crate::http::external;
use crate::http::headers::{self, ORIG_PROTO, ORIG_PROTO_HTTP1};
use crate::http::outlier::{Outcome, Transition};
use crate::http::tunnel::{self, TunnelCtx};
use crate::http::{Direction, RequestMeta};
use crate::layers::{HttpRequest, HttpResponse};
use crate::metrics::{EjectionLabels, EndpointLabels, Label, Metrics, RetryLabels};
use crate::tcp::{BoxedIo, TcpFlow};
use crate::trace::SpanEvents;

/// Extension: the backend service a route chose (absent: the destination itself).
#[derive(Debug, Clone)]
pub struct Backend(pub Arc<DestinationState>);

/// Response extension on 5xx and 429 answers: the endpoint that gave it, so a retry can
/// prefer another one (set only on those, to keep successful responses allocation-free).
#[derive(Debug, Clone, Copy)]
pub struct AnsweredBy(pub std::net::SocketAddr);

/// Request extension on a retry: the endpoint to avoid if another is available.
#[derive(Debug, Clone, Copy)]
pub struct AvoidEndpoint(pub std::net::SocketAddr);

/// Extension: the route rule that matched (retry, per-try timeout, filters).
#[derive(Debug, Clone)]
pub struct SelectedRoute(pub Arc<RouteRule>);

/// The service a request will be sent to: the route's backend, else the destination.
pub fn backend_of(req: &HttpRequest) -> Option<&Arc<DestinationState>> {
    if let Some(b) = req.extensions().get::<Backend>() {
        return Some(&b.0);
    }
    match req.extensions().get::<Target>() {
        Some(Target::Known(d)) => Some(d),
        _ => None,
    }
}

/// How long a request waits for the first answer about a newly discovered service.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends a routed outbound request to one endpoint of its destination.
#[derive(Clone)]
pub struct Forward(Arc<ForwardInner>);

pub struct ForwardInner {
    clients: Clients,
    tunnels: TunnelCtx,
    metrics: Metrics,
}

impl std::ops::Deref for Forward {
    type Target = ForwardInner;
    fn deref(&self) -> &ForwardInner {
        &self.0
    }
}

impl Forward {
    pub fn new(clients: Clients, tunnels: TunnelCtx, metrics: Metrics) -> Self {
        Self(Arc::new(ForwardInner {
            clients,
            tunnels,
            metrics,
        }))
    }

    /// Feeds an outcome to outlier detection and reports ejections (in metrics, logs and the
    /// request's span when it is sampled).
    fn record(
        &self,
        backend: &DestinationState,
        endpoint: &Endpoint,
        in_flight: &InFlight,
        outcome: Outcome,
        span: Option<&SpanEvents>,
    ) {
        let transition = backend.record(in_flight, outcome);
        let reason = match outcome {
            Outcome::Failure(r) => r,
            Outcome::Success => "",
        };
        let gauge = || {
            self.metrics.circuit_open.get_or_create(&EndpointLabels {
                dst: backend.label.clone(),
                endpoint: Label::from(endpoint.address.to_string()),
            })
        };
        match transition {
            Transition::None => {}
            Transition::Ejected { duration } => {
                tracing::warn!(dst = %backend.name, endpoint = %endpoint.address, reason, ejected_for = ?duration, "endpoint ejected");
                if let Some(span) = span {
                    span.add(
                        "endpoint-ejected",
                        vec![
                            ("endpoint", endpoint.address.to_string()),
                            ("reason", reason.to_owned()),
                            ("ejected_ms", duration.as_millis().to_string()),
                        ],
                    );
                }
                self.metrics
                    .ejections
                    .get_or_create(&EjectionLabels {
                        dst: backend.label.clone(),
                        reason,
                    })
                    .inc();
                gauge().set(1);
            }
            Transition::EjectionRefused => {
                self.metrics
                    .ejections
                    .get_or_create(&EjectionLabels {
                        dst: backend.label.clone(),
                        reason: "refused-max-percent",
                    })
                    .inc();
            }
            Transition::Recovered => {
                tracing::info!(dst = %backend.name, endpoint = %endpoint.address, "endpoint recovered (half-open probe succeeded)");
                gauge().set(0);
            }
        }
    }
}

impl Forward {
    fn count_retry(&self, backend: &DestinationState, req: &HttpRequest, reason: &'static str) {
        self.metrics
            .retries
            .get_or_create(&RetryLabels {
                dst: backend.label.clone(),
                route: req
                    .extensions()
                    .get::<RequestMeta>()
                    .map_or_else(|| Label::from("default"), |m| m.route.clone()),
                reason,
                result: "retried",
            })
            .inc();
    }
}

impl Service<HttpRequest> for Forward {
    type Response = HttpResponse;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.forward(req).await })
    }
}

impl Forward {
    async fn forward(&self, mut req: HttpRequest) -> Result<HttpResponse, ProxyError> {
        let target = req
            .extensions_mut()
            .remove::<Target>()
            .unwrap_or(Target::Missing);
        let dest = target.destination()?.clone();
        let backend = req
            .extensions_mut()
            .remove::<Backend>()
            .map_or_else(|| dest.clone(), |b| b.0);
        let snapshot = backend.known(DISCOVERY_TIMEOUT).await;
        if snapshot.known && !snapshot.exists {
            return Err(ProxyError::UnknownService {
                authority: backend.name.to_string(),
            });
        }
        let (mut endpoint, mut in_flight) = match req.extensions().get::<AvoidEndpoint>() {
            Some(AvoidEndpoint(avoid)) => backend.pick_avoiding(*avoid)?,
            None => backend.pick()?,
        };
        let per_try = req
            .extensions_mut()
            .remove::<SelectedRoute>()
            .and_then(|r| r.0.backend_timeout);
        let span = req.extensions().get::<SpanEvents>().cloned();

        if req.method() == Method::CONNECT {
            let meta = req.extensions().get::<RequestMeta>().cloned();
            let authority = req.uri().to_string();
            // Boxed: rare paths keep their large futures out of every request's state.
            let upstream = Box::pin(open_tcp(
                &self.clients,
                &endpoint,
                &backend.name,
                &authority,
            ))
            .await;
            let outcome = match &upstream {
                Ok(_) => Outcome::Success,
                Err(e) => Outcome::Failure(e.reason()),
            };
            self.record(&backend, &endpoint, &in_flight, outcome, span.as_ref());
            let upstream = upstream?;
            let flow = tcp_flow(meta.as_ref(), &dest);
            return Ok(tunnel::accept_connect(
                &mut req,
                upstream,
                flow,
                &self.tunnels,
            ));
        }
        if headers::is_upgrade(&req) {
            // Upgrades need a connection of their own: plain HTTP/1.1 to the endpoint (a peer
            // proxy's inbound speaks HTTP/1 too) and then a byte splice.
            let meta = req.extensions().get::<RequestMeta>().cloned();
            let client_upgrade = hyper::upgrade::on(&mut req);
            let peer = endpoint
                .namespace
                .as_ref()
                .filter(|_| endpoint.meshed)
                .map(|ns| (ns, &backend.name));
            let rsp = Box::pin(self.clients.send_http1_upgrade(endpoint.address, peer, req)).await;
            let outcome = match &rsp {
                Ok(_) => Outcome::Success,
                Err(e) => Outcome::Failure(e.reason()),
            };
            self.record(&backend, &endpoint, &in_flight, outcome, span.as_ref());
            let rsp = rsp?;
            let flow = tcp_flow(meta.as_ref(), &dest);
            return Ok(tunnel::relay_upgrade(
                client_upgrade,
                rsp,
                flow,
                &self.tunnels,
            ));
        }

        // Toward a peer proxy, the connection is made (or reused) before the request is
        // handed over: when that fails the request was never sent, so another endpoint may
        // take it whatever the method (once, within the retry budget). Route retries cover
        // everything else.
        let mut mesh_sender = None;
        if endpoint.meshed {
            let mut repicked = false;
            loop {
                let peer = endpoint.namespace.as_ref().map(|ns| (ns, &backend.name));
                match self.clients.h2.sender(endpoint.address, peer).await {
                    Ok(sender) => {
                        mesh_sender = Some(sender);
                        break;
                    }
                    Err(e) => {
                        in_flight.observe_failure();
                        self.record(
                            &backend,
                            &endpoint,
                            &in_flight,
                            Outcome::Failure(e.reason()),
                            span.as_ref(),
                        );
                        if repicked || !backend.retry_budget.withdraw() {
                            return Err(e);
                        }
                        repicked = true;
                        self.count_retry(&backend, &req, "connect-failed");
                        if let Some(span) = &span {
                            span.add(
                                "retry",
                                vec![
                                    ("reason", "connect-failed".to_owned()),
                                    ("endpoint", endpoint.address.to_string()),
                                ],
                            );
                        }
                        (endpoint, in_flight) = backend.pick_avoiding(endpoint.address)?;
                    }
                }
            }
        }
        let wants_h2 = req.version() == Version::HTTP_2
            || matches!(snapshot.protocol, ProtocolHint::Http2 | ProtocolHint::Grpc);
        let send = async {
            if let Some(sender) = mesh_sender {
                prepare_for_mesh(&mut req)?;
                H2Pool::send_on(sender, req).await
            } else if let Some(host) = endpoint.external_host.as_deref() {
                headers::strip_hop_by_hop(req.headers_mut());
                external::set_host(&mut req, host, snapshot.external_tls.is_some());
                match &snapshot.external_tls {
                    Some(config) => {
                        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                        *req.uri_mut() = path
                            .parse()
                            .map_err(|e| ProxyError::Malformed(format!("uri: {e}")))?;
                        *req.version_mut() = Version::HTTP_11;
                        let sni = snapshot
                            .external
                            .as_ref()
                            .and_then(|e| e.tls.as_ref())
                            .and_then(|t| t.sni.as_deref());
                        Box::pin(external::send_tls(
                            endpoint.address,
                            host,
                            sni,
                            config.clone(),
                            self.clients.settings().connect_timeout,
                            req,
                        ))
                        .await
                    }
                    None => self.clients.send_http1(endpoint.address, req).await,
                }
            } else if wants_h2 {
                prepare_absolute_h2(&mut req)?;
                self.clients.h2.send(endpoint.address, None, req).await
            } else {
                headers::strip_hop_by_hop(req.headers_mut());
                self.clients.send_http1(endpoint.address, req).await
            }
        };
        let result = match per_try {
            Some(limit) => tokio::time::timeout(limit, send)
                .await
                .unwrap_or(Err(ProxyError::Timeout(limit))),
            None => send.await,
        };
        let outcome = match &result {
            Ok(rsp) if rsp.status().is_server_error() => Some(Outcome::Failure("5xx")),
            Ok(_) => Some(Outcome::Success),
            Err(e) if e.fault() == Fault::Upstream => Some(Outcome::Failure(e.reason())),
            // The request itself was bad: says nothing about the endpoint.
            Err(_) => None,
        };
        // Response headers (or the failure): a latency observation for the balancer.
        if let Some(outcome) = outcome {
            match outcome {
                Outcome::Success => in_flight.observe_latency(),
                Outcome::Failure(_) => in_flight.observe_failure(),
            }
            self.record(&backend, &endpoint, &in_flight, outcome, span.as_ref());
        }
        let mut rsp = result?;
        if rsp.status().is_server_error() || rsp.status() == http::StatusCode::TOO_MANY_REQUESTS {
            rsp.extensions_mut().insert(AnsweredBy(endpoint.address));
        }
        headers::strip_hop_by_hop(rsp.headers_mut());
        Ok(rsp.map(body::boxed))
    }
}

fn tcp_flow(meta: Option<&RequestMeta>, dest: &DestinationState) -> TcpFlow {
    TcpFlow {
        direction: Direction::Outbound,
        client: meta.map_or_else(|| ([0, 0, 0, 0], 0).into(), |m| m.client),
        src: meta.map_or_else(|| Label::from(""), |m| m.src.clone()),
        dst: dest.label.clone(),
    }
}

/// Opens an opaque stream to an endpoint: a CONNECT stream through a peer proxy, or TCP.
pub async fn open_tcp(
    clients: &Clients,
    endpoint: &Endpoint,
    service: &ServiceName,
    authority: &str,
) -> Result<BoxedIo, ProxyError> {
    if endpoint.meshed {
        let peer = endpoint.namespace.as_ref().map(|ns| (ns, service));
        tunnel::open_mesh_tunnel(&clients.h2, endpoint.address, peer, authority).await
    } else {
        let stream = client::connect(endpoint.address, clients.settings().connect_timeout).await?;
        Ok(Box::new(stream))
    }
}

/// Gives the request an absolute URI (`http://authority/path`), required on HTTP/2.
fn make_absolute(req: &mut Request<Body>) -> Result<(), ProxyError> {
    if req.uri().authority().is_some() && req.uri().scheme().is_some() {
        return Ok(());
    }
    let authority = headers::authority(req).ok_or(ProxyError::MissingAuthority)?;
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = format!("http://{authority}{path}")
        .parse()
        .map_err(|e| ProxyError::Malformed(format!("authority {authority:?}: {e}")))?;
    *req.uri_mut() = uri;
    Ok(())
}

/// Readies a request for a plain HTTP/2 upstream: absolute URI, no connection-specific headers.
pub fn prepare_absolute_h2(req: &mut Request<Body>) -> Result<(), ProxyError> {
    make_absolute(req)?;
    headers::strip_hop_by_hop(req.headers_mut());
    req.headers_mut().remove(header::HOST);
    *req.version_mut() = Version::HTTP_2;
    Ok(())
}

/// Readies a request for the mesh's HTTP/2 transport: absolute URI, no connection-specific
/// headers, and an HTTP/1 marker so the far proxy speaks HTTP/1.1 to its app.
pub fn prepare_for_mesh(req: &mut Request<Body>) -> Result<(), ProxyError> {
    let was_http1 = req.version() != Version::HTTP_2;
    prepare_absolute_h2(req)?;
    req.headers_mut().remove(ORIG_PROTO);
    if was_http1 {
        req.headers_mut().insert(ORIG_PROTO, ORIG_PROTO_HTTP1);
    }
    Ok(())
}

/// Restores an HTTP/1 request that crossed the mesh as HTTP/2: `Host` from the authority.
pub fn restore_http1(req: &mut Request<Body>) {
    if let Some(authority) = req.uri().authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(header::HOST, host);
    }
    *req.version_mut() = Version::HTTP_11;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_preparation_round_trips_http1() {
        let mut req = Request::get("/x?y=1")
            .header("host", "payments:8080")
            .header("connection", "keep-alive")
            .body(body::empty())
            .expect("req");
        prepare_for_mesh(&mut req).expect("prepare");
        assert_eq!(req.uri().to_string(), "http://payments:8080/x?y=1");
        assert_eq!(req.version(), Version::HTTP_2);
        assert!(req.headers().get("host").is_none());
        assert!(req.headers().get("connection").is_none());
        assert_eq!(req.headers()[ORIG_PROTO], "http/1.1");
        restore_http1(&mut req);
        assert_eq!(req.headers()["host"], "payments:8080");
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn mesh_preparation_requires_an_authority() {
        let mut req = Request::get("/x").body(body::empty()).expect("req");
        assert!(matches!(
            prepare_for_mesh(&mut req),
            Err(ProxyError::MissingAuthority)
        ));
    }
}

#[cfg(test)]
mod future_size {
    use super::*;

    /// Every request's future is created and moved; rare paths (dialing, TLS origination,
    /// upgrades, tunnels) are boxed so it stays small. A regression here showed up as +17k
    /// instructions per request of memcpy.
    #[tokio::test]
    async fn the_per_request_future_stays_small() {
        let metrics = Metrics::for_test();
        let clients = Clients::new(
            client::ClientSettings {
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(1),
            },
            None,
            metrics.clone(),
        );
        let tunnels = TunnelCtx {
            metrics: metrics.clone(),
            access_log: crate::access_log::AccessLog::default(),
            drain: crate::drain::Drain::new(),
        };
        let f = Forward::new(clients.clone(), tunnels, metrics);
        let fut = f.forward(Request::new(body::empty()));
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 4096, "Forward's future is {size} bytes");
        let sender = clients.h2.sender(([127, 0, 0, 1], 1).into(), None);
        assert!(std::mem::size_of_val(&sender) <= 256);
    }
}
