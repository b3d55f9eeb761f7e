//! Accept loops: every listener accepts, detects the protocol, and hands the connection to the
//! HTTP stack of its direction or to the opaque TCP path. Each connection is a task tracked by
//! [`Drain`], so shutdown can wait for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;
use trellis_core::ProtocolHint;
use trellis_core::discovery::RequestFacts;
use trellis_core::resources::MtlsMode;

use crate::access_log::AccessLog;
use crate::body;
use crate::detect::{self, DetectReason, Detected, Protocol};
use crate::drain::Drain;
use crate::head::{HeadCheck, check_request_head};
use crate::http::client::{self, Clients};
use crate::http::destinations::{DestinationState, Destinations, Target, choose_backend};
use crate::http::headers::{self, RequestHeaders};
use crate::http::outbound::{Backend, DISCOVERY_TIMEOUT, SelectedRoute, open_tcp};
use crate::http::outlier::Outcome;
use crate::http::stack::HttpStack;
use crate::http::{Direction, RequestMeta};
use crate::io::{IdleTimeout, PrefixedIo};
use crate::layers::authz::PeerIdentity;
use crate::layers::error_response::raw_http1_error;
use crate::layers::timeout::RequestTimeout;
use crate::metrics::{DetectLabels, HandshakeLabels, Label, ListenerLabels, Metrics, UNKNOWN};
use crate::tcp::{BoxedIo, TcpFlow, splice};

type ResponseFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<http::Response<body::Body>, std::convert::Infallible>,
            > + Send,
    >,
>;

/// Limits applied to every client connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub detect_timeout: Duration,
    /// Client connections with no traffic for this long are closed.
    pub client_idle_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// What a listener is for.
#[derive(Debug, Clone)]
pub enum ListenerKind {
    /// The app's outgoing calls, routed by authority (HTTP-proxy style).
    Outbound,
    /// Calls to this service, forwarded to the app.
    Inbound,
    /// An `--upstream` port: everything goes to one service.
    Upstream(Arc<DestinationState>),
}

impl ListenerKind {
    fn name(&self) -> &'static str {
        match self {
            ListenerKind::Outbound => "outbound",
            ListenerKind::Inbound => "inbound",
            ListenerKind::Upstream(_) => "upstream",
        }
    }

    fn direction(&self) -> Direction {
        match self {
            ListenerKind::Inbound => Direction::Inbound,
            _ => Direction::Outbound,
        }
    }
}

/// Everything connection handlers share.
pub struct ServerCtx {
    pub service: Label,
    /// The `route` label of requests no route matched.
    pub default_route: Label,
    pub app: SocketAddr,
    pub inbound_protocol: ProtocolHint,
    pub limits: ConnLimits,
    pub destinations: Arc<Destinations>,
    pub clients: Clients,
    pub outbound: HttpStack,
    pub inbound: HttpStack,
    pub metrics: Metrics,
    pub access_log: AccessLog,
    pub drain: Drain,
    /// With a control plane: this proxy's identity (mTLS on the inbound port).
    pub identity: Option<Arc<crate::identity::MeshIdentity>>,
    pub inbound_policy: Arc<crate::identity::InboundPolicyCell>,
}

