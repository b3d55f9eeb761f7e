//! Distributed tracing: trace context in headers (W3C `traceparent`, B3 accepted), head
//! sampling, and span export over OTLP.
//!
//! The proxy joins the trace a request carries (or starts one), makes one span per hop (a
//! SERVER span inbound, a CLIENT span outbound) and passes the context on with its own span as
//! the parent. Apps must copy the trace headers from the requests they receive to the requests
//! they send, as with every mesh; the proxy cannot link an app's inbound and outbound calls
//! on its own.
//!
//! Export never blocks traffic: finished spans go into a bounded queue that a thread of its
//! own drains in batches. A full queue or a failed export drops spans and counts them
//! (`trellis_trace_spans_dropped_total{reason}`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use trellis_api::otlp;
pub use trellis_api::otlp::hex;
use trellis_api::otlp::hex_into;
use trellis_core::resources::{OtlpProtocol, TracingConfig};

use crate::http::destinations::random_u64;

pub const TRACEPARENT: &str = "traceparent";
pub const B3: &str = "b3";
pub const B3_TRACE_ID: &str = "x-b3-traceid";
pub const B3_SPAN_ID: &str = "x-b3-spanid";
pub const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
pub const B3_SAMPLED: &str = "x-b3-sampled";
pub const B3_FLAGS: &str = "x-b3-flags";

/// How the incoming context was carried; the outgoing one uses the same headers (plus
/// `traceparent` always), so B3-only apps keep working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    W3c,
    B3Single,
    B3Multi,
}

/// A context read from request headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParentContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
    pub propagation: Propagation,
}

fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hi = (chunk[0] as char).to_digit(16)?;
        let lo = (chunk[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    (out != [0u8; N]).then_some(out)
}

/// B3 trace ids may be 64 bits; W3C needs 128, left-padded with zeros.
fn b3_trace_id(s: &str) -> Option<[u8; 16]> {
    if s.len() == 16 {
        let short: [u8; 8] = hex_bytes(s)?;
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&short);
        Some(id)
    } else {
        hex_bytes(s)
    }
}

/// Reads `traceparent`, else `b3`, else `x-b3-*`. Malformed values are ignored (a new trace
/// starts), as the W3C spec asks.
pub fn extract(headers: &HeaderMap) -> Option<ParentContext> {
    if let Some(v) = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()) {
        let mut parts = v.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let version_ok =
            version.len() == 2 && version != "ff" && (version != "00" || parts.next().is_none());
        let flags: [u8; 1] = if flags == "00" {
            [0]
        } else {
            hex_bytes(flags.get(..2)?)?
        };
        if version_ok {
            return Some(ParentContext {
                trace_id: hex_bytes(trace)?,
                span_id: hex_bytes(span)?,
                sampled: flags[0] & 1 == 1,
                propagation: Propagation::W3c,
            });
        }
        return None;
    }
    if let Some(v) = headers.get(B3).and_then(|v| v.to_str().ok()) {
        let mut parts = v.trim().split('-');
        let trace = parts.next()?;
        let span = parts.next()?;
        let sampled = parts.next().is_none_or(|s| s == "1" || s == "d");
        return Some(ParentContext {
            trace_id: b3_trace_id(trace)?,
            span_id: hex_bytes(span)?,
            sampled,
            propagation: Propagation::B3Single,
        });
    }
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let trace = get(B3_TRACE_ID)?;
    let span = get(B3_SPAN_ID)?;
    let sampled =
        matches!(get(B3_SAMPLED), Some("1") | Some("true") | None) || get(B3_FLAGS) == Some("1");
    Some(ParentContext {
        trace_id: b3_trace_id(trace)?,
        span_id: hex_bytes(span)?,
        sampled,
        propagation: Propagation::B3Multi,
    })
}

