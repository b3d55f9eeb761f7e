//! The mesh with its control plane: real control plane, real proxies and apps on loopback
//! (port 0), resources applied through the HTTP API.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{control, proxy, temp_dir};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use trellis_proxy::app::Running;

use trellis_test_support::eventually;
use trellis_test_support::http_server::{self, HttpServer};
use trellis_test_support::mesh::ControlPlane;
use trellis_test_support::process::{ControlProcess, ProxyProcess, free_port};

/// An app plus its proxy registered with the control plane.
async fn instance(service: &str, cp: &ControlPlane) -> (HttpServer, Running) {
    let app = http_server::spawn(service).await;
    let p = proxy(service, cp, &["--app", &app.addr.to_string()]).await;
    (app, p)
}

async fn apply(cp: &ControlPlane, yaml: &str) -> (u16, serde_json::Value) {
    let (status, body) = cp.apply(yaml).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "control")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let rsp = sender.send_request(req).await.unwrap();
    let status = rsp.status().as_u16();
    let bytes = rsp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

fn split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web-split}}\nspec:\n  parentRefs: [{{name: web}}]\n  rules:\n    - backendRefs: [{{name: web-v1, weight: {v1}}}, {{name: web-v2, weight: {v2}}}]\n      timeouts: {{request: 5s}}\n"
    )
}

