//! Outbound: from the local app toward other services.
//!
//! A request names its destination service either by the listener it arrived on (an
//! `--upstream` port) or by its authority (`http://payments/x` or `Host: payments`, as sent
//! through `HTTP_PROXY`). [`Destinations::resolve`] maps that to a configured service; the
//! [`Forward`] service then picks an endpoint and sends the request: over the shared HTTP/2
//! connection to a peer proxy (HTTP/1 marked for restoration on the far side), or directly to a
//! plain server in the app's own protocol.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use http::header::{self, HeaderValue};
use http::{Method, Request, Uri, Version};
use tower::Service;
use trellis_core::{Destination, Endpoint, Namespace, ProtocolHint, ServiceName};

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::http::client::{self, Clients};
use crate::http::headers::{self, ORIG_PROTO, ORIG_PROTO_HTTP1};
use crate::http::tunnel::{self, TunnelCtx};
use crate::http::{Direction, RequestMeta};
use crate::layers::{HttpRequest, HttpResponse};
use crate::metrics::Label;
use crate::tcp::{BoxedIo, TcpFlow};

/// A configured destination with its endpoint rotation.
#[derive(Debug)]
pub struct DestinationState {
    pub name: ServiceName,
    pub label: Label,
    pub config: Destination,
    next: AtomicUsize,
}

impl DestinationState {
    pub fn new(name: ServiceName, config: Destination) -> Self {
        Self {
            label: Label::from(name.as_str()),
            name,
            config,
            next: AtomicUsize::new(0),
        }
    }

    /// Round-robin over endpoints (latency-aware balancing arrives with the reliability work).
    pub fn pick(&self) -> Result<&Endpoint, ProxyError> {
        let n = self.config.endpoints.len();
        if n == 0 {
            return Err(ProxyError::NoEndpoints {
                service: self.name.to_string(),
            });
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
        Ok(&self.config.endpoints[i])
    }
}

/// What a request or connection is addressed to.
#[derive(Debug, Clone)]
pub enum Target {
    Known(Arc<DestinationState>),
    /// An authority that names no configured service (kept for the error message).
    Unknown(String),
    /// No authority at all.
    Missing,
}

impl Target {
    pub fn label(&self) -> Label {
        match self {
            Target::Known(d) => d.label.clone(),
            Target::Unknown(_) | Target::Missing => Label::from(crate::metrics::UNKNOWN),
        }
    }

    pub fn destination(&self) -> Result<&Arc<DestinationState>, ProxyError> {
        match self {
            Target::Known(d) => Ok(d),
            Target::Unknown(authority) => Err(ProxyError::UnknownService {
                authority: authority.clone(),
            }),
            Target::Missing => Err(ProxyError::MissingAuthority),
        }
    }
}

/// All destinations this proxy knows, by name.
#[derive(Debug, Default)]
pub struct Destinations {
    by_name: BTreeMap<ServiceName, Arc<DestinationState>>,
    namespace: Namespace,
}

impl Destinations {
    pub fn new(config: &BTreeMap<ServiceName, Destination>, namespace: Namespace) -> Self {
        let by_name = config
            .iter()
            .map(|(name, dest)| {
                let state = DestinationState::new(name.clone(), dest.clone());
                (name.clone(), Arc::new(state))
            })
            .collect();
        Self { by_name, namespace }
    }

    pub fn get(&self, name: &ServiceName) -> Option<&Arc<DestinationState>> {
        self.by_name.get(name)
    }

    /// Maps an authority to a service. Accepted host forms: `name`, `name.<namespace>` and
    /// `name.<namespace>.svc.cluster.local`, each with an optional port.
    pub fn resolve(&self, authority: Option<&str>) -> Target {
        let Some(authority) = authority else {
            return Target::Missing;
        };
        let host = strip_port(authority);
        let host = host.strip_suffix(".svc.cluster.local").unwrap_or(host);
        let name = match host.split_once('.') {
            None => host,
            Some((name, ns)) if ns.eq_ignore_ascii_case(self.namespace.as_str()) => name,
            Some(_) => return Target::Unknown(authority.to_owned()),
        };
        let found = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_name.get(name.to_ascii_lowercase().as_str())
        } else {
            self.by_name.get(name)
        };
        match found {
            Some(d) => Target::Known(d.clone()),
            None => Target::Unknown(authority.to_owned()),
        }
    }
}

