//! `trellis demo`: two services on loopback talking through two real `trellis-proxy`
//! processes, the way a mesh call works: app → its proxy (outbound) → HTTP/2 → the other
//! proxy (inbound) → the other app. Prints what happened and an excerpt of both proxies'
//! metrics, then drains the proxies with SIGTERM.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

#[derive(clap::Args, Clone)]
pub(crate) struct DemoArgs {
    /// Requests the frontend sends to the backend.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Directory for the generated proxy config and logs (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum DemoError {
    #[error("cannot find trellis-proxy next to {0} (build it with `cargo build --release`)")]
    ProxyBinaryMissing(String),
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error("{0}")]
    Failed(String),
}

fn proxy_binary() -> Result<PathBuf, DemoError> {
    let me = std::env::current_exe().map_err(|e| DemoError::Io("current exe", e))?;
    let candidate = me.with_file_name("trellis-proxy");
    if candidate.exists() {
        Ok(candidate)
    } else {
        Err(DemoError::ProxyBinaryMissing(me.display().to_string()))
    }
}

/// A free loopback port. (The tiny window before the proxy binds it is acceptable for a demo.)
async fn free_port() -> Result<SocketAddr, DemoError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| DemoError::Io("bind", e))?;
    l.local_addr().map_err(|e| DemoError::Io("bind", e))
}

/// The backend app: a tiny HTTP server that says which version answered.
async fn spawn_backend() -> Result<SocketAddr, DemoError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| DemoError::Io("backend bind", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| DemoError::Io("backend", e))?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body =
                            format!("hello from backend, you asked for {}\n", req.uri().path());
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

struct Proxy {
    name: &'static str,
    child: Child,
    admin: SocketAddr,
}

