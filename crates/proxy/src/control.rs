//! The control-plane client: registers this instance, keeps a session open, asks for the
//! destinations the app uses and applies the updates it receives.
//!
//! It runs on its own thread and runtime (like the admin server), so control traffic never
//! competes with the data path. When the control plane is away the proxy keeps routing on its
//! last state; the client reconnects with jittered exponential backoff, cycling through every
//! `--control` address, and resumes its watches (the control plane answers with full
//! snapshots, which replace the old state without a gap). On shutdown it deregisters first, so
//! callers stop sending before the listeners close.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use trellis_api::pb;
use trellis_core::discovery::{DestinationDelta, InstanceInfo, RouteTable};
use trellis_core::names::ServiceName;
use trellis_core::resources::MeshConfigSpec;

use crate::access_log::AccessLog;
use crate::drain::Drain;
use crate::http::destinations::{Destinations, WatchRequest, random_below};
use crate::identity::{InboundPolicyCell, MeshIdentity, new_key_and_csr};
use crate::metrics::Metrics;
use crate::tap::{TapFilter, TapSubscription};
use crate::trace::Tracer;

/// How long a discovered destination may go unused before it is dropped and unwatched.
pub const IDLE_DESTINATION: Duration = Duration::from_secs(300);

pub struct ControlClient {
    pub addresses: Vec<String>,
    pub instance: InstanceInfo,
    pub destinations: Arc<Destinations>,
    /// `--env`: which of an ExternalService's addresses to use.
    pub env: String,
    pub watch_requests: mpsc::UnboundedReceiver<WatchRequest>,
    /// Destinations never dropped for idleness (upstream ports).
    pub pinned: Vec<ServiceName>,
    pub ready: Arc<AtomicBool>,
    pub connected: Gauge,
    pub mesh_config: Arc<std::sync::Mutex<Option<MeshConfigSpec>>>,
    pub drain: Drain,
    pub identity: Arc<MeshIdentity>,
    /// The join token, for the first certificate.
    pub token: String,
    /// Roots from --trust-bundle: how the control plane is checked before the first
    /// certificate (after it, the bundle the control plane hands out).
    pub bootstrap_roots: Arc<rustls::RootCertStore>,
    pub inbound_policy: Arc<InboundPolicyCell>,
    pub identity_expiry: Gauge,
    /// Golden signals, tap and denials, read by the control plane over the session.
    pub metrics: Metrics,
    pub tracer: Tracer,
    pub access_log: AccessLog,
}

/// After a trust bundle change, wait this long (plus jitter) before renewing under the new
/// root, so every peer trusts it first.
const BUNDLE_GRACE: Duration = Duration::from_secs(3);

/// Renew at this share of a certificate's lifetime.
const RENEW_AT: f64 = 0.7;

enum SessionEnd {
    /// Shutdown: deregistered, do not reconnect.
    Deregistered,
    Failed(String),
}

impl ControlClient {
    /// Runs the client on a dedicated thread until the process exits.
    pub fn spawn(self) -> std::io::Result<()> {
        crate::spawn_with_own_runtime("control", move || self.run())
    }

    /// A channel to the control plane over TLS: the server must be the control plane of our
    /// trust domain; we present our certificate once we have one.
    async fn channel(&self, addr: &str) -> Result<tonic::transport::Channel, String> {
        let expected =
            trellis_core::identity::SpiffeId::control_plane(&self.identity.id.trust_domain);
        let config = match self.identity.tls() {
            Some(state) => trellis_api::tls::client_config(
                state.roots.clone(),
                expected,
                Some(state.cert.clone()),
            ),
            None => trellis_api::tls::client_config(self.bootstrap_roots.clone(), expected, None),
        }
        .map_err(|e| e.to_string())?;
        trellis_api::tls::grpc_channel(addr, config, Duration::from_secs(2))
            .await
            .map_err(|e| {
                use std::error::Error;
                let mut msg = e.to_string();
                let mut source = e.source();
                while let Some(s) = source {
                    msg = format!("{msg}: {s}");
                    source = s.source();
                }
                msg
            })
    }

