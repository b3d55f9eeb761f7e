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
use trellis_core::{Endpoint, ProtocolHint, ServiceName};

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::http::client::{self, Clients};
use crate::http::destinations::{DestinationState, Target};
use crate::http::headers::{self, ORIG_PROTO, ORIG_PROTO_HTTP1};
use crate::http::tunnel::{self, TunnelCtx};
use crate::http::{Direction, RequestMeta};
use crate::layers::{HttpRequest, HttpResponse};
use crate::metrics::Label;
use crate::tcp::{BoxedIo, TcpFlow};

/// Extension: the backend service a route chose (absent: the destination itself).
#[derive(Debug, Clone)]
pub struct Backend(pub Arc<DestinationState>);

/// How long a request waits for the first answer about a newly discovered service.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends a routed outbound request to one endpoint of its destination.
#[derive(Clone)]
pub struct Forward {
    clients: Clients,
    tunnels: TunnelCtx,
}

impl Forward {
    pub fn new(clients: Clients, tunnels: TunnelCtx) -> Self {
        Self { clients, tunnels }
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
        let (endpoint, in_flight) = backend.pick()?;
        let meta = req.extensions().get::<RequestMeta>().cloned();

        if req.method() == Method::CONNECT {
            let authority = req.uri().to_string();
            let upstream = open_tcp(&self.clients, &endpoint, &backend.name, &authority).await?;
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
            let client_upgrade = hyper::upgrade::on(&mut req);
            let peer = endpoint
                .namespace
                .as_ref()
                .filter(|_| endpoint.meshed)
                .map(|ns| (ns, &backend.name));
            let rsp = self
                .clients
                .send_http1_upgrade(endpoint.address, peer, req)
                .await?;
            let flow = tcp_flow(meta.as_ref(), &dest);
            return Ok(tunnel::relay_upgrade(
                client_upgrade,
                rsp,
                flow,
                &self.tunnels,
            ));
        }

        let wants_h2 = req.version() == Version::HTTP_2
            || matches!(snapshot.protocol, ProtocolHint::Http2 | ProtocolHint::Grpc);
        let mut rsp = if endpoint.meshed {
            prepare_for_mesh(&mut req)?;
            let peer = endpoint.namespace.as_ref().map(|ns| (ns, &backend.name));
            self.clients.h2.send(endpoint.address, peer, req).await?
        } else if wants_h2 {
            prepare_absolute_h2(&mut req)?;
            self.clients.h2.send(endpoint.address, None, req).await?
        } else {
            headers::strip_hop_by_hop(req.headers_mut());
            self.clients.send_http1(endpoint.address, req).await?
        };
        // Response headers: a latency observation for the balancer.
        in_flight.complete();
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