fn strip_port(authority: &str) -> &str {
    // `[v6]:port`, `host:port` or `host`.
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

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
        let endpoint = dest.pick()?.clone();
        let meta = req.extensions().get::<RequestMeta>().cloned();

        if req.method() == Method::CONNECT {
            let authority = req.uri().to_string();
            let upstream = open_tcp(&self.clients, &endpoint, &authority).await?;
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
            let rsp = self.clients.send_http1(endpoint.address, req).await?;
            let flow = tcp_flow(meta.as_ref(), &dest);
            return Ok(tunnel::relay_upgrade(
                client_upgrade,
                rsp,
                flow,
                &self.tunnels,
            ));
        }

        let wants_h2 = req.version() == Version::HTTP_2
            || matches!(
                dest.config.protocol,
                ProtocolHint::Http2 | ProtocolHint::Grpc
            );
        let mut rsp = if endpoint.meshed {
            prepare_for_mesh(&mut req)?;
            self.clients.h2.send(endpoint.address, req).await?
        } else if wants_h2 {
            prepare_absolute_h2(&mut req)?;
            self.clients.h2.send(endpoint.address, req).await?
        } else {
            headers::strip_hop_by_hop(req.headers_mut());
            self.clients.send_http1(endpoint.address, req).await?
        };
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
    authority: &str,
) -> Result<BoxedIo, ProxyError> {
    if endpoint.meshed {
        tunnel::open_mesh_tunnel(&clients.h2, endpoint.address, authority).await
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
    use std::time::Duration;

    fn dests() -> Destinations {
        let mut cfg = BTreeMap::new();
        cfg.insert(
            ServiceName::new("payments").expect("name"),
            Destination {
                protocol: ProtocolHint::Detect,
                timeout: Some(Duration::from_secs(1)),
                endpoints: vec![
                    Endpoint {
                        address: "127.0.0.1:1".parse().expect("a"),
                        meshed: true,
                    },
                    Endpoint {
                        address: "127.0.0.1:2".parse().expect("a"),
                        meshed: false,
                    },
                ],
            },
        );
        cfg.insert(
            ServiceName::new("empty").expect("name"),
            Destination {
                protocol: ProtocolHint::Tcp,
                timeout: None,
                endpoints: vec![],
            },
        );
        Destinations::new(&cfg, Namespace::new("shop").expect("ns"))
    }

    #[test]
    fn resolves_host_forms() {
        let d = dests();
        for authority in [
            "payments",
            "payments:8080",
            "PAYMENTS",
            "payments.shop",
            "payments.shop:80",
            "payments.shop.svc.cluster.local",
        ] {
            assert!(
                matches!(d.resolve(Some(authority)), Target::Known(_)),
                "{authority}"
            );
        }
        for authority in ["payments.other", "example.com", "[::1]:80", "pay"] {
            assert!(
                matches!(d.resolve(Some(authority)), Target::Unknown(_)),
                "{authority}"
            );
        }
        assert!(matches!(d.resolve(None), Target::Missing));
    }

    #[test]
    fn round_robins_and_reports_empty() {
        let d = dests();
        let Target::Known(p) = d.resolve(Some("payments")) else {
            panic!("known")
        };
        let a = p.pick().expect("ep").address;
        let b = p.pick().expect("ep").address;
        assert_ne!(a, b);
        let Target::Known(e) = d.resolve(Some("empty")) else {
            panic!("known")
        };
        assert_eq!(e.pick().expect_err("none").reason(), "no-endpoints");
    }

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