async fn start_proxy(
    bin: &PathBuf,
    name: &'static str,
    args: &[String],
    log: &std::path::Path,
) -> Result<Proxy, DemoError> {
    let admin = free_port().await?;
    let log_file = std::fs::File::create(log).map_err(|e| DemoError::Io("log file", e))?;
    let child = Command::new(bin)
        .args(args)
        .args(["--admin", &admin.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| DemoError::Io("spawn trellis-proxy", e))?;
    let proxy = Proxy { name, child, admin };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok((200, _)) = get(&format!("http://{admin}/ready")).await {
            return Ok(proxy);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(DemoError::Failed(format!(
        "{name} proxy did not become ready; see {}",
        log.display()
    )))
}

async fn get(url: &str) -> Result<(u16, String), String> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let rsp = client.get(uri).await.map_err(|e| e.to_string())?;
    let status = rsp.status().as_u16();
    let body = rsp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

pub(crate) async fn run(args: DemoArgs) -> Result<(), DemoError> {
    let bin = proxy_binary()?;
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("trellis-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| DemoError::Io("run directory", e))?;

    println!("Trellis demo: frontend --> [proxy] ==HTTP/2==> [proxy] --> backend\n");
    let backend_app = spawn_backend().await?;
    let backend_inbound = free_port().await?;
    let backend_proxy = start_proxy(
        &bin,
        "backend",
        &[
            "--service".into(),
            "backend".into(),
            "--app".into(),
            backend_app.to_string(),
            "--inbound".into(),
            backend_inbound.to_string(),
            "--outbound".into(),
            free_port().await?.to_string(),
        ],
        &dir.join("backend-proxy.log"),
    )
    .await?;

    let config = dir.join("frontend-proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "# Generated by `trellis demo`: the frontend's static proxy config.\n\
             service: frontend\n\
             destinations:\n  backend:\n    timeout: 5s\n    endpoints:\n      - address: {backend_inbound}\n        meshed: true\n"
        ),
    )
    .map_err(|e| DemoError::Io("write config", e))?;
    let frontend_outbound = free_port().await?;
    let upstream_port = free_port().await?;
    let frontend_proxy = start_proxy(
        &bin,
        "frontend",
        &[
            "--config".into(),
            config.display().to_string(),
            "--outbound".into(),
            frontend_outbound.to_string(),
            "--inbound".into(),
            free_port().await?.to_string(),
            "--upstream".into(),
            format!("backend={upstream_port}"),
        ],
        &dir.join("frontend-proxy.log"),
    )
    .await?;

    println!("  backend app      {backend_app}");
    println!(
        "  backend proxy    inbound {backend_inbound}, admin http://{}",
        backend_proxy.admin
    );
    println!(
        "  frontend proxy   outbound {frontend_outbound} (HTTP_PROXY), upstream port {upstream_port} -> backend, admin http://{}",
        frontend_proxy.admin
    );
    println!("  run directory    {}\n", dir.display());

    // The "frontend app": plain HTTP calls, no mesh code. Half go HTTP_PROXY style (absolute
    // URIs on a keep-alive connection to the outbound listener), half to the local upstream port.
    let mut via_http_proxy = connect_http1(frontend_outbound).await?;
    let mut via_upstream_port = connect_http1(upstream_port).await?;
    let mut ok = 0usize;
    let mut latencies = Vec::with_capacity(args.requests);
    let mut sample = String::new();
    for i in 0..args.requests {
        let (sender, uri) = if i % 2 == 0 {
            (&mut via_http_proxy, format!("http://backend/orders/{i}"))
        } else {
            (&mut via_upstream_port, format!("/items/{i}"))
        };
        let req = hyper::Request::get(uri)
            .header("host", "backend")
            .body(Empty::<Bytes>::new())
            .map_err(|e| DemoError::Failed(e.to_string()))?;
        let start = Instant::now();
        let result = send(sender, req).await;
        latencies.push(start.elapsed());
        match result {
            Ok((200, body)) => {
                ok += 1;
                if sample.is_empty() {
                    sample = body;
                }
            }
            Ok((status, body)) => println!("  request {i}: status {status}: {}", body.trim()),
            Err(e) => println!("  request {i}: error {e}"),
        }
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    println!("Sent {} requests: {} succeeded", args.requests, ok);
    if !latencies.is_empty() {
        println!(
            "Latency through two proxies: p50 {:?}, p99 {:?}, max {:?}",
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
    }
    println!("Sample response: {}", sample.trim());

    for proxy in [&frontend_proxy, &backend_proxy] {
        println!(
            "\nMetrics excerpt from the {} proxy (http://{}/metrics):",
            proxy.name, proxy.admin
        );
        match get(&format!("http://{}/metrics", proxy.admin)).await {
            Ok((_, text)) => {
                for line in text.lines().filter(|l| {
                    (l.starts_with("trellis_http_requests_total")
                        || l.starts_with("trellis_protocol_detections_total"))
                        && !l.starts_with('#')
                }) {
                    println!("  {line}");
                }
            }
            Err(e) => println!("  (unavailable: {e})"),
        }
    }

    println!("\nStopping proxies (SIGTERM, graceful drain)...");
    for mut proxy in [frontend_proxy, backend_proxy] {
        if let Some(pid) = proxy.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(35), proxy.child.wait()).await {
            Ok(Ok(status)) => println!("  {} proxy exited: {status}", proxy.name),
            _ => println!("  {} proxy did not exit in time", proxy.name),
        }
    }
    if ok == args.requests {
        println!("\nDemo complete: every request crossed the mesh.");
        Ok(())
    } else {
        Err(DemoError::Failed(format!(
            "{} of {} requests failed",
            args.requests - ok,
            args.requests
        )))
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect_http1(addr: SocketAddr) -> Result<Sender, DemoError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| DemoError::Io("connect", e))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| DemoError::Failed(format!("handshake with {addr}: {e}")))?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn send(
    sender: &mut Sender,
    req: hyper::Request<Empty<Bytes>>,
) -> Result<(u16, String), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let rsp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = rsp.status().as_u16();
    let body = rsp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
