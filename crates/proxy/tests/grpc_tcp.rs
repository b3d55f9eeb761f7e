//! gRPC (HTTP/2) and opaque TCP through real proxies on loopback.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::codegen::tokio_stream::StreamExt;
use trellis_core::ProtocolHint;
use trellis_test_support::grpc::{self, EchoClient, EchoRequest};
use trellis_test_support::tcp;

async fn grpc_client(addr: std::net::SocketAddr) -> EchoClient<tonic::transport::Channel> {
    EchoClient::connect(format!("http://{addr}")).await.unwrap()
}

#[tokio::test]
async fn grpc_unary_keeps_trailers_and_status_codes() {
    let server = grpc::spawn_echo().await;
    let mesh = TwoHop::new("echo", server.addr, ProtocolHint::Grpc).await;
    let mut client = grpc_client(mesh.upstream("echo")).await;

    let rsp = client
        .unary(EchoRequest {
            message: "hi".into(),
            fail_with_code: 0,
        })
        .await
        .unwrap();
    assert_eq!(rsp.metadata().get("x-echo-header").unwrap(), "present");
    assert_eq!(rsp.get_ref().message, "hi");
    // Identity is empty until mTLS; a forged one never reaches the server.
    assert_eq!(rsp.get_ref().client_id, "");

    // A gRPC error travels in trailers; it must arrive intact.
    let status = client
        .unary(EchoRequest {
            message: "x".into(),
            fail_with_code: tonic::Code::NotFound as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(status.message(), "requested failure");

    let m = metrics(&mesh.server).await;
    assert!(
        m.contains(r#"direction="inbound",src="unknown",dst="echo",route="default",code="200""#),
        "{m}"
    );
}

#[tokio::test]
async fn grpc_bidirectional_streaming_through_two_proxies() {
    let server = grpc::spawn_echo().await;
    let mesh = TwoHop::new("echo", server.addr, ProtocolHint::Detect).await;
    let mut client = grpc_client(mesh.upstream("echo")).await;

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let outbound = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut replies = client.bidi(outbound).await.unwrap().into_inner();
    // Interleave: each reply must come back before the next message is sent, proving the
    // stream is not buffered to completion anywhere on the path.
    for i in 0..20 {
        tx.send(EchoRequest {
            message: format!("m{i}"),
            fail_with_code: 0,
        })
        .await
        .unwrap();
        let reply = replies.next().await.unwrap().unwrap();
        assert_eq!(reply.message, format!("m{i}"));
    }
    drop(tx);
    assert!(replies.next().await.is_none());
}

#[tokio::test]
async fn grpc_errors_from_the_proxy_are_grpc_statuses() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = config("client", &[]);
    cfg.destinations.insert(
        name("echo"),
        destination(ProtocolHint::Grpc, &[(dead, true)]),
    );
    cfg.upstreams
        .insert(name("echo"), "127.0.0.1:0".parse().unwrap());
    let proxy = start(cfg).await;
    let mut client = grpc_client(proxy.bound.upstreams[&name("echo")]).await;
    let status = client
        .unary(EchoRequest {
            message: "x".into(),
            fail_with_code: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(
        status.metadata().get("x-trellis-error").unwrap(),
        "connect-failed"
    );
}

async fn echo_roundtrip(addr: std::net::SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap(); // half-close: the echo server answers after our FIN
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    back
}

#[tokio::test]
async fn tcp_echo_with_half_close_through_two_proxies() {
    let echo = tcp::spawn_echo().await;
    for hint in [ProtocolHint::Detect, ProtocolHint::Tcp] {
        let mesh = TwoHop::new("redis", echo.addr, hint).await;
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(
            echo_roundtrip(mesh.upstream("redis"), &payload).await,
            payload,
            "{hint:?}"
        );
        let m = metrics(&mesh.client).await;
        assert!(
            m.contains(r#"trellis_tcp_bytes_total{direction="outbound",src="client",dst="redis",flow="rx"} 200000"#),
            "{m}"
        );
    }
}

#[tokio::test]
async fn tcp_to_a_plain_endpoint_and_inbound_from_outside_the_mesh() {
    let echo = tcp::spawn_echo().await;
    let mut cfg = config("client", &[]);
    cfg.destinations.insert(
        name("legacy"),
        destination(ProtocolHint::Detect, &[(echo.addr, false)]),
    );
    cfg.upstreams
        .insert(name("legacy"), "127.0.0.1:0".parse().unwrap());
    let client = start(cfg).await;
    assert_eq!(
        echo_roundtrip(client.bound.upstreams[&name("legacy")], b"\x00binary").await,
        b"\x00binary"
    );

    let server = start(config("legacy", &["--app", &echo.addr.to_string()])).await;
    assert_eq!(
        echo_roundtrip(server.bound.inbound, b"\x01raw").await,
        b"\x01raw"
    );
}

#[tokio::test]
async fn server_speaks_first_protocols_are_not_stalled() {
    let greeter = tcp::spawn_server_first(b"220 mail.example ESMTP ready\r\n").await;
    let mesh = TwoHop::new("smtp", greeter.addr, ProtocolHint::Detect).await;
    let mut s = TcpStream::connect(mesh.upstream("smtp")).await.unwrap();
    let start = Instant::now();
    let mut greeting = vec![0u8; 30];
    // Generous bound for a loaded CI machine; the elapsed time is reported, not asserted.
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greeting))
        .await
        .expect("greeting must arrive after detection gives up")
        .unwrap();
    eprintln!(
        "server-first greeting after {:?} (detect timeout 100ms; the peer hop is a CONNECT stream, no second detection)",
        start.elapsed()
    );
    assert_eq!(&greeting, b"220 mail.example ESMTP ready\r\n");
    s.write_all(b"QUIT\r\n").await.unwrap();
    let mut echo = vec![0u8; 6];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"QUIT\r\n");
    let m = metrics(&mesh.client).await;
    assert!(m.contains(r#"trellis_protocol_detections_total{listener="upstream",protocol="tcp",reason="timeout"} 1"#), "{m}");

    // Declared `tcp`: no detection at all.
    let mesh = TwoHop::new("smtp", greeter.addr, ProtocolHint::Tcp).await;
    let mut s = TcpStream::connect(mesh.upstream("smtp")).await.unwrap();
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"220 mail.example ESMTP ready\r\n");
    let m = metrics(&mesh.client).await;
    assert!(m.contains(r#"trellis_protocol_detections_total{listener="upstream",protocol="tcp",reason="declared"} 1"#), "{m}");
}