/// A keep-alive HTTP/1.1 client to one address.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("client connection failed: {e:?}");
            }
        });
        Self { sender }
    }

    /// Status and `x-served-by` (empty on proxy errors) of one GET.
    async fn get(&mut self, host: &str, path: &str) -> (u16, String) {
        self.sender.ready().await.unwrap();
        let req = http::Request::get(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let rsp = self.sender.send_request(req).await.unwrap();
        let status = rsp.status().as_u16();
        // Who answered, or (for a proxy-generated response) why the proxy refused.
        let by = rsp
            .headers()
            .get("x-served-by")
            .or_else(|| rsp.headers().get("x-trellis-error"))
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        rsp.into_body().collect().await.unwrap();
        (status, by)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_lands_and_changes_take_effect() {
    let (_running, cp) = control("split", |_| {}).await;
    let (_v1_app, _v1) = instance("web-v1", &cp).await;
    let (_v2_app, _v2) = instance("web-v2", &cp).await;
    let (status, body) = apply(&cp, &split(80, 20)).await;
    assert_eq!(status, 200, "{body}");
    let client = proxy("client", &cp, &["--upstream", "web=127.0.0.1:0"]).await;
    let up = client.bound.upstreams[&trellis_core::ServiceName::new("web").unwrap()];

    // Both backends are registered and routed before counting.
    eventually(
        "both versions answer",
        Duration::from_secs(10),
        || async move {
            let mut c = Client::connect(up).await;
            let mut seen = std::collections::HashSet::new();
            for _ in 0..50 {
                seen.insert(c.get("web", "/").await.1);
            }
            (seen.contains("web-v1") && seen.contains("web-v2")).then_some(())
        },
    )
    .await;

    // Connect right before sending: a connection that stays silent past the detection
    // timeout is (by design) treated as opaque TCP.
    let mut c = Client::connect(up).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..2000 {
        let (status, by) = c.get("web", "/").await;
        assert_eq!(status, 200);
        *counts.entry(by).or_default() += 1;
    }
    let v2 = counts.get("web-v2").copied().unwrap_or(0) as f64 / 2000.0;
    eprintln!("80/20 split over 2000 requests: {counts:?}");
    assert!(
        (0.15..=0.25).contains(&v2),
        "v2 share {v2} not within 20% ± 5%"
    );

    let (status, _) = apply(&cp, &split(0, 100)).await;
    assert_eq!(status, 200);
    let changed = Instant::now();
    eventually(
        "the 0/100 split takes effect",
        Duration::from_secs(10),
        || async move {
            let mut c = Client::connect(up).await;
            for _ in 0..20 {
                if c.get("web", "/").await.1 != "web-v2" {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    eprintln!("0/100 observed after {:?}", changed.elapsed());
    for _ in 0..200 {
        assert_eq!(c.get("web", "/").await, (200, "web-v2".to_owned()));
    }
}

fn proxy_bin() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_trellis")).with_file_name("trellis-proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_stops_receiving_traffic() {
    let (_running, cp) = control("kill", |_| {}).await;
    let (join_a, join_b) = (cp.join_args("backend").await, cp.join_args("backend").await);
    let app_a = http_server::spawn("backend-a").await;
    let app_b = http_server::spawn("backend-b").await;
    let _a = ProxyProcess::spawn(
        &proxy_bin(),
        &[
            &["--service", "backend", "--app", &app_a.addr.to_string()],
            &join_a.iter().map(String::as_str).collect::<Vec<_>>()[..],
        ]
        .concat(),
    )
    .await;
    let b = ProxyProcess::spawn(
        &proxy_bin(),
        &[
            &["--service", "backend", "--app", &app_b.addr.to_string()],
            &join_b.iter().map(String::as_str).collect::<Vec<_>>()[..],
        ]
        .concat(),
    )
    .await;
    let client = proxy("client", &cp, &["--upstream", "backend=127.0.0.1:0"]).await;
    let up = client.bound.upstreams[&trellis_core::ServiceName::new("backend").unwrap()];
    eventually(
        "both instances serve",
        Duration::from_secs(10),
        || async move {
            let mut c = Client::connect(up).await;
            let mut seen = std::collections::HashSet::new();
            for _ in 0..20 {
                seen.insert(c.get("backend", "/").await.1);
            }
            (seen.len() == 2).then_some(())
        },
    )
    .await;

    b.signal("KILL");
    let killed = Instant::now();
    eventually(
        "the killed instance leaves the client's endpoints",
        Duration::from_secs(10),
        || async {
            let (_, config) = request(client.bound.admin, "GET", "/config", "").await;
            let n = config["destinations"]["backend"]["endpoints"]
                .as_array()
                .map(|a| a.len());
            (n == Some(1)).then_some(())
        },
    )
    .await;
    eprintln!(
        "killed instance removed from the caller after {:?}",
        killed.elapsed()
    );
    let mut c = Client::connect(up).await;
    for _ in 0..500 {
        assert_eq!(c.get("backend", "/").await, (200, "backend-a".to_owned()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keep_serving_through_a_control_plane_outage() {
    let (grpc, http) = (free_port(), free_port());
    let data = temp_dir("outage");
    let process =
        ControlProcess::start(Path::new(env!("CARGO_BIN_EXE_trellis")), grpc, http, &data).await;
    let cp = ControlPlane {
        grpc,
        http,
        data: data.clone(),
    };
    let (_v1_app, _v1) = instance("web-v1", &cp).await;
    let (_v2_app, _v2) = instance("web-v2", &cp).await;
    assert_eq!(apply(&cp, &split(100, 0)).await.0, 200);
    let client = proxy("client", &cp, &["--upstream", "web=127.0.0.1:0"]).await;
    let up = client.bound.upstreams[&trellis_core::ServiceName::new("web").unwrap()];
    eventually(
        "traffic flows to web-v1",
        Duration::from_secs(10),
        || async move {
            (Client::connect(up).await.get("web", "/").await == (200, "web-v1".to_owned()))
                .then_some(())
        },
    )
    .await;

    // Steady traffic for the whole outage and recovery.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut c = Client::connect(up).await;
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.get("web", "/").await {
                    (200, _) => ok += 1,
                    other => failed.push(other),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        }
    });

    // The control plane persists its registry within ~100 ms of a change; give it that (a
    // crash right after a registration forgets it until the proxy reconnects).
    tokio::time::sleep(Duration::from_secs(1)).await;
    process.kill9().await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let _cp =
        ControlProcess::start(Path::new(env!("CARGO_BIN_EXE_trellis")), grpc, http, &data).await;
    // The restarted control plane remembers its resources and, once proxies reconnect, pushes
    // new changes to them.
    assert_eq!(apply(&cp, &split(0, 100)).await.0, 200);
    let changed = Instant::now();
    eventually("the change made after the restart reaches the client", Duration::from_secs(20), || async move {
        (Client::connect(up).await.get("web", "/").await.1 == "web-v2").then_some(())
    })
    .await;
    eprintln!("post-restart change observed after {:?}", changed.elapsed());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    eprintln!(
        "requests during outage and recovery: {ok} ok, {} failed",
        failed.len()
    );
    assert!(ok > 1000, "traffic kept flowing ({ok})");
    assert!(
        failed.is_empty(),
        "failed requests: {:?}",
        &failed[..failed.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_applies_survive_kill_9() {
    let (grpc, http) = (free_port(), free_port());
    let data = temp_dir("kill9");
    let cp =
        ControlProcess::start(Path::new(env!("CARGO_BIN_EXE_trellis")), grpc, http, &data).await;
    let admin = ControlPlane {
        grpc,
        http,
        data: data.clone(),
    }
    .admin_token();
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = tokio::spawn({
        let acknowledged = acknowledged.clone();
        async move {
            for i in 0..10_000 {
                let yaml = format!(
                    "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec: {{ports: [{{port: 80}}]}}\n"
                );
                // Once the process is gone, requests fail: stop there.
                let Ok(stream) = tokio::net::TcpStream::connect(http).await else {
                    return;
                };
                let Ok((mut sender, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                else {
                    return;
                };
                tokio::spawn(conn);
                let req = http::Request::post("/api/v1/apply")
                    .header("host", "c")
                    .header("authorization", format!("Bearer {admin}"))
                    .body(Full::new(Bytes::from(yaml)))
                    .unwrap();
                match sender.send_request(req).await {
                    Ok(rsp) if rsp.status() == 200 => {
                        acknowledged.lock().unwrap().push(format!("svc-{i}"))
                    }
                    _ => return,
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cp.kill9().await;
    writer.await.unwrap();
    let acked = acknowledged.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "some applies were acknowledged before the kill ({})",
        acked.len()
    );

    let _cp =
        ControlProcess::start(Path::new(env!("CARGO_BIN_EXE_trellis")), grpc, http, &data).await;
    let (status, body) = request(http, "GET", "/api/v1/resources/Service", "").await;
    assert_eq!(status, 200);
    let stored: std::collections::HashSet<String> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["resource"]["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let missing: Vec<_> = acked.iter().filter(|n| !stored.contains(*n)).collect();
    eprintln!(
        "{} acknowledged, {} stored after kill -9 and restart",
        acked.len(),
        stored.len()
    );
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
}
