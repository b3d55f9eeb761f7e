//! In-process mesh pieces shared by the cli crate's integration tests: a control plane on
//! port 0 with a fresh data dir, and proxies that join it with a token and the trust bundle.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use trellis_core::ServiceName;
use trellis_proxy::app::Running;
use trellis_proxy::config::{Args, ProxyConfig};
use trellis_test_support::eventually;
use trellis_test_support::http_server::{self, Behavior, HttpServer};
use trellis_test_support::mesh::{ControlPlane, http_call};

pub(crate) fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("trellis-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A control plane in this process; `configure` adjusts the defaults.
pub(crate) async fn control(
    name: &str,
    configure: impl FnOnce(&mut trellis_control::ControlConfig),
) -> (trellis_control::Running, ControlPlane) {
    let data = temp_dir(name);
    let mut config = trellis_control::ControlConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        data.clone(),
    );
    configure(&mut config);
    let running = trellis_control::start(config).await.unwrap();
    let cp = ControlPlane {
        grpc: running.grpc_addr,
        http: running.http_addr,
        data,
    };
    (running, cp)
}

/// A proxy of `service` joined to `cp`; listeners on port 0 unless `extra` sets them.
pub(crate) async fn proxy(service: &str, cp: &ControlPlane, extra: &[&str]) -> Running {
    let join = cp.join_args(service).await;
    let mut argv = vec!["trellis-proxy", "--service", service];
    for flag in ["--outbound", "--inbound", "--admin"] {
        if !extra.contains(&flag) {
            argv.extend([flag, "127.0.0.1:0"]);
        }
    }
    argv.extend(["--shutdown-grace", "100ms"]);
    argv.extend(join.iter().map(String::as_str));
    argv.extend_from_slice(extra);
    let config = ProxyConfig::from_args(Args::try_parse_from(argv).unwrap()).unwrap();
    trellis_proxy::app::start(config, Arc::new(trellis_proxy::logging::Fixed::default()))
        .await
        .unwrap()
}

/// One answer as the calling app saw it.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    /// `x-served-by` of the app that answered, if any.
    pub(crate) served_by: String,
    /// `x-trellis-error`, if the proxy answered itself.
    pub(crate) error: String,
    pub(crate) retry_after: Option<String>,
}

/// A keep-alive HTTP/1.1 client to one address.
pub(crate) struct Client {
    pub(crate) sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub(crate) async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Self { sender }
    }

    pub(crate) async fn call(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        self.send("GET", host, path, headers, "").await
    }

    pub(crate) async fn send(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &'static str,
    ) -> Answer {
        self.sender.ready().await.unwrap();
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let rsp = self
            .sender
            .send_request(
                req.body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap(),
            )
            .await
            .unwrap();
        let header = |name: &str| {
            rsp.headers()
                .get(name)
                .map(|v| v.to_str().unwrap_or("").to_owned())
        };
        let answer = Answer {
            status: rsp.status().as_u16(),
            served_by: header("x-served-by").unwrap_or_default(),
            error: header("x-trellis-error").unwrap_or_default(),
            retry_after: header("retry-after"),
        };
        rsp.into_body().collect().await.unwrap();
        answer
    }
}

/// `rps` requests per second for `duration`, spread over `connections` keep-alive clients,
/// each paced by its own interval.
pub(crate) async fn load(
    addr: SocketAddr,
    host: &'static str,
    rps: u32,
    duration: Duration,
    connections: u32,
) -> Vec<Answer> {
    let per_conn = Duration::from_secs_f64(f64::from(connections) / f64::from(rps));
    let count = (duration.as_secs_f64() * f64::from(rps) / f64::from(connections)) as u32;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            let mut tick = tokio::time::interval(per_conn);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut out = Vec::with_capacity(count as usize);
            for _ in 0..count {
                tick.tick().await;
                out.push(client.call(host, "/", &[]).await);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

pub(crate) fn by_server(answers: &[Answer]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for a in answers {
        *m.entry(if a.served_by.is_empty() {
            format!("error:{}", a.error)
        } else {
            a.served_by.clone()
        })
        .or_insert(0) += 1;
    }
    m
}

pub(crate) async fn apply(cp: &ControlPlane, yaml: &str) {
    let (status, body) = cp.apply(yaml).await;
    assert_eq!(status, 200, "apply failed: {body}");
}

pub(crate) async fn config_of(p: &Running) -> serde_json::Value {
    let (_, body) = http_call(p.bound.admin, "GET", "/config", "", None).await;
    serde_json::from_str(&body).unwrap()
}

pub(crate) async fn metrics_of(p: &Running) -> String {
    http_call(p.bound.admin, "GET", "/metrics", "", None)
        .await
        .1
}

/// Sum of a counter's samples whose line contains every one of `filters`.
pub(crate) fn counter(metrics: &str, name: &str, filters: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// App + in-process proxy registered as `service`.
pub(crate) async fn instance(
    service: &str,
    name: &str,
    behavior: Behavior,
    cp: &ControlPlane,
    extra: &[&str],
) -> (HttpServer, Running) {
    let app = http_server::spawn_with(name, behavior).await;
    let addr = app.addr.to_string();
    // In-process proxies share a pid: each needs its own instance id.
    let mut args = vec!["--app", addr.as_str(), "--instance", name];
    args.extend_from_slice(extra);
    let p = proxy(service, cp, &args).await;
    (app, p)
}

/// A calling proxy with an upstream port for `service`.
pub(crate) async fn caller(
    cp: &ControlPlane,
    service: &str,
    extra: &[&str],
) -> (Running, SocketAddr) {
    let upstream = format!("{service}=127.0.0.1:0");
    let mut args = vec!["--upstream", upstream.as_str()];
    args.extend_from_slice(extra);
    let p = proxy("client", cp, &args).await;
    let addr = p.bound.upstreams[&ServiceName::new(service).unwrap()];
    (p, addr)
}

/// Waits until the caller's proxy knows `n` endpoints of `service`.
pub(crate) async fn wait_endpoints(p: &Running, service: &'static str, n: usize) {
    eventually(
        "endpoints known to the caller",
        Duration::from_secs(10),
        || async move {
            let c = config_of(p).await;
            let known = c["destinations"][service]["endpoints"]
                .as_array()
                .map_or(0, |a| a.len());
            (known == n).then_some(())
        },
    )
    .await;
}
