//! Load balancing through a real proxy: one slow endpoint among fast ones gets little traffic
//! under power-of-two-choices over peak-EWMA latency.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{config, destination, name, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_core::ProtocolHint;
use trellis_test_support::http_server;

async fn get(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_gets_under_ten_percent() {
    let fast_a = http_server::spawn("fast-a").await;
    let fast_b = http_server::spawn("fast-b").await;
    let slow = http_server::spawn_with_delay("slow", Duration::from_millis(100)).await;
    let mut cfg = config("client", &[]);
    cfg.destinations.insert(
        name("api"),
        destination(
            ProtocolHint::Http,
            &[
                (fast_a.addr, false),
                (fast_b.addr, false),
                (slow.addr, false),
            ],
        ),
    );
    cfg.upstreams
        .insert(name("api"), "127.0.0.1:0".parse().unwrap());
    let proxy = start(cfg).await;
    let up = proxy.bound.upstreams[&name("api")];
    // Eight concurrent callers, 600 requests in all.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..75 {
                if get(up).await.starts_with("HTTP/1.1 200") {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    let (a, b, s) = (
        fast_a.requests.load(std::sync::atomic::Ordering::SeqCst),
        fast_b.requests.load(std::sync::atomic::Ordering::SeqCst),
        slow.requests.load(std::sync::atomic::Ordering::SeqCst),
    );
    eprintln!("fast-a {a}, fast-b {b}, slow {s}");
    assert_eq!(ok, 600);
    assert_eq!(a + b + s, 600);
    assert!(s * 10 < 600, "the slow endpoint got {s} of 600");
    assert!(
        a > 150 && b > 150,
        "both fast endpoints share the rest: {a} / {b}"
    );
}
