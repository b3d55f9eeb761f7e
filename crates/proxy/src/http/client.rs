//! Upstream HTTP clients.
//!
//! - [`H2Pool`]: one multiplexed HTTP/2 connection per address. Used toward peer proxies (all
//!   mesh HTTP rides it, HTTP/1 included) and toward HTTP/2/gRPC servers. A new connection is
//!   made only when the current one is closed; concurrent callers wait for that one connect
//!   instead of each dialing their own.
//! - [`Clients::http1`]: hyper-util's pooled HTTP/1.1 keep-alive client for plain HTTP/1 servers
//!   (and for `Upgrade` requests, which need a connection of their own).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use trellis_core::identity::SpiffeId;
use trellis_core::names::{Namespace, ServiceName};

use crate::body::Body;
use crate::error::ProxyError;
use crate::identity::MeshIdentity;
use crate::metrics::{HandshakeLabels, Metrics};

/// The peer proxy behind an address, when the control plane told us (namespace and service):
/// the identity it must present. `None`: plaintext.
pub type Peer<'a> = Option<(&'a Namespace, &'a ServiceName)>;

/// Connection settings shared by all upstream clients.
#[derive(Debug, Clone, Copy)]
pub struct ClientSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Every client the proxy uses to reach upstreams. Cheap to clone.
#[derive(Clone)]
pub struct Clients {
    pub http1: Client<HttpConnector, Body>,
    pub h2: H2Pool,
    settings: ClientSettings,
}

impl Clients {
    pub fn new(
        settings: ClientSettings,
        identity: Option<Arc<MeshIdentity>>,
        metrics: Metrics,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(settings.idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // The request keeps the Host the app sent, not the endpoint's address.
            .set_host(false)
            .build(connector);
        Self {
            http1,
            h2: H2Pool::new(settings, identity, metrics),
            settings,
        }
    }

    /// Sends an HTTP/1.1 request (an `Upgrade`) on a connection of its own: mTLS to a peer
    /// proxy with a known identity, else plain [`Clients::send_http1`].
    pub async fn send_http1_upgrade(
        &self,
        addr: SocketAddr,
        peer: Peer<'_>,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let Some(peer) = peer.filter(|_| self.h2.identity.is_some()) else {
            return self.send_http1(addr, req).await;
        };
        let stream = connect(addr, self.settings.connect_timeout).await?;
        let tls = self.h2.mtls(addr, stream, peer, Alpn::Http1).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tls))
                .await
                .map_err(ProxyError::upstream)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "upgraded mTLS connection ended");
            }
        });
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *req.uri_mut() = path
            .parse()
            .map_err(|e| ProxyError::Malformed(format!("uri: {e}")))?;
        *req.version_mut() = http::Version::HTTP_11;
        sender.send_request(req).await.map_err(ProxyError::upstream)
    }

    /// Sends an HTTP/1.1 request to `addr`, keeping its Host header. `req`'s URI is rewritten to
    /// point at `addr`.
    pub async fn send_http1(
        &self,
        addr: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        *req.uri_mut() = format!("http://{addr}{path}")
            .parse()
            .map_err(|e| ProxyError::Malformed(format!("uri: {e}")))?;
        *req.version_mut() = http::Version::HTTP_11;
        self.http1.request(req).await.map_err(|e| {
            if e.is_connect() {
                ProxyError::ConnectFailed {
                    addr,
                    source: std::io::Error::other(e.to_string()),
                }
            } else {
                ProxyError::upstream(e)
            }
        })
    }

    pub fn settings(&self) -> ClientSettings {
        self.settings
    }
}

/// Dials `addr` with the configured timeout and TCP_NODELAY.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProxyError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ProxyError::ConnectTimeout { addr })?
        .map_err(|source| ProxyError::ConnectFailed { addr, source })?;
    // Latency matters more than packet count for request/response traffic.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The protocol offered inside mTLS: HTTP/2 (the shared connection) or HTTP/1.1 (a
/// connection of its own, for `Upgrade` requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http1,
}

/// One shared HTTP/2 connection per upstream address.
#[derive(Clone)]
pub struct H2Pool {
    slots: Arc<Mutex<HashMap<SocketAddr, Arc<Slot>>>>,
    settings: ClientSettings,
    /// With an identity, connections to peers with a known identity are mTLS.
    identity: Option<Arc<MeshIdentity>>,
    metrics: Metrics,
}

#[derive(Default)]
struct Slot {
    current: Mutex<Option<http2::SendRequest<Body>>>,
    /// Held while dialing so concurrent callers share one new connection.
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn ready_sender(&self) -> Option<http2::SendRequest<Body>> {
        let guard = self.current.lock().ok()?;
        guard.as_ref().filter(|s| !s.is_closed()).cloned()
    }
}

