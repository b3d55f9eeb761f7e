//! Test fixtures for Trellis: real servers on loopback port 0 (HTTP/1.1 + h2c, gRPC, TCP echo,
//! a server-speaks-first server) and a harness that runs the real `trellis-proxy` binary.
//! Every fixture is owned by its test and stops when dropped.

#![allow(clippy::unwrap_used)]

pub mod grpc;
pub mod http_server;
pub mod mesh;
pub mod otlp;
pub mod process;
pub mod tcp;

use std::future::Future;
use std::time::Duration;

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
