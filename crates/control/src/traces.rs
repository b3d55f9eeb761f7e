//! A small built-in trace sink: the control plane accepts OTLP/HTTP exports
//! (`POST /v1/traces`) and keeps the most recent traces in memory for the dashboard and
//! `GET /api/v1/traces`. It is for a laptop or a demo, not a tracing backend: point
//! `tracing.otlpEndpoint` at a real collector for anything else.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use trellis_api::otlp::{self, hex, value_text};

/// Traces kept (oldest forgotten first).
pub const MAX_TRACES: usize = 200;
/// Spans kept per trace.
pub const MAX_SPANS_PER_TRACE: usize = 128;

/// Attributes worth showing (the proxy sets more; these answer "what happened").
const SHOWN: [&str; 7] = [
    "http.request.method",
    "url.path",
    "http.route",
    "http.response.status_code",
    "trellis.peer.identity",
    "trellis.error",
    "server.address",
];

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SpanRecord {
    pub span_id: String,
    pub parent_span_id: Option<String>,
    /// The reporting proxy's service (`service.name`).
    pub service: String,
    pub name: String,
    /// `server`, `client` or `other`.
    pub kind: &'static str,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub error: bool,
    pub attributes: BTreeMap<String, String>,
    pub events: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TraceSummary {
    pub trace_id: String,
    pub start_unix_nano: u64,
    pub duration_ms: f64,
    pub spans: usize,
    /// Services in the order their first span started.
    pub services: Vec<String>,
    /// `service: name` of the span without a parent here, if one arrived.
    pub root: Option<String>,
    pub error: bool,
}

#[derive(Default)]
struct State {
    order: VecDeque<String>,
    traces: HashMap<String, Vec<SpanRecord>>,
}

#[derive(Default)]
pub struct RecentTraces {
    state: Mutex<State>,
}

impl RecentTraces {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the spans of one export; returns how many were kept.
    pub fn ingest(&self, request: otlp::ExportTraceServiceRequest) -> usize {
        let mut kept = 0;
        let mut st = self.lock();
        for rs in request.resource_spans {
            let service = rs.service_name();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                if span.trace_id.len() != 16 || span.span_id.len() != 8 {
                    continue;
                }
                let trace_id = hex(&span.trace_id);
                let record = SpanRecord {
                    span_id: hex(&span.span_id),
                    parent_span_id: (!span.parent_span_id.is_empty())
                        .then(|| hex(&span.parent_span_id)),
                    service: service.clone(),
                    kind: match span.kind {
                        k if k == otlp::span::SpanKind::Server as i32 => "server",
                        k if k == otlp::span::SpanKind::Client as i32 => "client",
                        _ => "other",
                    },
                    name: span.name.chars().take(200).collect(),
                    start_unix_nano: span.start_time_unix_nano,
                    end_unix_nano: span.end_time_unix_nano.max(span.start_time_unix_nano),
                    error: span
                        .status
                        .as_ref()
                        .is_some_and(|s| s.code == otlp::status::StatusCode::Error as i32),
                    attributes: span
                        .attributes
                        .iter()
                        .filter(|kv| SHOWN.contains(&kv.key.as_str()))
                        .filter_map(|kv| {
                            Some((
                                kv.key.clone(),
                                value_text(kv.value.as_ref()?).chars().take(200).collect(),
                            ))
                        })
                        .collect(),
                    events: span.events.iter().take(8).map(|e| e.name.clone()).collect(),
                };
                if !st.traces.contains_key(&trace_id) {
                    st.order.push_back(trace_id.clone());
                    while st.order.len() > MAX_TRACES {
                        if let Some(old) = st.order.pop_front() {
                            st.traces.remove(&old);
                        }
                    }
                }
                let spans = st.traces.entry(trace_id).or_default();
                if spans.len() < MAX_SPANS_PER_TRACE {
                    spans.push(record);
                    kept += 1;
                }
            }
        }
        kept
    }

    /// The newest traces first.
    pub fn list(&self, limit: usize) -> Vec<TraceSummary> {
        let st = self.lock();
        let mut out: Vec<TraceSummary> = st
            .order
            .iter()
            .rev()
            .filter_map(|id| Some((id, st.traces.get(id)?)))
            .map(|(id, spans)| summarize(id, spans))
            .collect();
        out.sort_by_key(|t| std::cmp::Reverse(t.start_unix_nano));
        out.truncate(limit);
        out
    }

    /// One trace's spans, by start time.
    pub fn get(&self, trace_id: &str) -> Option<Vec<SpanRecord>> {
        let mut spans = self.lock().traces.get(trace_id)?.clone();
        spans.sort_by_key(|s| s.start_unix_nano);
        Some(spans)
    }
}

