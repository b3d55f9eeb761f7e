//! Graceful drain, shared by every accept loop.
//!
//! On SIGTERM or `POST /shutdown`: readiness flips to 503, listeners stop accepting, HTTP
//! connections are asked to finish (HTTP/1 closes after the current response, HTTP/2 sends
//! GOAWAY), and the process waits for tracked work up to a deadline before exiting anyway.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// Cheap to clone; every clone observes the same drain.
///
/// Two phases: [`Drain::request`] (shutdown asked for: readiness fails, the control client
/// deregisters, listeners still accept) and [`Drain::start`] (listeners close, connections
/// finish).
#[derive(Clone, Default)]
pub struct Drain {
    requested: CancellationToken,
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for shutdown (idempotent): the owner of the process then drains.
    pub fn request(&self) {
        self.requested.cancel();
    }

    pub fn is_requested(&self) -> bool {
        self.requested.is_cancelled()
    }

    /// Completes when shutdown was requested.
    pub fn requested(&self) -> WaitForCancellationFutureOwned {
        self.requested.clone().cancelled_owned()
    }

    /// Completes when draining starts.
    pub fn signaled(&self) -> WaitForCancellationFutureOwned {
        self.token.clone().cancelled_owned()
    }

    pub fn is_draining(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Starts draining (idempotent). Does not wait.
    pub fn start(&self) {
        self.requested.cancel();
        self.token.cancel();
    }

    /// Spawns work that drain waits for (a connection, a tunnel).
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(fut);
    }

    /// Signals drain, then waits for tracked work. Returns `false` if the deadline hit first.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.start();
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_work_then_returns() {
        let drain = Drain::new();
        let d = drain.clone();
        drain.spawn(async move {
            d.signaled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        assert!(drain.drain(Duration::from_secs(1)).await);
        assert!(drain.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline() {
        let drain = Drain::new();
        drain.spawn(std::future::pending());
        assert!(!drain.drain(Duration::from_secs(1)).await);
    }
}
