//! The proxy's Prometheus metrics (names per CONTRACT.md).
//!
//! One [`Metrics`] value is built at startup, registered into a registry the admin server
//! encodes, and passed down to every stack by argument (no globals). Labels are bounded by
//! construction: service names come from configuration, and anything else a client controls
//! (unknown hosts) collapses into the single value `unknown`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label value that is cheap to clone on the hot path.
pub type Label = Arc<str>;

/// The `dst` value for authorities that name no known service.
pub const UNKNOWN: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub direction: &'static str,
    pub src: Label,
    pub dst: Label,
    pub route: Label,
    pub code: u16,
    pub classification: &'static str,
    /// `true` or `false`: whether the hop was mTLS (see `RequestMeta::tls`).
    pub tls: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLatencyLabels {
    pub direction: &'static str,
    pub src: Label,
    pub dst: Label,
    pub route: Label,
    pub classification: &'static str,
    pub tls: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: &'static str,
    pub src: Label,
    pub dst: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpBytesLabels {
    pub direction: &'static str,
    pub src: Label,
    pub dst: Label,
    pub flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    pub listener: &'static str,
    pub protocol: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyErrorLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// All proxy metrics. Cloning is one reference-count increment (layers hold one per request),
/// and fields are reached through `Deref`.
#[derive(Clone)]
pub struct Metrics(Arc<MetricFamilies>);

impl std::ops::Deref for Metrics {
    type Target = MetricFamilies;
    fn deref(&self) -> &MetricFamilies {
        &self.0
    }
}

/// The metric families (see [`Metrics`]).
pub struct MetricFamilies {
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<HttpLatencyLabels, Histogram, fn() -> Histogram>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_bytes: Family<TcpBytesLabels, Counter>,
    pub detections: Family<DetectLabels, Counter>,
    pub proxy_errors: Family<ProxyErrorLabels, Counter>,
    pub connections_open: Family<ListenerLabels, Gauge>,
    pub malformed: Family<ListenerLabels, Counter>,
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    pub authz_decisions: Family<AuthzLabels, Counter>,
    pub identity_expiry: Gauge,
    pub retries: Family<RetryLabels, Counter>,
    pub ejections: Family<EjectionLabels, Counter>,
    pub circuit_open: Family<EndpointLabels, Gauge>,
    pub rate_limited: Family<RateLimitLabels, Counter>,
    pub faults: Family<FaultLabels, Counter>,
    pub mirrored: Family<MirrorLabels, Counter>,
    /// Golden signals in rolling windows, for the control plane (`trellis stat`).
    pub signals: crate::signals::GoldenSignals,
    /// Live request metadata for `trellis tap`.
    pub tap: crate::tap::Tap,
    /// Denied inbound requests, reported to the control plane's audit log.
    pub denials: crate::signals::DenialLog,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub dst: Label,
    pub route: Label,
    /// `connect-failed`, `status`, `upstream-failed` or `timeout`.
    pub reason: &'static str,
    /// `retried`, or why not: `budget-exhausted`, `body-too-large`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub dst: Label,
    /// The failure that tripped it (`connect-failed`, `5xx`, `timeout`, ...), or
    /// `refused-max-percent` when the limit kept the endpoint in.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub dst: Label,
    pub endpoint: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    pub policy: Label,
    /// `total` or `caller`.
    pub scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    pub dst: Label,
    /// `delay` or `abort`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub mirror: Label,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: &'static str,
    /// `ok`, `plaintext_refused`, or a failure class (`unknown_ca`, `cert_expired`, ...).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// `allow`, `deny` or `audit`.
    pub decision: &'static str,
    /// `<ns>/<name>`, `default`, `no-matching-allow` or `unauthenticated`: bounded by the
    /// policies that exist.
    pub policy: Label,
}

impl Metrics {
    /// Creates the metrics and registers them under `trellis_` in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = MetricFamilies {
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(latency_histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_bytes: Family::default(),
            detections: Family::default(),
            proxy_errors: Family::default(),
            connections_open: Family::default(),
            malformed: Family::default(),
            tls_handshakes: Family::default(),
            authz_decisions: Family::default(),
            identity_expiry: Gauge::default(),
            retries: Family::default(),
            ejections: Family::default(),
            circuit_open: Family::default(),
            rate_limited: Family::default(),
            faults: Family::default(),
            mirrored: Family::default(),
            signals: Default::default(),
            tap: Default::default(),
            denials: Default::default(),
        };
        let r = registry.sub_registry_with_prefix("trellis");
        r.register(
            "http_requests",
            "HTTP requests by direction, source, destination, route, status and classification",
            m.http_requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time from request received to response headers, in seconds",
            m.http_duration.clone(),
        );
        r.register(
            "tcp_connections_opened",
            "Opaque TCP connections opened",
            m.tcp_opened.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "Opaque TCP connections closed",
            m.tcp_closed.clone(),
        );
        r.register(
            "tcp_bytes",
            "Bytes carried over opaque TCP (rx: from the client, tx: to the client)",
            m.tcp_bytes.clone(),
        );
        r.register(
            "protocol_detections",
            "Protocol detection outcomes per listener",
            m.detections.clone(),
        );
        r.register(
            "proxy_errors",
            "Responses the proxy generated itself, by x-trellis-error reason",
            m.proxy_errors.clone(),
        );
        r.register(
            "connections_open",
            "Client connections currently open, per listener",
            m.connections_open.clone(),
        );
        r.register(
            "malformed_requests",
            "Connections refused for malformed or oversized HTTP request heads",
            m.malformed.clone(),
        );
        r.register(
            "tls_handshakes",
            "mTLS handshakes between proxies, by outcome",
            m.tls_handshakes.clone(),
        );
        r.register(
            "authz_decisions",
            "Inbound authorization decisions",
            m.authz_decisions.clone(),
        );
        r.register(
            "identity_expiry_timestamp_seconds",
            "When this proxy's workload certificate expires (Unix time)",
            m.identity_expiry.clone(),
        );
        r.register(
            "http_retries",
            "Retries of outbound requests, by reason and result",
            m.retries.clone(),
        );
        r.register(
            "endpoint_ejections",
            "Endpoints ejected by outlier detection",
            m.ejections.clone(),
        );
        r.register(
            "circuit_breaker_open",
            "1 while an endpoint is ejected or half-open",
            m.circuit_open.clone(),
        );
        r.register(
            "ratelimited",
            "Inbound requests refused by a RateLimitPolicy",
            m.rate_limited.clone(),
        );
        r.register(
            "faults_injected",
            "Faults injected into outbound requests",
            m.faults.clone(),
        );
        r.register(
            "mirrored_requests",
            "Copies of requests sent to mirror services, by outcome",
            m.mirrored.clone(),
        );
        Self(Arc::new(m))
    }

    /// A throwaway instance for tests of single layers.
    pub fn for_test() -> Self {
        Self::new(&mut Registry::default())
    }
}

/// Encodes a registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}