/// Accepts until drain starts, then drops the listener (closing the port).
pub async fn serve(listener: TcpListener, kind: ListenerKind, ctx: Arc<ServerCtx>) {
    let drain = ctx.drain.clone();
    let signaled = drain.signaled();
    tokio::pin!(signaled);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut signaled => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, client)) => {
                let (kind, ctx) = (kind.clone(), ctx.clone());
                drain.spawn(async move { handle(stream, client, kind, ctx).await });
            }
            Err(e) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!(listener = kind.name(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!(listener = kind.name(), "listener closed for drain");
}

/// Decrements the open-connections gauge when the connection ends, however it ends.
struct OpenConn(prometheus_client::metrics::gauge::Gauge);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn handle(
    mut stream: TcpStream,
    client: SocketAddr,
    kind: ListenerKind,
    ctx: Arc<ServerCtx>,
) {
    let _ = stream.set_nodelay(true);
    let listener = kind.name();
    let gauge = ctx
        .metrics
        .connections_open
        .get_or_create(&ListenerLabels { listener })
        .clone();
    gauge.inc();
    let _open = OpenConn(gauge);

    let declared_opaque = match &kind {
        ListenerKind::Upstream(d) => d.snapshot().protocol.is_opaque(),
        ListenerKind::Inbound => ctx.inbound_protocol.is_opaque(),
        ListenerKind::Outbound => false,
    };
    // A destination declared HTTP has no server-speaks-first clients: wait as long as for a
    // request head instead of falling back to opaque TCP after the short deadline.
    let declared_http = match &kind {
        ListenerKind::Upstream(d) => matches!(
            d.snapshot().protocol,
            ProtocolHint::Http | ProtocolHint::Http2 | ProtocolHint::Grpc
        ),
        _ => false,
    };
    let detect_timeout = if declared_http {
        ctx.limits.header_read_timeout
    } else {
        ctx.limits.detect_timeout
    };
    let mut buf = BytesMut::new();
    let detected = if declared_opaque {
        Detected {
            protocol: Protocol::Opaque,
            reason: DetectReason::Declared,
        }
    } else {
        match detect::detect(&mut stream, &mut buf, detect_timeout).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(%client, error = %e, "connection failed during detection");
                return;
            }
        }
    };
    ctx.metrics
        .detections
        .get_or_create(&DetectLabels {
            listener,
            protocol: detected.protocol.as_str(),
            reason: detected.reason.as_str(),
        })
        .inc();

    if matches!(kind, ListenerKind::Inbound)
        && let Some(identity) = ctx.identity.clone()
    {
        // Mesh mode: peers speak mTLS. Plaintext only where MeshConfig says permissive.
        if detected.protocol == Protocol::Tls {
            let io = PrefixedIo::new(buf.freeze(), stream);
            return serve_mtls(io, client, &identity, ctx).await;
        }
        if ctx.inbound_policy.current().mtls == MtlsMode::Strict {
            count_handshake(&ctx, "plaintext_refused");
            tracing::info!(%client, protocol = detected.protocol.as_str(), "refused plaintext connection: the inbound port requires mTLS (MeshConfig mtls: strict)");
            let _ = stream.shutdown().await;
            return;
        }
    }
    match detected.protocol {
        Protocol::Http1 => {
            if let Err((status, reason)) = read_first_head(&mut stream, &mut buf, &ctx.limits).await
            {
                ctx.metrics
                    .malformed
                    .get_or_create(&ListenerLabels { listener })
                    .inc();
                tracing::debug!(%client, %status, reason, "refused request head");
                if status != StatusCode::REQUEST_TIMEOUT || !buf.is_empty() {
                    let _ = stream.write_all(&raw_http1_error(status, reason)).await;
                }
                let _ = stream.shutdown().await;
                return;
            }
            let io = PrefixedIo::new(buf.freeze(), stream);
            serve_http(io, client, Protocol::Http1, kind, ctx, PeerIdentity(None)).await;
        }
        Protocol::Http2 => {
            let io = PrefixedIo::new(buf.freeze(), stream);
            serve_http(io, client, Protocol::Http2, kind, ctx, PeerIdentity(None)).await;
        }
        Protocol::Tls | Protocol::Opaque => {
            let io = PrefixedIo::new(buf.freeze(), stream);
            forward_tcp(io, client, kind, ctx).await;
        }
    }
}

fn count_handshake(ctx: &ServerCtx, result: &'static str) {
    ctx.metrics
        .tls_handshakes
        .get_or_create(&HandshakeLabels {
            direction: "inbound",
            result,
        })
        .inc();
}

