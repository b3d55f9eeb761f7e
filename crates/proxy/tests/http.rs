//! HTTP through real proxies on loopback: HTTP/1.1, streaming bodies, HTTP-proxy style
//! addressing, upgrades, CONNECT, and the errors the proxy generates itself.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_core::ProtocolHint;
use trellis_test_support::{http_server, tcp};

#[tokio::test]
async fn http1_get_and_post_cross_two_proxies_as_http1() {
    let app = http_server::spawn("payments").await;
    let mesh = TwoHop::new("payments", app.addr, ProtocolHint::Detect).await;
    let up = mesh.upstream("payments");

    let (parts, body) = http1(
        up,
        http::Request::get("/headers")
            .header("host", "payments")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["x-served-by"], "payments");
    let text = String::from_utf8_lossy(&body);
    // Restored to HTTP/1.1 at the far end, with the Host the client sent.
    assert!(text.contains("version: HTTP/1.1"), "{text}");
    assert!(text.contains("host: payments"), "{text}");
    assert!(!text.contains("x-trellis-orig-proto"), "{text}");

    let (parts, body) = http1(
        up,
        http::Request::post("/echo")
            .header("host", "payments")
            .body(Full::new(Bytes::from_static(b"hello mesh")))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"hello mesh");
}

#[tokio::test]
async fn keep_alive_connections_are_reused_and_one_h2_connection_carries_the_hop() {
    let app = http_server::spawn("payments").await;
    let mesh = TwoHop::new("payments", app.addr, ProtocolHint::Detect).await;
    let stream = TcpStream::connect(mesh.upstream("payments")).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for i in 0..50 {
        let req = http::Request::get(format!("/n/{i}"))
            .header("host", "payments")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let rsp = sender.send_request(req).await.unwrap();
        assert_eq!(rsp.status(), 200);
        rsp.into_body().collect().await.unwrap();
    }
    assert_eq!(app.requests(), 50);
    // The server proxy saw exactly one inbound connection (the shared HTTP/2 one).
    let m = metrics(&mesh.server).await;
    assert!(
        m.contains(r#"trellis_protocol_detections_total{listener="inbound",protocol="http2",reason="matched"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn streams_a_100mb_chunked_body_both_ways() {
    let app = http_server::spawn("payments").await;
    let mesh = TwoHop::new("payments", app.addr, ProtocolHint::Detect).await;
    const TOTAL: usize = 100 * 1024 * 1024;
    let chunk = Bytes::from(vec![7u8; 256 * 1024]);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
    tokio::spawn(async move {
        for _ in 0..TOTAL / chunk.len() {
            if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() {
                return;
            }
        }
    });
    // No content-length: the client sends chunked transfer encoding.
    let body = StreamBody::new(tokio_stream_from(rx));
    let stream = TcpStream::connect(mesh.upstream("payments")).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/echo")
        .header("host", "payments")
        .body(body)
        .unwrap();
    let rsp = sender.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    let mut body = rsp.into_body();
    let mut received = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len();
        }
    }
    assert_eq!(received, TOTAL);
}

fn tokio_stream_from<T>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_core_stream::Stream<Item = T> {
    futures_core_stream::ReceiverStream(rx)
}

