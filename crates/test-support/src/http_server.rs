//! An HTTP/1.1 + h2c test app on a loopback port.
//!
//! Routes:
//! - `POST /echo`: streams the request body back frame by frame (never buffers it).
//! - `GET /bytes?n=N`: streams N bytes in 64 KiB chunks.
//! - `GET /headers`: the request's version and headers as text, one `name: value` per line.
//! - `GET /slow?ms=N`: answers after N ms.
//! - `GET /status?code=N`: answers with status N.
//! - `GET /ws` with `Upgrade`: 101, then echoes raw bytes on the upgraded connection.
//! - anything else: `hello from NAME`.
//!
//! Every response carries `x-served-by: NAME`, so tests can see which instance answered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A running test app; stops on drop.
pub struct HttpServer {
    pub addr: SocketAddr,
    /// Requests served so far.
    pub requests: Arc<AtomicU64>,
    failing: Arc<std::sync::atomic::AtomicBool>,
    _stop: DropGuard,
}

impl HttpServer {
    /// The switch of [`Behavior::failing`]: set it to make every request fail from now on.
    pub fn failing_handle(&self) -> &std::sync::atomic::AtomicBool {
        &self.failing
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|e| match e {}).boxed()
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok())?
    })
}

async fn handle(name: Arc<str>, mut req: Request<Incoming>) -> Response<Body> {
    let mut rsp = match (req.method().as_str(), req.uri().path()) {
        ("POST", "/echo") => Response::new(req.into_body().map_err(Into::into).boxed()),
        ("GET", "/bytes") => {
            let n = query(&req, "n").unwrap_or(0);
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, _>>(4);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let mut left = n;
                while left > 0 {
                    let take = left.min(chunk.len() as u64) as usize;
                    if tx.send(Ok(Frame::data(chunk.slice(..take)))).await.is_err() {
                        return;
                    }
                    left -= take as u64;
                }
            });
            Response::new(StreamBody::new(ReceiverStream(rx)).boxed())
        }
        ("GET", "/headers") => {
            let mut text = format!("version: {:?}\n", req.version());
            for (k, v) in req.headers() {
                text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
            Response::new(full(text))
        }
        ("GET", "/slow") => {
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(1000))).await;
            Response::new(full("slow done"))
        }
        ("GET", "/status") => {
            let code = query(&req, "code").unwrap_or(200) as u16;
            let mut rsp = Response::new(full(format!("status {code}")));
            *rsp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
            rsp
        }
        ("GET", "/ws") if req.headers().contains_key("upgrade") => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 4096];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            });
            let mut rsp = Response::new(full(""));
            *rsp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            rsp.headers_mut()
                .insert("upgrade", "websocket".parse().unwrap());
            rsp.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            rsp
        }
        _ => Response::new(full(format!("hello from {name}"))),
    };
    rsp.headers_mut()
        .insert("x-served-by", name.parse().unwrap());
    rsp
}

/// Adapts a channel receiver into a `Stream` for `StreamBody`.
struct ReceiverStream<T>(tokio::sync::mpsc::Receiver<T>);

impl<T> tonic::codegen::tokio_stream::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// Starts an app named `name` (HTTP/1.1 and h2c on one port).
pub async fn spawn(name: &str) -> HttpServer {
    spawn_with_delay(name, Duration::ZERO).await
}

/// Like [`spawn`], but every response waits `delay` first (a slow instance).
pub async fn spawn_with_delay(name: &str, delay: Duration) -> HttpServer {
    spawn_with(
        name,
        Behavior {
            delay,
            ..Behavior::default()
        },
    )
    .await
}

/// How a test app misbehaves.
#[derive(Debug, Clone, Default)]
pub struct Behavior {
    /// Every response waits this long first.
    pub delay: Duration,
    /// Every Nth request (counting from the first) is answered 503 (0: never). Counter-based,
    /// so a failure rate is exact rather than random.
    pub fail_every: u64,
    /// While set, every request is answered 503.
    pub failing: Arc<std::sync::atomic::AtomicBool>,
}

/// Like [`spawn`], with the given [`Behavior`]. Failed requests answer 503 with
/// `x-served-by` set, like any other answer.
pub async fn spawn_with(name: &str, behavior: Behavior) -> HttpServer {
    let Behavior {
        delay,
        fail_every,
        failing,
    } = behavior;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let serving_failing = failing.clone();
    let token = stop.clone();
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    let name: Arc<str> = name.into();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = token.cancelled() => return,
                r = listener.accept() => match r { Ok(a) => a, Err(_) => continue },
            };
            let (name, counter, token) = (name.clone(), counter.clone(), token.clone());
            let failing = serving_failing.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    let fail =
                        failing.load(Ordering::SeqCst) || (fail_every > 0 && n % fail_every == 0);
                    let name = name.clone();
                    async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        if fail {
                            let mut rsp = Response::new(full("injected failure"));
                            *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            rsp.headers_mut()
                                .insert("x-served-by", name.parse().unwrap());
                            return Ok::<_, Infallible>(rsp);
                        }
                        Ok::<_, Infallible>(handle(name, req).await)
                    }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = token.cancelled() => {}
                }
            });
        }
    });
    HttpServer {
        addr,
        requests,
        failing,
        _stop: stop.drop_guard(),
    }
}