/// Completes the mTLS handshake with a peer proxy and serves it, knowing who it is.
async fn serve_mtls(
    io: PrefixedIo<TcpStream>,
    client: SocketAddr,
    identity: &crate::identity::MeshIdentity,
    ctx: Arc<ServerCtx>,
) {
    let Some(tls) = identity.tls() else {
        tracing::info!(%client, "refused mTLS connection: no workload certificate yet");
        count_handshake(&ctx, "no_identity_yet");
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let accepted =
        match tokio::time::timeout(ctx.limits.header_read_timeout, acceptor.accept(io)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        };
    let stream = match accepted {
        Ok(s) => s,
        Err(e) => {
            let class = trellis_api::tls::classify_handshake_error(&e);
            count_handshake(&ctx, class);
            tracing::info!(%client, result = class, hint = trellis_api::tls::handshake_hint(class), error = %e, "mTLS handshake from peer failed");
            return;
        }
    };
    count_handshake(&ctx, "ok");
    let (_, conn) = stream.get_ref();
    let peer = trellis_api::tls::peer_identity(conn.peer_certificates())
        .map(|id| Arc::new(crate::layers::authz::Peer::new(id)));
    let protocol = if conn.alpn_protocol() == Some(trellis_api::tls::ALPN_H2) {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    serve_http(
        stream,
        client,
        protocol,
        ListenerKind::Inbound,
        ctx,
        PeerIdentity(peer),
    )
    .await;
}

/// Reads until the first HTTP/1 request head is complete and valid. On refusal, returns the
/// status and `x-trellis-error` reason to answer with.
async fn read_first_head(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    limits: &ConnLimits,
) -> Result<(), (StatusCode, &'static str)> {
    let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
    loop {
        match check_request_head(buf, limits.max_header_bytes) {
            HeadCheck::Complete(_) => return Ok(()),
            HeadCheck::TooLarge => {
                return Err((
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "request-header-too-large",
                ));
            }
            HeadCheck::Invalid(_) => return Err((StatusCode::BAD_REQUEST, "malformed-request")),
            HeadCheck::Partial => {}
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Err(_) => return Err((StatusCode::REQUEST_TIMEOUT, "header-read-timeout")),
            Ok(Ok(0)) | Ok(Err(_)) => return Err((StatusCode::BAD_REQUEST, "incomplete-request")),
            Ok(Ok(_)) => {}
        }
    }
}

/// Annotates a request with what the stacks need: metadata, routing target, the route's
/// backend and deadline. Waits (bounded) for a newly discovered destination's first update.
async fn prepare(
    req: Request<Incoming>,
    client: SocketAddr,
    kind: &ListenerKind,
    ctx: &ServerCtx,
    peer: &PeerIdentity,
) -> Request<body::Body> {
    let mut req = req.map(body::boxed);
    let mut route = None;
    let (src, dst) = match kind {
        ListenerKind::Inbound => {
            req.extensions_mut().insert(peer.clone());
            let src = peer
                .0
                .as_ref()
                .map_or_else(|| Label::from(UNKNOWN), |p| p.service.clone());
            (src, ctx.service.clone())
        }
        ListenerKind::Outbound | ListenerKind::Upstream(_) => {
            let target = match kind {
                ListenerKind::Upstream(d) => Target::Known(d.clone()),
                _ => ctx.destinations.resolve(headers::authority(&req)),
            };
            let dst = target.label();
            if let Target::Known(d) = &target {
                let snap = d.known(DISCOVERY_TIMEOUT).await;
                let mut timeout = snap.timeout;
                let facts = RequestFacts {
                    method: req.method().as_str(),
                    path: req.uri().path(),
                    query: req.uri().query(),
                    headers: &RequestHeaders(req.headers()),
                };
                if let Some(i) = snap.routes.select_index(&facts) {
                    let rule = &snap.routes.rules[i];
                    route = snap.route_labels.get(i).cloned();
                    if let Some(shared) = snap.route_rules.get(i) {
                        req.extensions_mut().insert(SelectedRoute(shared.clone()));
                    }
                    timeout = rule.request_timeout.or(timeout);
                    let backend = choose_backend(rule)
                        .filter(|b| *b != &d.name)
                        .and_then(|b| ctx.destinations.get_or_discover(b.as_str()));
                    if let Some(b) = backend {
                        req.extensions_mut().insert(Backend(b));
                    }
                }
                if let Some(t) = timeout {
                    req.extensions_mut().insert(RequestTimeout(t));
                }
            }
            req.extensions_mut().insert(target);
            (ctx.service.clone(), dst)
        }
    };
    req.extensions_mut().insert(RequestMeta {
        direction: kind.direction(),
        client,
        src,
        dst,
        route: route.unwrap_or_else(|| ctx.default_route.clone()),
        tls: match kind {
            ListenerKind::Inbound => peer.0.is_some(),
            _ => ctx.identity.is_some(),
        },
    });
    req
}

async fn serve_http<I>(
    io: I,
    client: SocketAddr,
    protocol: Protocol,
    kind: ListenerKind,
    ctx: Arc<ServerCtx>,
    peer: PeerIdentity,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let stack = match kind {
        ListenerKind::Inbound => ctx.inbound.clone(),
        _ => ctx.outbound.clone(),
    };
    let svc_ctx = ctx.clone();
    let kind = Arc::new(kind);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (stack, kind, ctx, peer) = (stack.clone(), kind.clone(), svc_ctx.clone(), peer.clone());
        // Boxed as a plain `dyn Future + Send` so the connection future's Send-ness does not
        // depend on the stack's type (and compile errors stay readable).
        let fut: ResponseFuture = Box::pin(async move {
            let req = prepare(req, client, &kind, &ctx, &peer).await;
            // Boxed before awaiting: awaiting the stack's concrete future inside this block
            // trips rustc's higher-ranked Send check (rust-lang/rust#110338).
            let respond: ResponseFuture = Box::pin(stack.oneshot(req));
            respond.await
        });
        fut
    });
    let io = TokioIo::new(IdleTimeout::new(io, ctx.limits.client_idle_timeout));
    let signaled = ctx.drain.signaled();
    let result = match protocol {
        Protocol::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .adaptive_window(true)
                .max_concurrent_streams(20_000)
                .max_header_list_size(ctx.limits.max_header_bytes as u32)
                .keep_alive_interval(Some(Duration::from_secs(20)))
                .keep_alive_timeout(Duration::from_secs(10))
                .serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = signaled => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        _ => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // hyper's timer would also close idle keep-alive connections after this long;
                // the first head is checked by `read_first_head`, idleness by `IdleTimeout`.
                .header_read_timeout(None)
                .max_buf_size(ctx.limits.max_header_bytes.max(8192))
                .keep_alive(true)
                .serve_connection(io, svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = signaled => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%client, error = %e, "http connection ended with error");
    }
}

