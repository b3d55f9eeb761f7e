//! `trellis example-app`: the small services of the demo mesh. Plain apps with no mesh code:
//! HTTP calls go through `HTTP_PROXY`, gRPC calls through a local upstream port
//! (`$UPSTREAM_<NAME>`), exactly as a user's services would.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

pub(crate) mod pb {
    #![allow(clippy::all, unreachable_pub)]
    tonic::include_proto!("trellis.demo.v1");
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct ExampleArgs {
    /// Name reported in responses (default: $SERVICE_NAME).
    #[arg(long, env = "SERVICE_NAME", default_value = "app")]
    name: String,
    #[arg(long, env = "PORT", default_value_t = 8080)]
    port: u16,
    /// Serve the gRPC Inventory service instead of HTTP.
    #[arg(long)]
    grpc: bool,
    /// Services called over HTTP (through HTTP_PROXY) on every request, comma separated.
    #[arg(long, value_delimiter = ',')]
    calls: Vec<String>,
    /// Services called over gRPC (through $UPSTREAM_<NAME>) on every request.
    #[arg(long, value_delimiter = ',')]
    grpc_calls: Vec<String>,
    /// Added latency per request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Fraction of requests answered with an error (0.0–1.0).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
}

fn chance(p: f64) -> bool {
    use std::time::SystemTime;
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    // Scramble the clock's low bits (good enough for a demo's error injection).
    let x = (u64::from(n)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    (x as f64 / (1u64 << 24) as f64) < p
}

pub(crate) async fn run(args: ExampleArgs) -> Result<(), String> {
    let addr: SocketAddr = ([127, 0, 0, 1], args.port).into();
    if args.grpc {
        let svc = Inventory { args: args.clone() };
        return tonic::transport::Server::builder()
            .add_service(pb::inventory_server::InventoryServer::new(svc))
            .serve(addr)
            .await
            .map_err(|e| e.to_string());
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let proxy: Option<SocketAddr> = std::env::var("HTTP_PROXY").ok().and_then(|p| {
        p.trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .ok()
    });
    let mut grpc_clients = Vec::new();
    for target in &args.grpc_calls {
        let var = format!("UPSTREAM_{}", target.to_uppercase().replace('-', "_"));
        let port = std::env::var(&var).map_err(|_| format!("${var} is not set"))?;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{port}"))
            .map_err(|e| e.to_string())?
            .connect_lazy();
        grpc_clients.push((
            target.clone(),
            pb::inventory_client::InventoryClient::new(channel),
        ));
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (args, grpc_clients) = (args.clone(), grpc_clients.clone());
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (args, mut grpc_clients) = (args.clone(), grpc_clients.clone());
                    async move {
                        let trace = TraceHeaders::from(req.headers());
                        Ok::<_, Infallible>(
                            handle(&args, proxy, &mut grpc_clients, req.uri().path(), &trace).await,
                        )
                    }
                });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type GrpcClient = pb::inventory_client::InventoryClient<tonic::transport::Channel>;

/// The trace context of the request being served, copied onto the calls it makes (what an
/// instrumented app does; the proxies create the spans).
struct TraceHeaders(Vec<(&'static str, http::HeaderValue)>);

impl From<&http::HeaderMap> for TraceHeaders {
    fn from(headers: &http::HeaderMap) -> Self {
        Self(
            ["traceparent", "tracestate", "b3"]
                .into_iter()
                .filter_map(|name| Some((name, headers.get(name)?.clone())))
                .collect(),
        )
    }
}

async fn handle(
    args: &ExampleArgs,
    proxy: Option<SocketAddr>,
    grpc: &mut [(String, GrpcClient)],
    path: &str,
    trace: &TraceHeaders,
) -> hyper::Response<Full<Bytes>> {
    if args.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(args.latency_ms)).await;
    }
    let mut notes = Vec::new();
    let mut failed = false;
    for target in &args.calls {
        match call_http(proxy, target, path, trace).await {
            Ok(200) => notes.push(format!("{target}=200")),
            Ok(status) => {
                failed = true;
                notes.push(format!("{target}={status}"));
            }
            Err(e) => {
                failed = true;
                notes.push(format!("{target}=error({e})"));
            }
        }
    }
    for (target, client) in grpc.iter_mut() {
        let mut request = tonic::Request::new(pb::CheckRequest {
            item: path.to_owned(),
        });
        for (name, value) in &trace.0 {
            let parsed = value
                .to_str()
                .ok()
                .and_then(|v| v.parse::<tonic::metadata::AsciiMetadataValue>().ok());
            if let Some(v) = parsed {
                request.metadata_mut().insert(*name, v);
            }
        }
        match client.check(request).await {
            Ok(r) => notes.push(format!("{target}=ok({})", r.get_ref().served_by)),
            Err(status) => {
                failed = true;
                notes.push(format!("{target}={:?}", status.code()));
            }
        }
    }
    let (status, body) = if failed {
        (
            502,
            format!("{}: a dependency failed: {}\n", args.name, notes.join(" ")),
        )
    } else if chance(args.error_rate) {
        (500, format!("{}: injected error\n", args.name))
    } else {
        (200, format!("{}: ok {}\n", args.name, notes.join(" ")))
    };
    let mut rsp = hyper::Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    rsp
}

async fn call_http(
    proxy: Option<SocketAddr>,
    target: &str,
    path: &str,
    trace: &TraceHeaders,
) -> Result<u16, String> {
    let proxy = proxy.ok_or("HTTP_PROXY is not set")?;
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = hyper::Request::get(format!("http://{target}{path}"));
    for (name, value) in &trace.0 {
        req = req.header(*name, value.clone());
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let rsp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = rsp.status().as_u16();
    let _ = rsp.into_body().collect().await;
    Ok(status)
}

struct Inventory {
    args: ExampleArgs,
}

#[tonic::async_trait]
impl pb::inventory_server::Inventory for Inventory {
    async fn check(
        &self,
        req: tonic::Request<pb::CheckRequest>,
    ) -> Result<tonic::Response<pb::CheckReply>, tonic::Status> {
        if self.args.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.args.latency_ms)).await;
        }
        if chance(self.args.error_rate) {
            return Err(tonic::Status::unavailable("injected error"));
        }
        let item = req.into_inner().item;
        Ok(tonic::Response::new(pb::CheckReply {
            in_stock: (item.len() % 7) as u32,
            item,
            served_by: self.args.name.clone(),
        }))
    }
}