    /// Gets a certificate: with the join token the first time, with the current certificate
    /// after. A new key every time.
    async fn certify(&self, addr: &str) -> Result<std::time::Instant, String> {
        let renewing = self.identity.tls().is_some();
        let (key_pem, csr_pem) = new_key_and_csr(&self.identity.id).map_err(|e| e.to_string())?;
        let channel = self.channel(addr).await?;
        let mut client = pb::proxy_control_client::ProxyControlClient::new(channel);
        let rsp = client
            .certify(pb::CertifyRequest {
                csr_pem,
                token: if renewing {
                    String::new()
                } else {
                    self.token.clone()
                },
            })
            .await
            .map_err(|status| format!("certificate request refused: {}", status.message()))?
            .into_inner();
        self.identity
            .install(
                &rsp.cert_chain_pem,
                &key_pem,
                &rsp.trust_bundle_pem,
                rsp.expires_unix,
            )
            .map_err(|e| format!("certificate from the control plane: {e}"))?;
        self.identity_expiry.set(rsp.expires_unix);
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let lifetime = Duration::from_secs(rsp.expires_unix.saturating_sub(now_unix).max(1) as u64);
        tracing::info!(identity = %self.identity.id, expires = rsp.expires_unix, renewal = renewing, "workload certificate installed");
        Ok(std::time::Instant::now() + lifetime.mul_f64(RENEW_AT))
    }

