//! Opaque TCP: splice two streams both ways until each side has closed, propagating half-close
//! (a client's FIN reaches the server while the server can still answer). Records the TCP
//! metric families and one access log line per connection.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::access_log::{AccessLog, Entry, rfc3339_now};
use crate::http::Direction;
use crate::metrics::{Label, Metrics, TcpBytesLabels, TcpLabels};

/// Any bidirectional byte stream (TCP, a CONNECT tunnel over HTTP/2, TLS later).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

pub type BoxedIo = Box<dyn Io>;

/// Who a spliced connection is between, for metrics and logs.
#[derive(Debug, Clone)]
pub struct TcpFlow {
    pub direction: Direction,
    pub client: SocketAddr,
    pub src: Label,
    pub dst: Label,
}

/// Splices `client` and `upstream` until both directions are done.
pub async fn splice<A: Io + ?Sized, B: Io + ?Sized>(
    client: &mut A,
    upstream: &mut B,
    flow: &TcpFlow,
    metrics: &Metrics,
    log: &AccessLog,
) {
    let labels = TcpLabels {
        direction: flow.direction.as_str(),
        src: flow.src.clone(),
        dst: flow.dst.clone(),
    };
    metrics.tcp_opened.get_or_create(&labels).inc();
    let start = Instant::now();
    let result = tokio::io::copy_bidirectional(client, upstream).await;
    metrics.tcp_closed.get_or_create(&labels).inc();
    let (rx, tx, error) = match &result {
        Ok((rx, tx)) => (*rx, *tx, None),
        Err(e) => (0, 0, Some(e.kind().to_string())),
    };
    for (flow_label, n) in [("rx", rx), ("tx", tx)] {
        metrics
            .tcp_bytes
            .get_or_create(&TcpBytesLabels {
                direction: flow.direction.as_str(),
                src: flow.src.clone(),
                dst: flow.dst.clone(),
                flow: flow_label,
            })
            .inc_by(n);
    }
    tracing::debug!(client = %flow.client, dst = %flow.dst, rx, tx, ?error, "tcp connection closed");
    log.record(&Entry {
        time: rfc3339_now(),
        kind: "tcp",
        direction: flow.direction.as_str(),
        src: flow.client.to_string(),
        client_id: None,
        src_service: &flow.src,
        dst_service: &flow.dst,
        method: None,
        authority: None,
        path: None,
        protocol: None,
        status: None,
        duration_ms: start.elapsed().as_secs_f64() * 1000.0,
        bytes_in: rx,
        bytes_out: tx,
        error: error.as_deref(),
        trace_id: None,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn splices_with_half_close_and_counts_bytes() {
        let (mut client_app, mut client_proxy) = tokio::io::duplex(1024);
        let (mut upstream_proxy, mut upstream_server) = tokio::io::duplex(1024);
        let metrics = Metrics::for_test();
        let flow = TcpFlow {
            direction: Direction::Outbound,
            client: "127.0.0.1:1".parse().expect("addr"),
            src: "web".into(),
            dst: "db".into(),
        };
        let m = metrics.clone();
        let proxy = tokio::spawn(async move {
            splice(
                &mut client_proxy,
                &mut upstream_proxy,
                &flow,
                &m,
                &AccessLog::default(),
            )
            .await
        });
        // Echo server: reads to EOF, then answers and closes.
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            upstream_server.read_to_end(&mut got).await.expect("read");
            upstream_server.write_all(&got).await.expect("write");
            upstream_server.shutdown().await.expect("shutdown");
        });
        client_app.write_all(b"ping").await.expect("write");
        client_app.shutdown().await.expect("half-close");
        let mut echoed = Vec::new();
        client_app.read_to_end(&mut echoed).await.expect("read");
        assert_eq!(echoed, b"ping");
        server.await.expect("server");
        proxy.await.expect("proxy");
        let bytes = |flow| {
            metrics
                .tcp_bytes
                .get_or_create(&TcpBytesLabels {
                    direction: "outbound",
                    src: "web".into(),
                    dst: "db".into(),
                    flow,
                })
                .get()
        };
        assert_eq!((bytes("rx"), bytes("tx")), (4, 4));
    }
}
