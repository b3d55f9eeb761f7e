//! The gRPC API's TLS: every accepted connection is a TLS 1.3 handshake (in its own task, with a
//! deadline, so a slow or garbage client holds nothing up), and the caller's verified SPIFFE ID
//! (if it presented a certificate) travels with the connection to the handlers.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use trellis_api::tls;
use trellis_core::identity::SpiffeId;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a gRPC connection; in every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// From a verified client certificate; `None` for a proxy bootstrapping with a token.
    pub identity: Option<SpiffeId>,
}

pub struct TlsConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and completes their TLS handshakes; yields the connections that
/// made it. Failed handshakes are logged with their reason and dropped.
pub fn incoming(
    listener: TcpListener,
    config: crate::rotation::ServerTls,
    stop: CancellationToken,
) -> mpsc::Receiver<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let current = config.read().unwrap_or_else(|p| p.into_inner()).clone();
            let (acceptor, tx) = (tokio_rustls::TlsAcceptor::from(current), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(io)) => {
                        let identity = tls::peer_identity(io.get_ref().1.peer_certificates());
                        let _ = tx
                            .send(Ok(TlsConn {
                                io,
                                peer: PeerInfo { remote, identity },
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        let class = tls::classify_handshake_error(&e);
                        tracing::info!(%remote, result = class, hint = tls::handshake_hint(class), error = %e, "TLS handshake with a proxy failed");
                    }
                    Err(_) => tracing::info!(%remote, "TLS handshake with a proxy timed out"),
                }
            });
        }
    });
    rx
}