    async fn run(mut self) {
        let mut failures: u32 = 0;
        let mut next = 0usize;
        let mut renew_at = std::time::Instant::now();
        loop {
            let addr = self.addresses[next % self.addresses.len()].clone();
            next += 1;
            let outcome = if std::time::Instant::now() >= renew_at {
                match self.certify(&addr).await {
                    Ok(at) => {
                        renew_at = at;
                        self.session(&addr, &mut failures, &mut renew_at).await
                    }
                    Err(e) => SessionEnd::Failed(e),
                }
            } else {
                self.session(&addr, &mut failures, &mut renew_at).await
            };
            match outcome {
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

    async fn session(
        &mut self,
        addr: &str,
        failures: &mut u32,
        renew_at: &mut std::time::Instant,
    ) -> SessionEnd {
        let channel = match self.channel(addr).await {
            Ok(c) => c,
            Err(e) => return SessionEnd::Failed(e),
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
        // Taps the control plane opened on this session; they end with it.
        let mut taps: HashMap<u64, TapSubscription> = HashMap::new();
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        if let Some(request) = &m.message
                            && self.observe(request, &tx, &mut taps)
                        {
                            continue;
                        }
                        if let Some(interval) = self.handle(m) {
                            *failures = 0;
                            heartbeat = tokio::time::interval(interval);
                        }
                        if self.identity.take_renewal_request() {
                            // Every peer gets the new bundle before anyone presents a
                            // certificate from the new root.
                            let grace = BUNDLE_GRACE.mul_f64(1.0 + random_below(1000) as f64 / 1000.0);
                            *renew_at = std::time::Instant::now() + grace;
                        }
                    }
                    Ok(None) if deregistered => return SessionEnd::Deregistered,
                    Ok(None) => return SessionEnd::Failed("control plane closed the session".into()),
                    Err(_) if deregistered => return SessionEnd::Deregistered,
                    Err(status) => return SessionEnd::Failed(status.to_string()),
                },
                _ = heartbeat.tick() => {
                    let sent_unix_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64);
                    let _ = tx.try_send(send(pb::proxy_message::Message::Heartbeat(pb::Heartbeat {
                        cert_expires_unix: self.identity.expires_unix(),
                        sent_unix_ms,
                    })));
                    self.report_denials(&tx);
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
                _ = tokio::time::sleep_until((*renew_at).into()) => {
                    match self.certify(addr).await {
                        Ok(at) => *renew_at = at,
                        Err(e) => {
                            // Keep serving on the current certificate; try again soon.
                            tracing::warn!(error = %e, "certificate renewal failed; retrying in 5s");
                            *renew_at = std::time::Instant::now() + Duration::from_secs(5);
                        }
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

    /// Answers the control plane's observability requests (golden signals, tap). Returns
    /// whether `m` was one.
    fn observe(
        &self,
        m: &pb::control_message::Message,
        tx: &mpsc::Sender<pb::ProxyMessage>,
        taps: &mut HashMap<u64, TapSubscription>,
    ) -> bool {
        let send = |m: pb::proxy_message::Message| pb::ProxyMessage { message: Some(m) };
        match m {
            pb::control_message::Message::SignalsRequest(r) => {
                let mut buckets = self.metrics.signals.last(r.window_secs.min(3600));
                if !r.paths {
                    for b in &mut buckets {
                        b.paths.clear();
                    }
                }
                let report = bounded_report(pb::SignalsReport {
                    query_id: r.query_id,
                    buckets: buckets.iter().map(Into::into).collect(),
                    endpoints: self
                        .destinations
                        .unavailable()
                        .into_iter()
                        .map(|(service, address, health)| pb::EndpointState {
                            service: service.to_string(),
                            address: address.to_string(),
                            state: health.state.to_owned(),
                            reason: health.reason.unwrap_or_default(),
                        })
                        .collect(),
                });
                // A full queue means the session is in trouble; the control plane times out.
                let _ = tx.try_send(send(pb::proxy_message::Message::Signals(report)));
                true
            }
            pb::control_message::Message::TapStart(t) => {
                let (subscription, mut records) = self.metrics.tap.subscribe(
                    TapFilter {
                        path_prefix: (!t.path_prefix.is_empty()).then(|| t.path_prefix.clone()),
                        method: (!t.method.is_empty()).then(|| t.method.clone()),
                    },
                    t.max_per_second,
                );
                let (tx, tap_id) = (tx.clone(), t.tap_id);
                tokio::spawn(async move {
                    // Ends when the subscription is dropped (TapStop or session end).
                    while let Some(r) = records.recv().await {
                        let event = pb::TapEvent {
                            tap_id,
                            unix_ms: r.unix_ms,
                            inbound: r.direction == "inbound",
                            src: r.src,
                            dst: r.dst,
                            method: r.method,
                            path: r.path,
                            status: u32::from(r.status),
                            latency_ms: r.latency_ms,
                            trace_id: r.trace_id,
                            tls: r.tls,
                            route: r.route,
                        };
                        if tx
                            .try_send(send(pb::proxy_message::Message::TapEvent(event)))
                            .is_err()
                            && tx.is_closed()
                        {
                            break;
                        }
                    }
                });
                tracing::info!(tap = t.tap_id, "tap started by the control plane");
                taps.insert(t.tap_id, subscription);
                true
            }
            pb::control_message::Message::TapStop(t) => {
                if taps.remove(&t.tap_id).is_some() {
                    tracing::info!(tap = t.tap_id, "tap stopped");
                }
                true
            }
            _ => false,
        }
    }

    /// Sends the inbound denials since the last heartbeat (for the control plane's audit log).
    fn report_denials(&self, tx: &mpsc::Sender<pb::ProxyMessage>) {
        let (entries, overflow) = self.metrics.denials.take();
        if entries.is_empty() && overflow == 0 {
            return;
        }
        let mut denials: Vec<pb::Denial> = entries
            .into_iter()
            .map(|(k, count, last_unix_ms)| pb::Denial {
                caller: k.caller,
                route: k.route,
                policy: k.policy,
                method: k.method,
                path: k.path,
                count,
                last_unix_ms,
            })
            .collect();
        if overflow > 0 {
            denials.push(pb::Denial {
                caller: trellis_core::signals::OTHER.into(),
                count: overflow,
                ..Default::default()
            });
        }
        let _ = tx.try_send(pb::ProxyMessage {
            message: Some(pb::proxy_message::Message::Denials(pb::Denials { denials })),
        });
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
                        let external = delta.external.clone().map(|e| (delta.service.clone(), e));
                        self.destinations.apply(delta);
                        if let Some((service, e)) = external {
                            crate::http::external::spawn_resolve(
                                self.destinations.clone(),
                                service,
                                e,
                                self.env.clone(),
                            );
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring malformed destination update"),
                }
                None
            }
            pb::control_message::Message::MeshConfig(c) => {
                match MeshConfigSpec::try_from(c) {
                    Ok(spec) => {
                        self.tracer.configure(spec.tracing.as_ref());
                        self.access_log.set_enabled_by_mesh(
                            spec.access_log_for(self.instance.service.as_str()),
                        );
                        self.metrics.signals.set_limits(spec.signal_limits());
                        self.inbound_policy.update(|p| {
                            p.mtls = spec.mtls;
                            p.default_policy = spec.default_policy;
                        });
                        if let Ok(mut slot) = self.mesh_config.lock() {
                            *slot = Some(spec);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring malformed mesh config"),
                }
                None
            }
            pb::control_message::Message::InboundPolicy(p) => {
                let routes = p.routes.map(RouteTable::try_from).transpose();
                let policies: Result<Vec<_>, _> = p
                    .policies
                    .into_iter()
                    .map(trellis_core::authz::InboundPolicy::try_from)
                    .collect();
                let rate_limits: Result<Vec<_>, _> = p
                    .rate_limits
                    .into_iter()
                    .map(trellis_core::policy::InboundRateLimit::try_from)
                    .collect();
                match (policies, routes, rate_limits) {
                    (Ok(policies), Ok(routes), Ok(rate_limits)) => {
                        tracing::info!(
                            policies = policies.len(),
                            rate_limits = rate_limits.len(),
                            "inbound policies updated"
                        );
                        self.inbound_policy.set_policies(
                            policies,
                            routes.unwrap_or_default(),
                            rate_limits,
                        );
                    }
                    (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                        tracing::warn!(error = %e, "ignoring malformed authorization policy update")
                    }
                }
                None
            }
            pb::control_message::Message::TrustBundle(b) => {
                match self.identity.set_bundle(&b.pem) {
                    Ok(()) => tracing::info!("trust bundle updated (root rotation)"),
                    Err(e) => tracing::warn!(error = %e, "ignoring malformed trust bundle"),
                }
                None
            }
            // Answered by `observe`.
            pb::control_message::Message::SignalsRequest(_)
            | pb::control_message::Message::TapStart(_)
            | pb::control_message::Message::TapStop(_) => None,
        }
    }
}

/// A report stays well under the control plane's message limit (4 MiB; a larger message
/// would end the session): paths go first, then the oldest buckets.
const MAX_REPORT_BYTES: usize = 1 << 20;

fn bounded_report(mut report: pb::SignalsReport) -> pb::SignalsReport {
    use prost::Message;
    if report.encoded_len() > MAX_REPORT_BYTES {
        for b in &mut report.buckets {
            b.paths.clear();
        }
    }
    while report.encoded_len() > MAX_REPORT_BYTES && !report.buckets.is_empty() {
        report.buckets.remove(0);
    }
    report.endpoints.truncate(1000);
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn reports_stay_under_the_message_limit_keeping_the_newest_buckets() {
        let window = pb::SignalWindow {
            requests: 1,
            indexes: (0..200).collect(),
            counts: vec![1; 200],
            ..Default::default()
        };
        let bucket = |start: i64| pb::SignalBucket {
            start_unix: start,
            series: (0..100)
                .map(|i| pb::SignalSeries {
                    peer: format!("peer-{i}"),
                    route: "default".into(),
                    window: Some(window.clone()),
                    ..Default::default()
                })
                .collect(),
            paths: (0..100)
                .map(|i| pb::SignalPath {
                    method: "GET".into(),
                    path: format!("/{i}"),
                    window: Some(window.clone()),
                    ..Default::default()
                })
                .collect(),
        };
        let report = pb::SignalsReport {
            query_id: 7,
            buckets: (0..30).map(|i| bucket(i * 10)).collect(),
            endpoints: Vec::new(),
        };
        assert!(report.encoded_len() > MAX_REPORT_BYTES);
        let bounded = bounded_report(report);
        assert!(bounded.encoded_len() <= MAX_REPORT_BYTES);
        assert!(bounded.buckets.iter().all(|b| b.paths.is_empty()));
        assert_eq!(bounded.buckets.last().map(|b| b.start_unix), Some(290));
        assert_eq!(bounded.query_id, 7);
    }
}
