//! Shared fixtures for the in-process proxy tests: real proxies on loopback port 0, wired as
//! a mesh call (client proxy → HTTP/2 → server proxy → app).

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use trellis_core::{Destination, Endpoint, ProtocolHint, ServiceName};
use trellis_proxy::app::{self, Running};
use trellis_proxy::config::{Args, ProxyConfig};
use trellis_proxy::logging::Fixed;

pub(crate) fn name(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

/// A proxy config for `service` with every listener on port 0 and extra flags.
pub(crate) fn config(service: &str, extra: &[&str]) -> ProxyConfig {
    let mut argv = vec![
        "trellis-proxy",
        "--service",
        service,
        "--outbound",
        "127.0.0.1:0",
        "--inbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--drain-timeout",
        "5s",
    ];
    argv.extend_from_slice(extra);
    ProxyConfig::from_args(Args::try_parse_from(argv).unwrap()).unwrap()
}

pub(crate) fn destination(protocol: ProtocolHint, endpoints: &[(SocketAddr, bool)]) -> Destination {
    Destination {
        protocol,
        timeout: None,
        endpoints: endpoints
            .iter()
            .map(|&(address, meshed)| Endpoint {
                address,
                meshed,
                namespace: None,
                external_host: None,
            })
            .collect(),
    }
}

pub(crate) async fn start(config: ProxyConfig) -> Running {
    app::start(config, Arc::new(Fixed::default()))
        .await
        .unwrap()
}

/// A server proxy in front of `app`, and a client proxy whose destination `dst` points at the
/// server proxy (meshed) with an upstream port for it.
pub(crate) struct TwoHop {
    pub(crate) client: Running,
    pub(crate) server: Running,
}

impl TwoHop {
    pub(crate) async fn new(dst: &str, app: SocketAddr, protocol: ProtocolHint) -> Self {
        let server = start(config(dst, &["--app", &app.to_string()])).await;
        let mut client_cfg = config("client", &[]);
        client_cfg.destinations.insert(
            name(dst),
            destination(protocol, &[(server.bound.inbound, true)]),
        );
        client_cfg
            .upstreams
            .insert(name(dst), "127.0.0.1:0".parse().unwrap());
        let client = start(client_cfg).await;
        Self { client, server }
    }

    pub(crate) fn upstream(&self, dst: &str) -> SocketAddr {
        self.client.bound.upstreams[&name(dst)]
    }
}

/// Sends one HTTP/1.1 request over a fresh connection to `addr` (used for proxies, where the
/// request URI may be absolute-form).
pub(crate) async fn http1(
    addr: SocketAddr,
    req: http::Request<Full<Bytes>>,
) -> (http::response::Parts, Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let rsp = sender.send_request(req).await.unwrap();
    let (parts, body) = rsp.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

pub(crate) fn get(uri: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(uri)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Fetches the admin metrics text of a running proxy.
pub(crate) async fn metrics(proxy: &Running) -> String {
    let (_, body) = http1(proxy.bound.admin, get("/metrics")).await;
    String::from_utf8(body.to_vec()).unwrap()
}
