//! Byte tunnels inside HTTP: `CONNECT` (an app's HTTP-proxy tunnel, and opaque TCP between two
//! proxies riding the shared HTTP/2 connection as a CONNECT stream, the idea behind Istio's
//! HBONE) and `Upgrade` (WebSocket). In every case the proxy answers or relays the handshake,
//! then splices the two upgraded streams as opaque TCP.

use std::net::SocketAddr;

use http::{Method, Request, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::access_log::AccessLog;
use crate::body::{self, Body};
use crate::drain::Drain;
use crate::error::ProxyError;
use crate::http::client::H2Pool;
use crate::metrics::Metrics;
use crate::tcp::{BoxedIo, TcpFlow, splice};

/// Opens an opaque byte stream to the peer proxy at `addr` as a CONNECT stream on the shared
/// HTTP/2 connection. `authority` names the target for the peer's logs.
pub async fn open_mesh_tunnel(
    pool: &H2Pool,
    addr: SocketAddr,
    peer: crate::http::client::Peer<'_>,
    authority: &str,
) -> Result<BoxedIo, ProxyError> {
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .version(http::Version::HTTP_2)
        .body(body::empty())
        .map_err(|e| ProxyError::Malformed(format!("tunnel authority {authority:?}: {e}")))?;
    let rsp = pool.send(addr, peer, req).await?;
    if !rsp.status().is_success() {
        return Err(ProxyError::upstream(format!(
            "peer refused tunnel with status {}",
            rsp.status()
        )));
    }
    let upgraded = hyper::upgrade::on(rsp)
        .await
        .map_err(ProxyError::upstream)?;
    Ok(Box::new(TokioIo::new(upgraded)))
}

/// Everything a spawned tunnel needs to splice and report.
#[derive(Clone)]
pub struct TunnelCtx {
    pub metrics: Metrics,
    pub access_log: AccessLog,
    pub drain: Drain,
}

/// Answers a `CONNECT` whose upstream is already connected: replies 200 and, once the client's
/// side is upgraded, splices it with `upstream`.
pub fn accept_connect(
    req: &mut Request<Body>,
    mut upstream: BoxedIo,
    flow: TcpFlow,
    ctx: &TunnelCtx,
) -> Response<Body> {
    let on_upgrade = hyper::upgrade::on(req);
    let ctx = ctx.clone();
    let drain = ctx.drain.clone();
    drain.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                splice(
                    &mut client,
                    &mut upstream,
                    &flow,
                    &ctx.metrics,
                    &ctx.access_log,
                )
                .await;
            }
            Err(e) => tracing::debug!(error = %e, "client never completed CONNECT upgrade"),
        }
    });
    Response::new(body::empty())
}

/// Relays an `Upgrade` response: when the upstream agreed (101), splices the client's and the
/// upstream's upgraded connections.
pub fn relay_upgrade(
    client_upgrade: OnUpgrade,
    mut rsp: Response<hyper::body::Incoming>,
    flow: TcpFlow,
    ctx: &TunnelCtx,
) -> Response<Body> {
    if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut rsp);
        let ctx = ctx.clone();
        let drain = ctx.drain.clone();
        drain.spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let mut client = TokioIo::new(client);
                    let mut upstream = TokioIo::new(upstream);
                    splice(
                        &mut client,
                        &mut upstream,
                        &flow,
                        &ctx.metrics,
                        &ctx.access_log,
                    )
                    .await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
    }
    rsp.map(body::boxed)
}
