//! Raw TCP test servers: an echo server that honours half-close, and a server that speaks first
//! (like MySQL or SMTP) and never waits for the client before greeting.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

/// A running TCP server; stops on drop.
pub struct TcpServer {
    pub addr: SocketAddr,
    _stop: DropGuard,
}

/// Echoes every byte back; when the client half-closes, finishes echoing and closes.
pub async fn spawn_echo() -> TcpServer {
    spawn(None).await
}

/// Sends `greeting` as soon as a client connects, then echoes.
pub async fn spawn_server_first(greeting: &'static [u8]) -> TcpServer {
    spawn(Some(greeting)).await
}

async fn spawn(greeting: Option<&'static [u8]>) -> TcpServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tokio::select! {
                _ = token.cancelled() => return,
                r = listener.accept() => match r { Ok(a) => a, Err(_) => continue },
            };
            tokio::spawn(async move {
                if let Some(g) = greeting
                    && stream.write_all(g).await.is_err()
                {
                    return;
                }
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    TcpServer {
        addr,
        _stop: stop.drop_guard(),
    }
}