/// Writes the context for the next hop: `span_id` is this hop's span, the next hop's parent.
pub fn inject(
    headers: &mut HeaderMap,
    trace_id: &[u8; 16],
    span_id: &[u8; 8],
    sampled: bool,
    propagation: Propagation,
) {
    // `00-<32 hex>-<16 hex>-<2 hex>`, written in place: this runs for every request while
    // tracing is on, sampled or not.
    let mut traceparent = [0u8; 55];
    traceparent[..3].copy_from_slice(b"00-");
    hex_into(trace_id, &mut traceparent[3..35]);
    traceparent[35] = b'-';
    hex_into(span_id, &mut traceparent[36..52]);
    traceparent[52..].copy_from_slice(if sampled { b"-01" } else { b"-00" });
    if let Ok(v) = HeaderValue::from_bytes(&traceparent) {
        headers.insert(TRACEPARENT, v);
    }
    if propagation == Propagation::W3c {
        return;
    }
    let (trace, span) = (hex(trace_id), hex(span_id));
    let b3_sampled = if sampled { "1" } else { "0" };
    match propagation {
        Propagation::W3c => {}
        Propagation::B3Single => {
            if let Ok(v) = HeaderValue::from_str(&format!("{trace}-{span}-{b3_sampled}")) {
                headers.insert(B3, v);
            }
        }
        Propagation::B3Multi => {
            for (name, value) in [
                (B3_TRACE_ID, trace.as_str()),
                (B3_SPAN_ID, span.as_str()),
                (B3_SAMPLED, b3_sampled),
            ] {
                if let Ok(v) = HeaderValue::from_str(value) {
                    headers.insert(name, v);
                }
            }
            headers.remove(B3_PARENT_SPAN_ID);
            headers.remove(B3_FLAGS);
        }
    }
}

pub fn new_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&random_u64().to_be_bytes());
    id[8..].copy_from_slice(&random_u64().to_be_bytes());
    if id == [0u8; 16] { [1u8; 16] } else { id }
}

pub fn new_span_id() -> [u8; 8] {
    let id = random_u64().to_be_bytes();
    if id == [0u8; 8] { [1u8; 8] } else { id }
}

/// The ids of the current hop, in the request's extensions (tap and access logs show them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

/// Something that happened during a sampled request (a retry, for instance). Layers below the
/// trace layer add them through the request's [`SpanEvents`] extension.
#[derive(Debug, Clone)]
pub struct SpanEvent {
    pub unix_nanos: u64,
    pub name: &'static str,
    pub attributes: Vec<(&'static str, String)>,
}

/// Present in a request's extensions only when its span is sampled.
#[derive(Debug, Clone, Default)]
pub struct SpanEvents(Arc<Mutex<Vec<SpanEvent>>>);

impl SpanEvents {
    /// At most this many events per span (a retry loop must not grow a span without bound).
    const MAX: usize = 32;

    pub fn add(&self, name: &'static str, attributes: Vec<(&'static str, String)>) {
        let mut events = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() < Self::MAX {
            events.push(SpanEvent {
                unix_nanos: unix_nanos(SystemTime::now()),
                name,
                attributes,
            });
        }
    }

    pub fn take(&self) -> Vec<SpanEvent> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
}

