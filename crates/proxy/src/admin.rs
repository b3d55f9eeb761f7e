//! The admin server: `/live`, `/ready`, `/metrics`, `/config`, `/explain`, `/tap`,
//! `/log-level`, `/shutdown`.
//!
//! It runs on its own single-threaded runtime in its own OS thread, so a slow scrape or a burst
//! of admin calls never takes a worker from the data path (and a saturated data path never
//! makes `/live` time out). It binds to localhost by default; `/shutdown` and `PUT /log-level`
//! only answer loopback clients whatever the bind address.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio_util::task::TaskTracker;

use crate::drain::Drain;

/// Reads and changes the process log filter at run time.
pub trait LogLevel: Send + Sync {
    fn get(&self) -> String;
    fn set(&self, filter: &str) -> Result<(), String>;
}

/// What the admin server reads.
pub struct AdminState {
    pub registry: Registry,
    pub ready: Arc<AtomicBool>,
    pub drain: Drain,
    /// Builds the `/config` document on demand (it includes live discovery state).
    pub config: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    pub log_level: Arc<dyn LogLevel>,
    /// For `/explain`.
    pub destinations: Arc<crate::http::destinations::Destinations>,
    /// For `/tap`.
    pub tap: crate::tap::Tap,
}

/// Handle to the admin server's connections, to let them finish their responses at exit.
pub struct AdminHandle {
    connections: TaskTracker,
}

impl AdminHandle {
    /// Waits (bounded) for admin connections to finish after drain asked them to close, so a
    /// `POST /shutdown` caller gets its answer before the process exits.
    pub async fn finish(&self, deadline: std::time::Duration) {
        self.connections.close();
        let _ = tokio::time::timeout(deadline, self.connections.wait()).await;
    }
}

/// Starts the admin server on a dedicated thread. Stops when the process exits.
pub fn spawn(listener: std::net::TcpListener, state: AdminState) -> std::io::Result<AdminHandle> {
    let connections = TaskTracker::new();
    let tracker = connections.clone();
    listener.set_nonblocking(true)?;
    let state = Arc::new(state);
    crate::spawn_with_own_runtime("admin", move || async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "admin listener failed");
                return;
            }
        };
        loop {
            let Ok((stream, client)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tracker.spawn(async move {
                let drained = state.drain.signaled();
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(req, client, &state).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = drained => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
    })?;
    Ok(AdminHandle { connections })
}

type AdminResponse = Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    let mut rsp = Response::new(Full::new(body.into()).boxed());
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

/// `GET /tap?service=&path=&method=&limit=`: newline-delimited JSON, one line per request this
/// proxy handles (metadata only) while the client stays, at most 100 a second.
fn tap(query: Option<&str>, hub: &crate::tap::Tap) -> AdminResponse {
    let mut service = None;
    let mut filter = crate::tap::TapFilter::default();
    let mut limit = None;
    for (k, v) in query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
    {
        match k {
            "service" if !v.is_empty() => service = Some(v.to_owned()),
            "path" if !v.is_empty() => filter.path_prefix = Some(v.to_owned()),
            "method" if !v.is_empty() => filter.method = Some(v.to_owned()),
            "limit" => match v.parse::<u64>() {
                Ok(n) => limit = Some(n),
                Err(_) => return text(StatusCode::BAD_REQUEST, "limit: not a number\n"),
            },
            _ => {}
        }
    }
    let (subscription, records) = hub.subscribe(filter, 100);
    let mut rsp = Response::new(
        TapBody {
            records,
            _subscription: subscription,
            service,
            remaining: limit,
        }
        .boxed(),
    );
    rsp.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    rsp
}

/// Streams tap records as JSON lines; the subscription ends with the body.
struct TapBody {
    records: tokio::sync::mpsc::Receiver<crate::tap::TapRecord>,
    _subscription: crate::tap::TapSubscription,
    service: Option<String>,
    remaining: Option<u64>,
}

impl http_body::Body for TapBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        use std::task::Poll;
        loop {
            if self.remaining == Some(0) {
                return Poll::Ready(None);
            }
            let Some(record) = std::task::ready!(self.records.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            if self
                .service
                .as_ref()
                .is_some_and(|s| *s != record.src && *s != record.dst)
            {
                continue;
            }
            if let Some(n) = self.remaining.as_mut() {
                *n -= 1;
            }
            let mut line = serde_json::to_vec(&record).unwrap_or_default();
            line.push(b'\n');
            return Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(line)))));
        }
    }
}

async fn route(req: Request<Incoming>, client: SocketAddr, state: &AdminState) -> AdminResponse {
    let local_client = client.ip().is_loopback();
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            if state.drain.is_requested() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/metrics") => match crate::metrics::encode(&state.registry) {
            Ok(body) => {
                let mut rsp = text(StatusCode::OK, body);
                rsp.headers_mut().insert(
                    CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                rsp
            }
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics encoding failed\n",
            ),
        },
        (&Method::GET, "/config") => {
            let mut rsp = text(
                StatusCode::OK,
                serde_json::to_vec_pretty(&(state.config)()).unwrap_or_default(),
            );
            rsp.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            rsp
        }
        (&Method::GET, "/explain") => {
            match crate::explain::ExplainQuery::parse(req.uri().query()) {
                Ok(q) => {
                    let view = crate::explain::explain(&state.destinations, &q).await;
                    let mut rsp = text(
                        StatusCode::OK,
                        serde_json::to_vec_pretty(&view).unwrap_or_default(),
                    );
                    rsp.headers_mut().insert(
                        CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    rsp
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (&Method::GET, "/tap") => tap(req.uri().query(), &state.tap),
        (&Method::GET, "/log-level") => {
            text(StatusCode::OK, format!("{}\n", state.log_level.get()))
        }
        (&Method::PUT, "/log-level") | (&Method::POST, "/log-level") => {
            if !local_client {
                return text(
                    StatusCode::FORBIDDEN,
                    "log-level changes are allowed from localhost only\n",
                );
            }
            let body = match Limited::new(req.into_body(), 4096).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "filter too long\n"),
            };
            let filter = String::from_utf8_lossy(&body).trim().to_owned();
            match state.log_level.set(&filter) {
                Ok(()) => text(StatusCode::OK, format!("{filter}\n")),
                Err(e) => text(
                    StatusCode::BAD_REQUEST,
                    format!("invalid log filter {filter:?}: {e}\n"),
                ),
            }
        }
        (&Method::POST, "/shutdown") => {
            if !local_client {
                return text(
                    StatusCode::FORBIDDEN,
                    "shutdown is allowed from localhost only\n",
                );
            }
            tracing::info!("shutdown requested via admin");
            state.drain.request();
            text(StatusCode::ACCEPTED, "draining\n")
        }
        (
            _,
            "/live" | "/ready" | "/metrics" | "/config" | "/explain" | "/log-level" | "/shutdown",
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live /ready /metrics /config /log-level /shutdown\n",
        ),
    }
}
