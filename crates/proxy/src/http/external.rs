//! ExternalService (egress, the ambassador pattern): the app calls a mesh name; the proxy sends
//! the call to the addresses configured for the environment it runs in (`--env`), optionally
//! originating TLS. Routes, retries, ejection, limits and metrics apply as to any destination.
//!
//! Host names are resolved when the service's addresses arrive (first use, every change, every
//! resync). Originated TLS is TLS 1.2/1.3 with the resource's `caBundle`, or the system roots
//! (`/etc/ssl/certs/ca-certificates.crt`); one connection per request (no pool yet).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use trellis_core::discovery::ExternalEndpoints;
use trellis_core::resources::ExternalTls;
use trellis_core::{Endpoint, ServiceName};

use crate::body::Body;
use crate::error::ProxyError;
use crate::http::destinations::Destinations;

/// Where system roots are read from when a resource brings none.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Resolves `external`'s addresses for `env` in the background and installs them.
pub fn spawn_resolve(
    destinations: Arc<Destinations>,
    service: ServiceName,
    external: ExternalEndpoints,
    env: String,
) {
    tokio::spawn(async move {
        let addresses = external.by_env.get(&env).cloned().unwrap_or_default();
        if addresses.is_empty() {
            tracing::warn!(service = %service, env = %env, "external service has no addresses for this environment");
        }
        let mut endpoints = Vec::new();
        for host_port in addresses {
            match tokio::net::lookup_host(host_port.as_str()).await {
                Ok(addrs) => {
                    for address in addrs {
                        endpoints.push(Endpoint {
                            address,
                            meshed: false,
                            namespace: None,
                            external_host: Some(host_port.clone()),
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(service = %service, address = %host_port, error = %e, "cannot resolve external address")
                }
            }
        }
        let tls = match external.tls.as_ref().map(client_config).transpose() {
            Ok(tls) => tls,
            Err(e) => {
                tracing::warn!(service = %service, error = %e, "external TLS roots unusable; calls will fail");
                None
            }
        };
        tracing::info!(service = %service, env = %env, endpoints = endpoints.len(), tls = external.tls.is_some(), "external service resolved");
        destinations.set_external(service.as_str(), endpoints, tls);
    });
}

fn client_config(tls: &ExternalTls) -> Result<Arc<rustls::ClientConfig>, String> {
    let pem = match &tls.ca_bundle {
        Some(pem) => pem.clone().into_bytes(),
        None => std::fs::read(SYSTEM_ROOTS).map_err(|e| format!("{SYSTEM_ROOTS}: {e}"))?,
    };
    let roots = trellis_api::tls::root_store(&pem).map_err(|e| e.to_string())?;
    let mut config = rustls::ClientConfig::builder_with_provider(trellis_api::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The host part of `host:port`.
fn host_of(host_port: &str) -> &str {
    if let Some(rest) = host_port.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host_port.rsplit_once(':').map_or(host_port, |(h, _)| h)
}

/// Sets the `Host` the external server expects (default ports left out).
pub fn set_host(req: &mut Request<Body>, host_port: &str, tls: bool) {
    let default_port = if tls { ":443" } else { ":80" };
    let host = host_port.strip_suffix(default_port).unwrap_or(host_port);
    if let Ok(v) = HeaderValue::from_str(host) {
        req.headers_mut().insert(header::HOST, v);
    }
}

/// Sends `req` over a new TLS connection to `addr`, verifying `sni` (or the endpoint's host).
pub async fn send_tls(
    addr: SocketAddr,
    host_port: &str,
    sni: Option<&str>,
    config: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    req: Request<Body>,
) -> Result<Response<Incoming>, ProxyError> {
    let name = sni.unwrap_or_else(|| host_of(host_port)).to_owned();
    let server_name = ServerName::try_from(name.clone())
        .map_err(|e| ProxyError::Malformed(format!("server name {name:?}: {e}")))?;
    let tcp = crate::http::client::connect(addr, connect_timeout).await?;
    let tls = tokio::time::timeout(
        connect_timeout,
        tokio_rustls::TlsConnector::from(config).connect(server_name, tcp),
    )
    .await
    .map_err(|_| ProxyError::ConnectTimeout { addr })?
    .map_err(|source| ProxyError::ConnectFailed { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(ProxyError::upstream)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "external TLS connection ended with error");
        }
    });
    sender.send_request(req).await.map_err(ProxyError::upstream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_default_ports() {
        assert_eq!(host_of("api.example.com:443"), "api.example.com");
        assert_eq!(host_of("[::1]:8443"), "::1");
        let mut req = Request::new(crate::body::empty());
        set_host(&mut req, "api.example.com:443", true);
        assert_eq!(req.headers()["host"], "api.example.com");
        set_host(&mut req, "api.example.com:8443", true);
        assert_eq!(req.headers()["host"], "api.example.com:8443");
    }
}