/// A span ready for export.
#[derive(Debug, Clone)]
pub struct FinishedSpan {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub name: String,
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(&'static str, AttributeValue)>,
    pub events: Vec<SpanEvent>,
    pub error: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttributeValue {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// Where spans go, from MeshConfig `tracing`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSettings {
    pub endpoint: String,
    pub protocol: OtlpProtocol,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DroppedLabels {
    /// `queue-full` or `export-failed`.
    pub reason: &'static str,
}

struct TracerInner {
    enabled: AtomicBool,
    /// The sampling probability as `f64` bits.
    sampling: AtomicU64,
    queue: mpsc::Sender<FinishedSpan>,
    settings: watch::Sender<Option<ExportSettings>>,
    exported: Counter,
    dropped: Family<DroppedLabels, Counter>,
}

/// Sampling decisions and the span queue. Cheap to clone; off until MeshConfig names an OTLP
/// endpoint.
#[derive(Clone)]
pub struct Tracer(Arc<TracerInner>);

/// The resource every span of this proxy carries.
#[derive(Debug, Clone)]
pub struct TraceResource {
    pub service: String,
    pub namespace: String,
    pub instance: String,
}

/// Spans waiting for export, at most.
const QUEUE: usize = 4096;
const BATCH: usize = 512;
const BATCH_DELAY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

impl Tracer {
    /// The tracer and the exporter that drains its queue (run it with [`Exporter::spawn`]).
    pub fn new(registry: &mut Registry, resource: TraceResource) -> (Tracer, Exporter) {
        let (queue, spans) = mpsc::channel(QUEUE);
        let (settings, settings_rx) = watch::channel(None);
        let inner = TracerInner {
            enabled: AtomicBool::new(false),
            sampling: AtomicU64::new(0f64.to_bits()),
            queue,
            settings,
            exported: Counter::default(),
            dropped: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("trellis");
        r.register(
            "trace_spans_exported",
            "Spans accepted by the OTLP endpoint",
            inner.exported.clone(),
        );
        r.register(
            "trace_spans_dropped",
            "Spans dropped: export queue full or export failed",
            inner.dropped.clone(),
        );
        let tracer = Tracer(Arc::new(inner));
        let exporter = Exporter {
            spans,
            settings: settings_rx,
            resource,
            tracer: tracer.clone(),
        };
        (tracer, exporter)
    }

    /// A tracer that never samples (tests of other layers).
    #[cfg(test)]
    pub fn disabled() -> Tracer {
        Tracer::new(
            &mut Registry::default(),
            TraceResource {
                service: String::new(),
                namespace: String::new(),
                instance: String::new(),
            },
        )
        .0
    }

    /// Applies MeshConfig `tracing`: on with an endpoint, off without.
    pub fn configure(&self, config: Option<&TracingConfig>) {
        let settings = config.and_then(|c| {
            c.otlp_endpoint.as_ref().map(|endpoint| ExportSettings {
                endpoint: endpoint.clone(),
                protocol: c.protocol,
            })
        });
        let sampling = config.map_or(0.0, |c| c.sampling.clamp(0.0, 1.0));
        self.0.sampling.store(sampling.to_bits(), Ordering::Relaxed);
        self.0.enabled.store(settings.is_some(), Ordering::Relaxed);
        self.0.settings.send_if_modified(|current| {
            let changed = *current != settings;
            *current = settings;
            changed
        });
    }

    pub fn is_enabled(&self) -> bool {
        self.0.enabled.load(Ordering::Relaxed)
    }

    /// Head sampling for a trace that starts here.
    pub fn sample(&self) -> bool {
        let p = f64::from_bits(self.0.sampling.load(Ordering::Relaxed));
        // 53 random bits as a uniform draw in [0, 1).
        p >= 1.0 || (p > 0.0 && ((random_u64() >> 11) as f64 / (1u64 << 53) as f64) < p)
    }

    /// Queues a span; drops it (counted) when the exporter is behind.
    pub fn finish(&self, span: FinishedSpan) {
        if self.0.queue.try_send(span).is_err() {
            self.dropped("queue-full", 1);
        }
    }

    fn dropped(&self, reason: &'static str, n: u64) {
        self.0
            .dropped
            .get_or_create(&DroppedLabels { reason })
            .inc_by(n);
    }
}

/// Drains the span queue in batches and exports them.
pub struct Exporter {
    spans: mpsc::Receiver<FinishedSpan>,
    settings: watch::Receiver<Option<ExportSettings>>,
    resource: TraceResource,
    tracer: Tracer,
}

impl Exporter {
    /// Runs on a thread of its own, so export (and a slow collector) never touches the data
    /// path's runtime.
    pub fn spawn(self) -> std::io::Result<()> {
        crate::spawn_with_own_runtime("trace-export", move || self.run())
    }

    /// The spans queued so far (tests of the trace layer read them here).
    #[cfg(test)]
    pub fn queued(&mut self) -> Vec<FinishedSpan> {
        let mut out = Vec::new();
        while let Ok(s) = self.spans.try_recv() {
            out.push(s);
        }
        out
    }

    async fn run(mut self) {
        let mut client = OtlpClient::default();
        let mut warned_at: Option<std::time::Instant> = None;
        while let Some(first) = self.spans.recv().await {
            let mut batch = vec![first];
            let deadline = tokio::time::sleep(BATCH_DELAY);
            tokio::pin!(deadline);
            while batch.len() < BATCH {
                tokio::select! {
                    next = self.spans.recv() => match next {
                        Some(span) => batch.push(span),
                        None => break,
                    },
                    _ = &mut deadline => break,
                }
            }
            let settings = self.settings.borrow().clone();
            let Some(settings) = settings else {
                // Tracing was switched off while these waited.
                continue;
            };
            let n = batch.len() as u64;
            let request = export_request(&self.resource, batch);
            match client.export(&settings, request).await {
                Ok(()) => {
                    self.tracer.0.exported.inc_by(n);
                }
                Err(e) => {
                    self.tracer.dropped("export-failed", n);
                    // Once a minute at most: a collector that is down must not flood the log.
                    if warned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        warned_at = Some(std::time::Instant::now());
                        tracing::warn!(endpoint = %settings.endpoint, error = %e, spans = n, "span export failed; spans dropped");
                    }
                }
            }
        }
    }
}

/// Keeps one connection per endpoint.
#[derive(Default)]
struct OtlpClient {
    grpc: Option<(
        String,
        otlp::trace_service_client::TraceServiceClient<tonic::transport::Channel>,
    )>,
    http: Option<
        hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            http_body_util::Full<bytes::Bytes>,
        >,
    >,
}

impl OtlpClient {
    async fn export(
        &mut self,
        settings: &ExportSettings,
        request: otlp::ExportTraceServiceRequest,
    ) -> Result<(), String> {
        match settings.protocol {
            OtlpProtocol::Grpc => {
                if self
                    .grpc
                    .as_ref()
                    .is_none_or(|(e, _)| *e != settings.endpoint)
                {
                    let channel =
                        tonic::transport::Endpoint::from_shared(settings.endpoint.clone())
                            .map_err(|e| e.to_string())?
                            .connect_timeout(Duration::from_secs(2))
                            .timeout(EXPORT_TIMEOUT)
                            .connect_lazy();
                    self.grpc = Some((
                        settings.endpoint.clone(),
                        otlp::trace_service_client::TraceServiceClient::new(channel),
                    ));
                }
                let Some((_, client)) = self.grpc.as_mut() else {
                    return Err("no client".into());
                };
                client
                    .export(request)
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("{}: {}", s.code(), s.message()))
            }
            OtlpProtocol::HttpProtobuf => {
                use prost::Message;
                let client = self.http.get_or_insert_with(|| {
                    hyper_util::client::legacy::Client::builder(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .build_http()
                });
                let base = settings.endpoint.trim_end_matches('/');
                let url = if base.ends_with("/v1/traces") {
                    base.to_owned()
                } else {
                    format!("{base}/v1/traces")
                };
                let req = http::Request::post(url)
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        request.encode_to_vec(),
                    )))
                    .map_err(|e| e.to_string())?;
                let rsp = tokio::time::timeout(EXPORT_TIMEOUT, client.request(req))
                    .await
                    .map_err(|_| "timed out".to_string())?
                    .map_err(|e| e.to_string())?;
                if rsp.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("collector answered {}", rsp.status()))
                }
            }
        }
    }
}