fn summarize(id: &str, spans: &[SpanRecord]) -> TraceSummary {
    let start = spans.iter().map(|s| s.start_unix_nano).min().unwrap_or(0);
    let end = spans.iter().map(|s| s.end_unix_nano).max().unwrap_or(start);
    let mut by_start: Vec<&SpanRecord> = spans.iter().collect();
    by_start.sort_by_key(|s| s.start_unix_nano);
    let mut services: Vec<String> = Vec::new();
    for s in &by_start {
        if !services.contains(&s.service) {
            services.push(s.service.clone());
        }
    }
    let ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let root = by_start
        .iter()
        .find(|s| {
            s.parent_span_id
                .as_deref()
                .is_none_or(|p| !ids.contains(&p))
        })
        .map(|s| format!("{}: {}", s.service, s.name));
    TraceSummary {
        trace_id: id.to_owned(),
        start_unix_nano: start,
        duration_ms: end.saturating_sub(start) as f64 / 1e6,
        spans: spans.len(),
        services,
        root,
        error: spans.iter().any(|s| s.error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(trace: u8, id: u8, parent: Option<u8>, start: u64) -> otlp::Span {
        otlp::Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: format!("GET span-{id}"),
            kind: otlp::span::SpanKind::Server as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + 1_000_000,
            ..Default::default()
        }
    }

    fn export(service: &str, spans: Vec<otlp::Span>) -> otlp::ExportTraceServiceRequest {
        otlp::ExportTraceServiceRequest {
            resource_spans: vec![otlp::ResourceSpans {
                resource: Some(otlp::Resource {
                    attributes: vec![otlp::KeyValue {
                        key: "service.name".into(),
                        value: Some(otlp::AnyValue {
                            value: Some(otlp::any_value::Value::StringValue(service.into())),
                        }),
                    }],
                }),
                scope_spans: vec![otlp::ScopeSpans {
                    scope: None,
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    #[test]
    fn spans_from_several_proxies_form_one_trace_and_old_traces_are_forgotten() {
        let store = RecentTraces::default();
        assert_eq!(store.ingest(export("a", vec![span(1, 1, None, 100)])), 1);
        assert_eq!(store.ingest(export("b", vec![span(1, 2, Some(1), 200)])), 1);
        let list = store.list(10);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].services, ["a", "b"]);
        assert_eq!(list[0].root.as_deref(), Some("a: GET span-1"));
        let spans = store.get(&list[0].trace_id).expect("trace");
        assert_eq!(
            spans[1].parent_span_id.as_deref(),
            Some(spans[0].span_id.as_str())
        );

        for t in 0..MAX_TRACES as u64 + 10 {
            let mut s = span(2, 1, None, 1000 + t);
            s.trace_id = (t as u128 + 1000).to_be_bytes().to_vec();
            store.ingest(export("c", vec![s]));
        }
        assert_eq!(store.list(usize::MAX).len(), MAX_TRACES);
        assert!(
            store.get(&list[0].trace_id).is_none(),
            "the oldest went first"
        );
        // Malformed ids are skipped, not kept.
        let mut bad = span(3, 1, None, 1);
        bad.trace_id = vec![1, 2];
        assert_eq!(store.ingest(export("d", vec![bad])), 0);
    }
}
