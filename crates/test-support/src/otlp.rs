//! An OTLP trace receiver for tests: the OpenTelemetry collector's trace service over gRPC and
//! OTLP/HTTP (`POST /v1/traces`, protobuf), both on loopback port 0, keeping every span it
//! receives with its resource's `service.name`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trellis_api::otlp;

/// A received span and the service that reported it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub span: otlp::Span,
}

type Spans = Arc<Mutex<Vec<ReceivedSpan>>>;

pub struct OtlpReceiver {
    /// `http://127.0.0.1:PORT` for OTLP/gRPC.
    pub grpc_endpoint: String,
    /// `http://127.0.0.1:PORT` for OTLP/HTTP.
    pub http_endpoint: String,
    spans: Spans,
    stop: CancellationToken,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn keep(spans: &Spans, request: otlp::ExportTraceServiceRequest) {
    let mut all = spans.lock().unwrap();
    for rs in request.resource_spans {
        let service = rs.service_name();
        for ss in rs.scope_spans {
            for span in ss.spans {
                all.push(ReceivedSpan {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
}

struct Grpc(Spans);

#[tonic::async_trait]
impl otlp::trace_service_server::TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<otlp::ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<otlp::ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.0, request.into_inner());
        Ok(tonic::Response::new(
            otlp::ExportTraceServiceResponse::default(),
        ))
    }
}

impl OtlpReceiver {
    pub async fn spawn() -> Self {
        let spans: Spans = Arc::default();
        let stop = CancellationToken::new();

        let grpc_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc_listener.local_addr().unwrap();
        let (svc, token) = (
            otlp::trace_service_server::TraceServiceServer::new(Grpc(spans.clone())),
            stop.clone(),
        );
        tokio::spawn(async move {
            let incoming =
                tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                .await;
        });

        let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr: SocketAddr = http_listener.local_addr().unwrap();
        let (kept, token) = (spans.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = http_listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                    _ = token.cancelled() => return,
                };
                let kept = kept.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let kept = kept.clone();
                        async move {
                            let ok = req.uri().path() == "/v1/traces";
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let status = match (ok, body) {
                                (true, Ok(b)) => match otlp::ExportTraceServiceRequest::decode(b) {
                                    Ok(r) => {
                                        keep(&kept, r);
                                        200
                                    }
                                    Err(_) => 400,
                                },
                                _ => 404,
                            };
                            let mut rsp = Response::new(Full::new(Bytes::new()));
                            *rsp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(rsp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });

        Self {
            grpc_endpoint: format!("http://{grpc_addr}"),
            http_endpoint: format!("http://{http_addr}"),
            spans,
            stop,
        }
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }
}