impl H2Pool {
    pub fn new(
        settings: ClientSettings,
        identity: Option<Arc<MeshIdentity>>,
        metrics: Metrics,
    ) -> Self {
        Self {
            slots: Arc::default(),
            settings,
            identity,
            metrics,
        }
    }

    fn slot(&self, addr: SocketAddr) -> Arc<Slot> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still usable.
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(addr).or_default().clone()
    }

    /// A sender on a live connection to `addr`, dialing one if needed.
    pub async fn sender(
        &self,
        addr: SocketAddr,
        peer: Peer<'_>,
    ) -> Result<http2::SendRequest<Body>, ProxyError> {
        let slot = self.slot(addr);
        if let Some(s) = slot.ready_sender() {
            return Ok(s);
        }
        // Boxed: the dial (TCP, mTLS, HTTP/2 handshake) is a large future that only new
        // connections need; inline, every request's future would carry (and copy) it.
        Box::pin(self.dial(slot, addr, peer)).await
    }

    async fn dial(
        &self,
        slot: Arc<Slot>,
        addr: SocketAddr,
        peer: Peer<'_>,
    ) -> Result<http2::SendRequest<Body>, ProxyError> {
        let _dialing = slot.connecting.lock().await;
        if let Some(s) = slot.ready_sender() {
            return Ok(s);
        }
        let stream = connect(addr, self.settings.connect_timeout).await?;
        let sender = match peer {
            Some(peer) if self.identity.is_some() => {
                let tls = self.mtls(addr, stream, peer, Alpn::H2).await?;
                self.handshake(addr, tls).await?
            }
            _ => self.handshake(addr, stream).await?,
        };
        if let Ok(mut current) = slot.current.lock() {
            *current = Some(sender.clone());
        }
        Ok(sender)
    }

    /// The mTLS handshake with the peer proxy at `addr`, which must present `peer`'s identity.
    pub async fn mtls(
        &self,
        addr: SocketAddr,
        stream: TcpStream,
        (namespace, service): (&Namespace, &ServiceName),
        alpn: Alpn,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ProxyError> {
        let failed = |reason: String| ProxyError::ConnectFailed {
            addr,
            source: std::io::Error::other(reason),
        };
        let identity = self
            .identity
            .as_ref()
            .ok_or_else(|| failed("no workload identity (static mode)".into()))?;
        let tls = identity
            .tls()
            .ok_or_else(|| failed("no workload certificate yet".into()))?;
        let expected = SpiffeId::new(
            &identity.id.trust_domain,
            namespace.clone(),
            service.clone(),
        );
        let mut config = tls
            .client_config(&expected)
            .map_err(|e| failed(e.to_string()))?;
        if alpn == Alpn::Http1 {
            let mut http1 = (*config).clone();
            http1.alpn_protocols.clear();
            config = Arc::new(http1);
        }
        let connecting = tokio_rustls::TlsConnector::from(config)
            .connect(trellis_api::tls::server_name(), stream);
        let result = match tokio::time::timeout(self.settings.connect_timeout, connecting).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        };
        let class = match &result {
            Ok(_) => "ok",
            Err(e) => trellis_api::tls::classify_handshake_error(e),
        };
        self.metrics
            .tls_handshakes
            .get_or_create(&HandshakeLabels {
                direction: "outbound",
                result: class,
            })
            .inc();
        result.map_err(|source| {
            tracing::warn!(%addr, peer = %expected, result = class, hint = trellis_api::tls::handshake_hint(class), error = %source, "mTLS handshake to peer failed");
            ProxyError::ConnectFailed { addr, source }
        })
    }

    async fn handshake<I>(
        &self,
        addr: SocketAddr,
        io: I,
    ) -> Result<http2::SendRequest<Body>, ProxyError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake::<_, Body>(TokioIo::new(io))
            .await
            .map_err(|e| ProxyError::ConnectFailed {
                addr,
                source: std::io::Error::other(e),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "http/2 upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends a request over the shared connection to `addr`. The URI must be absolute.
    pub async fn send(
        &self,
        addr: SocketAddr,
        peer: Peer<'_>,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let sender = self.sender(addr, peer).await?;
        Self::send_on(sender, req).await
    }

    /// Sends a request on a connection obtained with [`H2Pool::sender`].
    pub async fn send_on(
        mut sender: http2::SendRequest<Body>,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        sender.ready().await.map_err(ProxyError::upstream)?;
        sender.send_request(req).await.map_err(ProxyError::upstream)
    }
}
