//! Header rules at the proxy's edges.
//!
//! Between two Trellis proxies every request travels over HTTP/2. HTTP/2 forbids connection-
//! specific headers, so HTTP/1 requests are cleaned before crossing and marked with
//! [`ORIG_PROTO`] so the far proxy restores HTTP/1 toward its app.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};

/// Marks a request that arrived as HTTP/1.x and must leave the far proxy as HTTP/1.1.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-trellis-orig-proto");
pub const ORIG_PROTO_HTTP1: HeaderValue = HeaderValue::from_static("http/1.1");

/// The caller's identity, set by the inbound proxy only (stripped everywhere else).
pub const CLIENT_ID: HeaderName = HeaderName::from_static("x-trellis-client-id");

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

/// Removes hop-by-hop headers, including any named by `Connection`. `TE: trailers` survives
/// because gRPC needs it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether the request asks for a protocol upgrade (WebSocket and friends).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The authority a request names: the URI's (absolute form, HTTP/2) or the Host header's.
pub fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

/// Whether a request is gRPC (errors must then be expressed as `grpc-status`).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Header lookup for the core's route matching (`trellis_core::discovery::Headers`).
pub struct RequestHeaders<'a>(pub &'a http::HeaderMap);

impl trellis_core::discovery::Headers for RequestHeaders<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_but_keeps_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(
            h.get(header::TE).map(|v| v.as_bytes()),
            Some(&b"trailers"[..])
        );
        assert!(h.get("x-keep").is_some());
    }

    #[test]
    fn finds_authority_in_uri_or_host() {
        let req = Request::get("http://payments/x").body(()).expect("req");
        assert_eq!(authority(&req), Some("payments"));
        let req = Request::get("/x")
            .header("host", "payments:8080")
            .body(())
            .expect("req");
        assert_eq!(authority(&req), Some("payments:8080"));
        let req = Request::get("/x").body(()).expect("req");
        assert_eq!(authority(&req), None);
    }

    #[test]
    fn detects_upgrade_requests() {
        let req = Request::get("/ws")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .expect("req");
        assert!(is_upgrade(&req));
        let req = Request::get("/")
            .header("upgrade", "websocket")
            .body(())
            .expect("req");
        assert!(!is_upgrade(&req));
    }
}
