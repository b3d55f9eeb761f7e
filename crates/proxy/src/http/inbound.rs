//! Inbound: from peer proxies (HTTP/2, possibly carrying HTTP/1 and CONNECT tunnels) or from
//! outside the mesh (HTTP/1, HTTP/2) toward the local app on `--app`.
//!
//! The request leaves in the protocol the original caller used: HTTP/1 restored from the mesh
//! marker, HTTP/2 (gRPC) kept as HTTP/2 with prior knowledge.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Method, Version};
use tower::Service;

use crate::body;
use crate::error::ProxyError;
use crate::http::client::{self, Clients};
use crate::http::headers::{self, ORIG_PROTO};
use crate::http::outbound::{prepare_absolute_h2, restore_http1};
use crate::http::tunnel::{self, TunnelCtx};
use crate::http::{Direction, RequestMeta};
use crate::layers::{HttpRequest, HttpResponse};
use crate::metrics::Label;
use crate::tcp::TcpFlow;

/// Sends inbound requests to the local app.
#[derive(Clone)]
pub struct ForwardToApp {
    app: SocketAddr,
    clients: Clients,
    tunnels: TunnelCtx,
}

impl ForwardToApp {
    pub fn app_port(&self) -> u16 {
        self.app.port()
    }

    pub fn new(app: SocketAddr, clients: Clients, tunnels: TunnelCtx) -> Self {
        Self {
            app,
            clients,
            tunnels,
        }
    }
}

impl Service<HttpRequest> for ForwardToApp {
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

impl ForwardToApp {
    fn flow(&self, req: &HttpRequest) -> TcpFlow {
        let meta = req.extensions().get::<RequestMeta>();
        TcpFlow {
            direction: Direction::Inbound,
            client: meta.map_or_else(|| ([0, 0, 0, 0], 0).into(), |m| m.client),
            src: meta.map_or_else(|| Label::from(""), |m| m.src.clone()),
            dst: meta.map_or_else(|| Label::from(""), |m| m.dst.clone()),
        }
    }

    async fn forward(&self, mut req: HttpRequest) -> Result<HttpResponse, ProxyError> {
        if req.method() == Method::CONNECT {
            let app = client::connect(self.app, self.clients.settings().connect_timeout).await?;
            let flow = self.flow(&req);
            return Ok(tunnel::accept_connect(
                &mut req,
                Box::new(app),
                flow,
                &self.tunnels,
            ));
        }
        if headers::is_upgrade(&req) {
            let client_upgrade = hyper::upgrade::on(&mut req);
            let flow = self.flow(&req);
            let rsp = self.clients.send_http1(self.app, req).await?;
            return Ok(tunnel::relay_upgrade(
                client_upgrade,
                rsp,
                flow,
                &self.tunnels,
            ));
        }
        let from_http1_caller = req.headers_mut().remove(ORIG_PROTO).is_some();
        let mut rsp = if req.version() == Version::HTTP_2 && !from_http1_caller {
            prepare_absolute_h2(&mut req)?;
            self.clients.h2.send(self.app, None, req).await?
        } else {
            if from_http1_caller {
                restore_http1(&mut req);
            }
            headers::strip_hop_by_hop(req.headers_mut());
            self.clients.send_http1(self.app, req).await?
        };
        headers::strip_hop_by_hop(rsp.headers_mut());
        Ok(rsp.map(body::boxed))
    }
}
