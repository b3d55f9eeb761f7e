//! The control-plane client: registers this instance, keeps a session open, asks for the
//! destinations the app uses and applies the updates it receives.
//!
//! It runs on its own thread and runtime (like the admin server), so control traffic never
//! competes with the data path. When the control plane is away the proxy keeps routing on its
//! last state; the client reconnects with jittered exponential backoff, cycling through every
//! `--control` address, and resumes its watches (the control plane answers with full
//! snapshots, which replace the old state without a gap). On shutdown it deregisters first, so
//! callers stop sending before the listeners close.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use trellis_api::pb;
use trellis_core::discovery::{DestinationDelta, InstanceInfo};
use trellis_core::names::ServiceName;
use trellis_core::resources::MeshConfigSpec;

use crate::drain::Drain;
use crate::http::destinations::{Destinations, WatchRequest, random_below};

/// How long a discovered destination may go unused before it is dropped and unwatched.
pub const IDLE_DESTINATION: Duration = Duration::from_secs(300);

pub struct ControlClient {
    pub addresses: Vec<String>,
    pub instance: InstanceInfo,
    pub destinations: Arc<Destinations>,
    pub watch_requests: mpsc::UnboundedReceiver<WatchRequest>,
    /// Destinations never dropped for idleness (upstream ports).
    pub pinned: Vec<ServiceName>,
    pub ready: Arc<AtomicBool>,
    pub connected: Gauge,
    pub mesh_config: Arc<std::sync::Mutex<Option<MeshConfigSpec>>>,
    pub drain: Drain,
}

enum SessionEnd {
    /// Shutdown: deregistered, do not reconnect.
    Deregistered,
    Failed(String),
}

impl ControlClient {
    /// Runs the client on a dedicated thread until the process exits.
    pub fn spawn(self) -> std::io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || rt.block_on(self.run()))?;
        Ok(())
    }

    async fn run(mut self) {
        let mut failures: u32 = 0;
        let mut next = 0usize;
        loop {
            let addr = self.addresses[next % self.addresses.len()].clone();
            next += 1;
            match self.session(&addr, &mut failures).await {
                SessionEnd::Deregistered => return,
                SessionEnd::Failed(e) => {
                    self.connected.set(0);
                    failures = failures.saturating_add(1);
                    let base = Duration::from_millis(100) * 2u32.pow(failures.min(6));
                    let base = base.min(Duration::from_secs(5));
                    // Jitter in [0.5, 1.5) so a fleet does not reconnect in lockstep.
                    let jitter = 0.5 + random_below(1000) as f64 / 1000.0;
                    let wait = base.mul_f64(jitter);
                    tracing::warn!(control = %addr, error = %e, retry_in = ?wait, "control plane unavailable; serving on last known state");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.drain.requested() => return,
                    }
                }
            }
        }
    }

    async fn session(&mut self, addr: &str, failures: &mut u32) -> SessionEnd {
        let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
            Ok(e) => e
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5)),
            Err(e) => return SessionEnd::Failed(format!("bad address {addr:?}: {e}")),
        };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => return SessionEnd::Failed(e.to_string()),
        };
        let mut client = pb::proxy_control_client::ProxyControlClient::new(channel);
        let (tx, rx) = mpsc::channel::<pb::ProxyMessage>(1024);
        let send = |m: pb::proxy_message::Message| pb::ProxyMessage { message: Some(m) };
        let register = pb::Register {
            instance: Some((&self.instance).into()),
            watching: self
                .destinations
                .names()
                .iter()
                .map(|n| n.to_string())
                .collect(),
        };
        let _ = tx.try_send(send(pb::proxy_message::Message::Register(register)));
        let mut inbound = match client.session(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => return SessionEnd::Failed(status.to_string()),
        };
        let mut heartbeat = tokio::time::interval(Duration::from_secs(3));
        let mut sweep = tokio::time::interval(Duration::from_secs(30));
        let mut deregistered = false;
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        if let Some(interval) = self.handle(m) {
                            *failures = 0;
                            heartbeat = tokio::time::interval(interval);
                        }
                    }
                    Ok(None) if deregistered => return SessionEnd::Deregistered,
                    Ok(None) => return SessionEnd::Failed("control plane closed the session".into()),
                    Err(_) if deregistered => return SessionEnd::Deregistered,
                    Err(status) => return SessionEnd::Failed(status.to_string()),
                },
                _ = heartbeat.tick() => {
                    let _ = tx.try_send(send(pb::proxy_message::Message::Heartbeat(pb::Heartbeat {})));
                }
                Some(req) = self.watch_requests.recv() => {
                    let m = match req {
                        WatchRequest::Watch(s) => pb::proxy_message::Message::Watch(pb::Watch { service: s.to_string() }),
                        WatchRequest::Unwatch(s) => pb::proxy_message::Message::Unwatch(pb::Unwatch { service: s.to_string() }),
                    };
                    if tx.send(send(m)).await.is_err() {
                        return SessionEnd::Failed("session closed".into());
                    }
                }
                _ = sweep.tick() => {
                    for name in self.destinations.drop_idle(IDLE_DESTINATION, &self.pinned) {
                        tracing::debug!(service = %name, "destination idle; unwatching");
                        let _ = tx.try_send(send(pb::proxy_message::Message::Unwatch(pb::Unwatch { service: name.to_string() })));
                    }
                }
                _ = self.drain.requested(), if !deregistered => {
                    deregistered = true;
                    let _ = tx.send(send(pb::proxy_message::Message::Deregister(pb::Deregister {}))).await;
                    tracing::info!("deregistered from the control plane");
                    // Keep the session (and its updates) until the process exits.
                }
            }
        }
    }

    /// Applies one message; returns the heartbeat interval when the session was accepted.
    fn handle(&self, m: pb::ControlMessage) -> Option<Duration> {
        match m.message? {
            pb::control_message::Message::Registered(r) => {
                self.connected.set(1);
                self.ready.store(true, Ordering::Release);
                tracing::info!("registered with the control plane");
                Some(Duration::from_millis(
                    r.heartbeat_interval_ms.clamp(200, 60_000),
                ))
            }
            pb::control_message::Message::Destination(d) => {
                match DestinationDelta::try_from(d) {
                    Ok(delta) => {
                        tracing::debug!(service = %delta.service, reset = delta.reset, upserted = delta.upserted.len(), removed = delta.removed.len(), "destination update");
                        self.destinations.apply(delta);
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring malformed destination update"),
                }
                None
            }
            pb::control_message::Message::MeshConfig(c) => {
                match MeshConfigSpec::try_from(c) {
                    Ok(spec) => {
                        if let Ok(mut slot) = self.mesh_config.lock() {
                            *slot = Some(spec);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring malformed mesh config"),
                }
                None
            }
        }
    }
}
