//! End-to-end: the real `trellis-proxy` binary on loopback (exit codes, env config, admin,
//! access log, SIGTERM drain).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use trellis_test_support::process::ProxyProcess;
use trellis_test_support::{eventually, http_server};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_trellis-proxy"))
}

fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("trellis-e2e-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    uri: &str,
    host: &str,
    body: &str,
) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", host)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let rsp = sender.send_request(req).await.unwrap();
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn invalid_config_exits_64_naming_file_and_field() {
    let path = temp_file(
        "bad.yaml",
        "service: web\ndestinations:\n  payments:\n    timeout: soon\n",
    );
    let out = tokio::process::Command::new(bin())
        .args(["--config", path.to_str().unwrap(), "--admin", "127.0.0.1:0"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.yaml"), "{stderr}");
    assert!(stderr.contains("destinations.payments.timeout"), "{stderr}");

    let out = tokio::process::Command::new(bin()).output().await.unwrap();
    assert_eq!(out.status.code(), Some(64), "missing --service");
    let out = tokio::process::Command::new(bin())
        .arg("--no-such-flag")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[tokio::test]
async fn admin_endpoints_env_config_and_shutdown() {
    // Configured entirely through TRELLIS_* variables.
    let mut proxy = ProxyProcess::spawn_with_env(
        bin(),
        &[],
        &[("TRELLIS_SERVICE", "web"), ("TRELLIS_NAMESPACE", "shop")],
    )
    .await;
    let admin = proxy.admin;
    assert_eq!(request(admin, "GET", "/live", "x", "").await.0, 200);
    assert_eq!(request(admin, "GET", "/ready", "x", "").await.0, 200);
    let (status, config) = request(admin, "GET", "/config", "x", "").await;
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["config"]["service"], "web");
    assert_eq!(config["config"]["namespace"], "shop");
    assert_eq!(config["listening"]["admin"], admin.to_string());

    assert_eq!(
        request(admin, "GET", "/log-level", "x", "").await.1.trim(),
        "info"
    );
    assert_eq!(
        request(admin, "PUT", "/log-level", "x", "debug").await.0,
        200
    );
    assert_eq!(
        request(admin, "GET", "/log-level", "x", "").await.1.trim(),
        "debug"
    );
    assert_eq!(request(admin, "PUT", "/log-level", "x", "[[[").await.0, 400);

    let (status, metrics) = request(admin, "GET", "/metrics", "x", "").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"trellis_proxy_info{version="0.1.0",service="web",namespace="shop"} 1"#),
        "{metrics}"
    );
    assert_eq!(request(admin, "GET", "/nope", "x", "").await.0, 404);

    assert_eq!(request(admin, "POST", "/shutdown", "x", "").await.0, 202);
    let status = proxy.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}\n{}", proxy.output());
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits_0() {
    let app = http_server::spawn("backend").await;
    let server = ProxyProcess::spawn(
        bin(),
        &["--service", "backend", "--app", &app.addr.to_string()],
    )
    .await;
    let config = temp_file(
        "client.yaml",
        &format!(
            "service: client\ndestinations:\n  backend:\n    endpoints:\n      - address: {}\n",
            server.inbound
        ),
    );
    let mut client = ProxyProcess::spawn(
        bin(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--upstream",
            "backend=127.0.0.1:0",
            "--access-log",
            "stdout",
        ],
    )
    .await;
    let up = client.upstream("backend");

    let in_flight: Vec<_> = (0..5)
        .map(|_| tokio::spawn(request(up, "GET", "/slow?ms=1000", "backend", "")))
        .collect();
    eventually("requests reach the app", Duration::from_secs(5), || async {
        (app.requests() == 5).then_some(())
    })
    .await;
    client.signal("TERM");
    for r in in_flight {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, "slow done");
    }
    let status = client.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}\n{}", client.output());
    // The listener closed: new connections are refused.
    assert!(TcpStream::connect(up).await.is_err());

    // One JSON access log line per request, on stdout.
    let out = client.output();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["kind"] == "http")
        .collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["dst_service"], "backend");
    assert_eq!(lines[0]["path"], "/slow");
    assert!(lines[0]["duration_ms"].as_f64().unwrap() >= 900.0);
}