mod futures_core_stream {
    pub(crate) use tonic::codegen::tokio_stream::Stream;
    pub(crate) struct ReceiverStream<T>(pub(crate) tokio::sync::mpsc::Receiver<T>);
    impl<T> Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

#[tokio::test]
async fn http_proxy_style_absolute_form_and_host_header() {
    let app = http_server::spawn("payments").await;
    let mesh = TwoHop::new("payments", app.addr, ProtocolHint::Detect).await;
    let outbound = mesh.client.bound.outbound;

    let (parts, body) = http1(outbound, get("http://payments/abs")).await;
    assert_eq!(parts.status, 200, "{body:?}");
    assert_eq!(&body[..], b"hello from payments");

    let req = http::Request::get("/host")
        .header("host", "payments:8080")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (parts, _) = http1(outbound, req).await;
    assert_eq!(parts.status, 200);

    let (parts, body) = http1(outbound, get("http://nowhere.example/")).await;
    assert_eq!(parts.status, 503);
    assert_eq!(parts.headers["x-trellis-error"], "unknown-service");
    assert!(String::from_utf8_lossy(&body).contains("nowhere.example"));
}

#[tokio::test]
async fn client_identity_header_from_the_app_is_stripped() {
    let app = http_server::spawn("payments").await;
    let mesh = TwoHop::new("payments", app.addr, ProtocolHint::Detect).await;
    let req = http::Request::get("/headers")
        .header("host", "payments")
        .header(
            "x-trellis-client-id",
            "spiffe://trellis.local/ns/default/svc/admin",
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (_, body) = http1(mesh.upstream("payments"), req).await;
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("spiffe://"), "{text}");

    // Also when a non-mesh client calls the inbound port directly.
    let req = http::Request::get("/headers")
        .header("host", "payments")
        .header("x-trellis-client-id", "spiffe://forged")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (_, body) = http1(mesh.server.bound.inbound, req).await;
    assert!(!String::from_utf8_lossy(&body).contains("spiffe://"));
}

#[tokio::test]
async fn websocket_upgrade_passes_through_two_proxies() {
    let app = http_server::spawn("chat").await;
    let mesh = TwoHop::new("chat", app.addr, ProtocolHint::Detect).await;
    let mut s = TcpStream::connect(mesh.upstream("chat")).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: chat\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(
            s.read(&mut b).await.unwrap(),
            1,
            "closed before 101: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for msg in [&b"frame-one"[..], b"frame-two"] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
}

#[tokio::test]
async fn connect_tunnel_from_the_app_reaches_a_tcp_service() {
    let echo = tcp::spawn_echo().await;
    let server = start(config("db", &["--app", &echo.addr.to_string()])).await;
    let mut client_cfg = config("client", &[]);
    client_cfg.destinations.insert(
        name("db"),
        destination(ProtocolHint::Tcp, &[(server.bound.inbound, true)]),
    );
    let client = start(client_cfg).await;

    let mut s = TcpStream::connect(client.bound.outbound).await.unwrap();
    s.write_all(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1);
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s.write_all(b"through the tunnel").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"through the tunnel");
}

#[tokio::test]
async fn proxy_errors_are_explicit() {
    // Peer proxy down: nothing listens at the endpoint.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = config("client", &[]);
    cfg.destinations.insert(
        name("gone"),
        destination(ProtocolHint::Detect, &[(dead, true)]),
    );
    cfg.destinations.insert(
        name("plain-gone"),
        destination(ProtocolHint::Detect, &[(dead, false)]),
    );
    cfg.destinations
        .insert(name("empty"), destination(ProtocolHint::Detect, &[]));
    let app = http_server::spawn("slow").await;
    let mut slow = destination(ProtocolHint::Detect, &[(app.addr, false)]);
    slow.timeout = Some(Duration::from_millis(200));
    cfg.destinations.insert(name("slow"), slow);
    let proxy = start(cfg).await;
    let out = proxy.bound.outbound;

    for (uri, status, reason) in [
        ("http://gone/", 502, "connect-failed"),
        ("http://plain-gone/", 502, "connect-failed"),
        ("http://empty/", 503, "no-endpoints"),
        ("http://slow/slow?ms=5000", 504, "timeout"),
    ] {
        let (parts, _) = http1(out, get(uri)).await;
        assert_eq!(parts.status, status, "{uri}");
        assert_eq!(parts.headers["x-trellis-error"], reason, "{uri}");
    }
    let m = metrics(&proxy).await;
    assert!(
        m.contains(r#"trellis_proxy_errors_total{direction="outbound",reason="connect-failed"} 2"#),
        "{m}"
    );
    assert!(
        m.contains(r#"dst="gone",route="default",code="502",classification="failure""#),
        "{m}"
    );
}

#[tokio::test]
async fn malformed_and_hostile_input_is_refused_and_the_proxy_stays_up() {
    let app = http_server::spawn("payments").await;
    let mesh = TwoHop::new("payments", app.addr, ProtocolHint::Detect).await;
    let up = mesh.upstream("payments");

    async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    let rsp = exchange(up, b"GET /x HTTP/1.1\r\nBad Header Name: x\r\n\r\n").await;
    assert!(rsp.starts_with("HTTP/1.1 400"), "{rsp}");
    assert!(rsp.contains("x-trellis-error: malformed-request"), "{rsp}");

    let huge = format!(
        "GET / HTTP/1.1\r\nHost: payments\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let rsp = exchange(up, huge.as_bytes()).await;
    assert!(rsp.starts_with("HTTP/1.1 431"), "{rsp}");

    let rsp = exchange(up, b"GET / HTTP/7.7\r\n\r\n").await;
    assert!(rsp.starts_with("HTTP/1.1 400"), "{rsp}");

    // Garbage on every listener: closed or forwarded as opaque bytes, never a crash.
    for addr in [up, mesh.client.bound.outbound, mesh.server.bound.inbound] {
        let _ = exchange(addr, &[0u8, 159, 146, 150, 255, 1, 2, 3]).await;
        let _ = exchange(addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\ngarbage-frames").await;
        let _ = exchange(addr, &[0x16, 0x03, 0x01, 0xff, 0xff]).await;
        // Half-open: connect and hang up immediately.
        drop(TcpStream::connect(addr).await.unwrap());
    }

    // Still serving.
    let req = http::Request::get("/")
        .header("host", "payments")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (parts, _) = http1(up, req).await;
    assert_eq!(parts.status, 200);
    let m = metrics(&mesh.client).await;
    assert!(
        m.contains(r#"trellis_malformed_requests_total{listener="upstream"} 3"#),
        "{m}"
    );
}

#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    let app = http_server::spawn("payments").await;
    let mut cfg = config("client", &["--header-read-timeout", "300ms"]);
    cfg.destinations.insert(
        name("payments"),
        destination(ProtocolHint::Detect, &[(app.addr, false)]),
    );
    cfg.upstreams
        .insert(name("payments"), "127.0.0.1:0".parse().unwrap());
    let proxy = start(cfg).await;
    let mut s = TcpStream::connect(proxy.bound.upstreams[&name("payments")])
        .await
        .unwrap();
    // Slowloris: a head that never completes.
    s.write_all(b"GET / HTTP/1.1\r\nHost: payments\r\nX-Slow: ")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the proxy must close the connection")
        .unwrap();
    let rsp = String::from_utf8_lossy(&out);
    assert!(rsp.starts_with("HTTP/1.1 408"), "{rsp}");
    assert!(
        rsp.contains("x-trellis-error: header-read-timeout"),
        "{rsp}"
    );
    assert_eq!(app.requests(), 0);
}