async fn forward_tcp(
    io: PrefixedIo<TcpStream>,
    client: SocketAddr,
    kind: ListenerKind,
    ctx: Arc<ServerCtx>,
) {
    let mut io = io;
    let (upstream, flow): (Result<BoxedIo, _>, TcpFlow) = match &kind {
        ListenerKind::Outbound => {
            // Without an original destination (transparent mode) there is nothing to route by.
            tracing::debug!(%client, "opaque connection on the outbound listener has no destination; closing");
            let _ = io.shutdown().await;
            return;
        }
        ListenerKind::Upstream(dest) => {
            let flow = TcpFlow {
                direction: Direction::Outbound,
                client,
                src: ctx.service.clone(),
                dst: dest.label.clone(),
            };
            dest.known(DISCOVERY_TIMEOUT).await;
            let upstream = match dest.pick() {
                // Per connection: the choice counts as in flight while the connection opens.
                Ok((ep, in_flight)) => {
                    let opened = open_tcp(
                        &ctx.clients,
                        &ep,
                        &dest.name,
                        &format!("{}:{}", dest.name, ep.address.port()),
                    )
                    .await;
                    let outcome = match &opened {
                        Ok(_) => Outcome::Success,
                        Err(e) => Outcome::Failure(e.reason()),
                    };
                    dest.record(&in_flight, outcome);
                    opened
                }
                Err(e) => Err(e),
            };
            (upstream, flow)
        }
        ListenerKind::Inbound => {
            let flow = TcpFlow {
                direction: Direction::Inbound,
                client,
                src: Label::from(UNKNOWN),
                dst: ctx.service.clone(),
            };
            let upstream = client::connect(ctx.app, ctx.clients.settings().connect_timeout)
                .await
                .map(|s| Box::new(s) as BoxedIo);
            (upstream, flow)
        }
    };
    match upstream {
        Ok(mut upstream) => {
            splice(&mut io, &mut upstream, &flow, &ctx.metrics, &ctx.access_log).await
        }
        Err(e) => {
            tracing::info!(%client, dst = %flow.dst, error = %e, "tcp upstream unavailable; closing");
            ctx.metrics
                .proxy_errors
                .get_or_create(&crate::metrics::ProxyErrorLabels {
                    direction: flow.direction.as_str(),
                    reason: e.reason(),
                })
                .inc();
            let _ = io.shutdown().await;
        }
    }
}
