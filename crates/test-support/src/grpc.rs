//! A tonic Echo service (unary + bidirectional streaming) on a loopback port.

use std::net::SocketAddr;
use std::pin::Pin;

use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::codegen::tokio_stream::{Stream, StreamExt, wrappers::TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    tonic::include_proto!("trellis.test");
}

pub use pb::echo_client::EchoClient;
pub use pb::{EchoReply, EchoRequest};

#[derive(Default)]
struct EchoImpl;

fn client_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-trellis-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tonic::async_trait]
impl pb::echo_server::Echo for EchoImpl {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let client_id = client_id(&req);
        let msg = req.into_inner();
        if msg.fail_with_code != 0 {
            return Err(Status::new(
                tonic::Code::from(msg.fail_with_code),
                "requested failure",
            ));
        }
        let mut rsp = Response::new(EchoReply {
            message: msg.message,
            client_id,
        });
        rsp.metadata_mut()
            .insert("x-echo-header", "present".parse().unwrap());
        Ok(rsp)
    }

    type BidiStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

    async fn bidi(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let client_id = client_id(&req);
        let mut inbound = req.into_inner();
        let out = async_stream(move |tx| async move {
            while let Some(item) = inbound.next().await {
                let reply = item.map(|m| EchoReply {
                    message: m.message,
                    client_id: client_id.clone(),
                });
                if tx.send(reply).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// A stream fed by a spawned task through a channel (keeps us free of extra stream crates).
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<EchoReply, Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<EchoReply, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A running gRPC Echo server; stops on drop.
pub struct GrpcServer {
    pub addr: SocketAddr,
    _stop: DropGuard,
}

pub async fn spawn_echo() -> GrpcServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(pb::echo_server::EchoServer::new(EchoImpl))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), token.cancelled_owned())
            .await
            .unwrap();
    });
    GrpcServer {
        addr,
        _stop: stop.drop_guard(),
    }
}