fn attribute(key: &str, value: AttributeValue) -> otlp::KeyValue {
    use otlp::any_value::Value;
    otlp::KeyValue {
        key: key.to_owned(),
        value: Some(otlp::AnyValue {
            value: Some(match value {
                AttributeValue::Str(s) => Value::StringValue(s),
                AttributeValue::Int(i) => Value::IntValue(i),
                AttributeValue::Bool(b) => Value::BoolValue(b),
            }),
        }),
    }
}

/// One OTLP request for a batch of this proxy's spans.
pub fn export_request(
    resource: &TraceResource,
    spans: Vec<FinishedSpan>,
) -> otlp::ExportTraceServiceRequest {
    let s = |v: &str| AttributeValue::Str(v.to_owned());
    let resource = otlp::Resource {
        attributes: vec![
            attribute("service.name", s(&resource.service)),
            attribute("service.namespace", s(&resource.namespace)),
            attribute("service.instance.id", s(&resource.instance)),
            attribute("telemetry.sdk.name", s("trellis-proxy")),
        ],
    };
    let spans = spans
        .into_iter()
        .map(|span| otlp::Span {
            trace_id: span.trace_id.to_vec(),
            span_id: span.span_id.to_vec(),
            trace_state: String::new(),
            parent_span_id: span.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            name: span.name,
            kind: match span.kind {
                SpanKind::Server => otlp::span::SpanKind::Server,
                SpanKind::Client => otlp::span::SpanKind::Client,
            } as i32,
            start_time_unix_nano: span.start_unix_nanos,
            end_time_unix_nano: span.end_unix_nanos,
            attributes: span
                .attributes
                .into_iter()
                .map(|(k, v)| attribute(k, v))
                .collect(),
            events: span
                .events
                .into_iter()
                .map(|e| otlp::span::Event {
                    time_unix_nano: e.unix_nanos,
                    name: e.name.to_owned(),
                    attributes: e
                        .attributes
                        .into_iter()
                        .map(|(k, v)| attribute(k, AttributeValue::Str(v)))
                        .collect(),
                })
                .collect(),
            status: Some(otlp::Status {
                message: String::new(),
                code: if span.error {
                    otlp::status::StatusCode::Error
                } else {
                    otlp::status::StatusCode::Unset
                } as i32,
            }),
        })
        .collect();
    otlp::ExportTraceServiceRequest {
        resource_spans: vec![otlp::ResourceSpans {
            resource: Some(resource),
            scope_spans: vec![otlp::ScopeSpans {
                scope: Some(otlp::InstrumentationScope {
                    name: "trellis-proxy".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn reads_w3c_traceparent() {
        let h = headers(&[(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        let c = extract(&h).expect("context");
        assert_eq!(hex(&c.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&c.span_id), "00f067aa0ba902b7");
        assert!(c.sampled);
        assert_eq!(c.propagation, Propagation::W3c);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "garbage",
        ] {
            assert_eq!(extract(&headers(&[(TRACEPARENT, bad)])), None, "{bad}");
        }
    }

    #[test]
    fn reads_b3_single_and_multi() {
        let c = extract(&headers(&[(
            B3,
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0",
        )]))
        .expect("b3");
        assert!(!c.sampled);
        assert_eq!(c.propagation, Propagation::B3Single);
        let c = extract(&headers(&[
            (B3_TRACE_ID, "a3ce929d0e0e4736"),
            (B3_SPAN_ID, "00f067aa0ba902b7"),
            (B3_SAMPLED, "1"),
        ]))
        .expect("x-b3");
        assert_eq!(hex(&c.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert!(c.sampled);
        assert_eq!(c.propagation, Propagation::B3Multi);
    }

    #[test]
    fn injects_this_hop_as_the_parent() {
        let mut h = headers(&[(B3, "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
        let parent = extract(&h).expect("b3");
        let span = new_span_id();
        inject(&mut h, &parent.trace_id, &span, true, parent.propagation);
        let next = extract(&h).expect("traceparent now");
        assert_eq!(next.trace_id, parent.trace_id);
        assert_eq!(next.span_id, span);
        assert_eq!(
            h.get(B3).and_then(|v| v.to_str().ok()),
            Some(format!("80f198ee56343ba864fe8b2a57d3eff7-{}-1", hex(&span)).as_str())
        );
    }

    #[test]
    fn sampling_follows_the_configured_probability() {
        let tracer = Tracer::disabled();
        tracer.configure(Some(&TracingConfig {
            sampling: 0.25,
            otlp_endpoint: Some("http://127.0.0.1:1".into()),
            protocol: OtlpProtocol::Grpc,
        }));
        assert!(tracer.is_enabled());
        let sampled = (0..20_000).filter(|_| tracer.sample()).count();
        assert!((4_000..6_000).contains(&sampled), "{sampled}");
        tracer.configure(None);
        assert!(!tracer.is_enabled());
    }
}
