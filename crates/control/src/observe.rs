//! Observability in the control plane, without Prometheus: golden signals gathered from the
//! proxies over their sessions and merged, live tap fan-in, and the audit events proxies and
//! the CA produce (denials, certificates).
//!
//! Signals are pulled on demand: a query sends a `SignalsRequest` to the relevant sessions and
//! merges whatever answers within [`GATHER_TIMEOUT`] (the answer says how many proxies were
//! asked and how many answered). Merging is exact (see `trellis_core::signals`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use trellis_api::pb;
use trellis_core::discovery::DiscoveredEndpoint;
use trellis_core::names::ServiceName;
use trellis_core::signals::{BUCKET_SECS, Bucket, Direction, SeriesKey, Window, merge_buckets};

use crate::hub::{Hub, Push, SessionId, SessionTarget};
use crate::store::Store;

/// How long a query waits for proxies to answer.
pub const GATHER_TIMEOUT: Duration = Duration::from_millis(1500);

/// Longest window a query may ask for (what proxies keep by default: 30 × 10 s).
pub const MAX_WINDOW_SECS: u32 = 300;

/// Tap events per second per proxy, at most, whatever a client asks.
pub const MAX_TAP_RATE: u32 = 100;

/// Answers younger than this are reused: a dashboard asks for services and edges at once, and
/// several dashboards may be open, but each should cost the proxies one request.
const REUSE_FOR: Duration = Duration::from_secs(1);

/// What a query asked: service filter, window, whether paths were included.
type QueryKey = (Option<ServiceName>, u32, bool);

#[derive(Default)]
struct State {
    queries: HashMap<u64, mpsc::UnboundedSender<(SessionId, pb::SignalsReport)>>,
    /// Open taps: where their events go, and the sessions asked to tap (only they may send).
    taps: HashMap<u64, (mpsc::Sender<pb::TapEvent>, Vec<SessionId>)>,
    recent: HashMap<QueryKey, (std::time::Instant, Arc<Gathered>)>,
}

pub struct Observer {
    hub: Hub,
    store: Arc<dyn Store>,
    state: Mutex<State>,
    next_id: AtomicU64,
}

/// What one proxy answered.
pub struct ProxySignals {
    pub target: SessionTarget,
    pub buckets: Vec<Bucket>,
    pub endpoints: Vec<pb::EndpointState>,
}

/// The answers to one query.
pub struct Gathered {
    pub window_secs: u32,
    pub asked: usize,
    pub answers: Vec<ProxySignals>,
    pub now_unix: i64,
}

impl Observer {
    pub fn new(hub: Hub, store: Arc<dyn Store>) -> Self {
        Self {
            hub,
            store,
            state: Mutex::default(),
            next_id: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every proxy (of `service`, or all) for its last `window_secs` (with per-path
    /// windows when `paths`) and waits for the answers, at most [`GATHER_TIMEOUT`]. An answer
    /// to the same question younger than [`REUSE_FOR`] is reused.
    pub async fn gather(
        &self,
        service: Option<&ServiceName>,
        window_secs: u32,
        paths: bool,
    ) -> Arc<Gathered> {
        let window_secs = window_secs.clamp(BUCKET_SECS as u32, MAX_WINDOW_SECS);
        let key: QueryKey = (service.cloned(), window_secs, paths);
        {
            let mut st = self.lock();
            st.recent.retain(|_, (at, _)| at.elapsed() < REUSE_FOR);
            if let Some((_, g)) = st.recent.get(&key) {
                return g.clone();
            }
        }
        let gathered = Arc::new(self.ask(service, window_secs, paths).await);
        self.lock()
            .recent
            .insert(key, (std::time::Instant::now(), gathered.clone()));
        gathered
    }

    async fn ask(&self, service: Option<&ServiceName>, window_secs: u32, paths: bool) -> Gathered {
        let targets = self.hub.session_targets(service);
        let query_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.lock().queries.insert(query_id, tx);
        let mut waiting: HashMap<SessionId, SessionTarget> = HashMap::new();
        for t in targets {
            if self.hub.send_to(
                t.session,
                Push::SignalsRequest {
                    query_id,
                    window_secs,
                    paths,
                },
            ) {
                waiting.insert(t.session, t);
            }
        }
        let asked = waiting.len();
        let mut answers = Vec::new();
        let deadline = tokio::time::sleep(GATHER_TIMEOUT);
        tokio::pin!(deadline);
        while !waiting.is_empty() {
            tokio::select! {
                answer = rx.recv() => {
                    let Some((session, report)) = answer else { break };
                    let Some(target) = waiting.remove(&session) else { continue };
                    let buckets: Result<Vec<Bucket>, _> =
                        report.buckets.into_iter().map(Bucket::try_from).collect();
                    match buckets {
                        Ok(buckets) => answers.push(ProxySignals { target, buckets, endpoints: report.endpoints }),
                        Err(e) => tracing::warn!(session, error = %e, "ignoring malformed signals report"),
                    }
                }
                _ = &mut deadline => break,
            }
        }
        self.lock().queries.remove(&query_id);
        Gathered {
            window_secs,
            asked,
            answers,
            now_unix: now_unix(),
        }
    }

    /// A proxy's answer (from its session).
    pub fn signals_report(&self, session: SessionId, report: pb::SignalsReport) {
        if let Some(tx) = self.lock().queries.get(&report.query_id) {
            let _ = tx.send((session, report));
        }
    }

    /// Starts a tap on every proxy of `service`. Events arrive on the returned stream until it
    /// is dropped, which stops the tap on every proxy.
    pub fn tap(
        self: &Arc<Self>,
        service: &ServiceName,
        path_prefix: String,
        method: String,
        max_per_second: u32,
    ) -> TapStream {
        let tap_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(1024);
        let targets = self.hub.session_targets(Some(service));
        self.lock()
            .taps
            .insert(tap_id, (tx, targets.iter().map(|t| t.session).collect()));
        let mut sessions = Vec::new();
        for t in targets {
            if self.hub.send_to(
                t.session,
                Push::TapStart {
                    tap_id,
                    path_prefix: path_prefix.clone(),
                    method: method.clone(),
                    max_per_second: max_per_second.clamp(1, MAX_TAP_RATE),
                },
            ) {
                sessions.push(t.session);
            }
        }
        tracing::info!(tap_id, service = %service, proxies = sessions.len(), "tap started");
        TapStream {
            rx,
            keepalive: tokio::time::interval(Duration::from_secs(5)),
            observer: self.clone(),
            tap_id,
            sessions,
        }
    }

    /// An event from `session` for one of its taps (events for taps the session was not asked
    /// for are ignored: a proxy cannot write into another service's tap).
    pub fn tap_event(&self, session: SessionId, event: pb::TapEvent) {
        if let Some((tx, _)) = self
            .lock()
            .taps
            .get(&event.tap_id)
            .filter(|(_, allowed)| allowed.contains(&session))
        {
            // A slow HTTP client loses events rather than backing up the session.
            let _ = tx.try_send(event);
        }
    }

    fn stop_tap(&self, tap_id: u64, sessions: &[SessionId]) {
        self.lock().taps.remove(&tap_id);
        for s in sessions {
            self.hub.send_to(*s, Push::TapStop { tap_id });
        }
        tracing::info!(tap_id, "tap stopped (client gone)");
    }

    /// Denials a proxy of `reporter` (`namespace/service`) reported: into the audit log.
    pub fn denials(&self, reporter: &str, report: pb::Denials) {
        let store = self.store.clone();
        let reporter = reporter.to_owned();
        tokio::task::spawn_blocking(move || {
            for d in report.denials.into_iter().take(1000) {
                let resource = if d.route.is_empty() {
                    reporter.clone()
                } else {
                    format!("{reporter}/{}", d.route)
                };
                let detail = json!({
                    "policy": d.policy,
                    "method": d.method,
                    "path": d.path,
                    "count": d.count,
                    "lastUnixMs": d.last_unix_ms,
                    "reportedBy": reporter,
                });
                if let Err(e) = store.record_event(&d.caller, "denied", &resource, detail) {
                    tracing::warn!(error = %e, "could not record a denial in the audit log");
                }
            }
        });
    }

    /// A workload certificate was issued: into the audit log.
    pub fn certificate_issued(
        &self,
        identity: &impl ToString,
        serial: &str,
        expires: i64,
        renewal: bool,
    ) {
        let store = self.store.clone();
        let (identity, serial) = (identity.to_string(), serial.to_owned());
        tokio::task::spawn_blocking(move || {
            let detail = json!({ "serial": serial, "expiresUnix": expires, "renewal": renewal });
            if let Err(e) = store.record_event("ca", "certificate-issued", &identity, detail) {
                tracing::warn!(error = %e, "could not record a certificate in the audit log");
            }
        });
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Newline-delimited JSON tap events; stops the tap when dropped. An empty line every 5 s
/// while idle lets a departed client be noticed.
pub struct TapStream {
    rx: mpsc::Receiver<pb::TapEvent>,
    keepalive: tokio::time::Interval,
    observer: Arc<Observer>,
    tap_id: u64,
    sessions: Vec<SessionId>,
}

impl Drop for TapStream {
    fn drop(&mut self) {
        self.observer.stop_tap(self.tap_id, &self.sessions);
    }
}

impl tonic::codegen::tokio_stream::Stream for TapStream {
    type Item = Result<bytes::Bytes, std::convert::Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        if let Poll::Ready(event) = self.rx.poll_recv(cx) {
            let Some(e) = event else {
                return Poll::Ready(None);
            };
            let millis = e.unix_ms.max(0) as u64;
            let time = trellis_core::time::rfc3339(UNIX_EPOCH + Duration::from_millis(millis));
            let mut line = serde_json::to_vec(&json!({
                "time": time,
                "direction": if e.inbound { "inbound" } else { "outbound" },
                "src": e.src,
                "dst": e.dst,
                "route": e.route,
                "method": e.method,
                "path": e.path,
                "status": e.status,
                "latency_ms": e.latency_ms,
                "trace_id": e.trace_id,
                "tls": e.tls,
            }))
            .unwrap_or_default();
            line.push(b'\n');
            self.keepalive.reset();
            return Poll::Ready(Some(Ok(line.into())));
        }
        if self.keepalive.poll_tick(cx).is_ready() {
            return Poll::Ready(Some(Ok(bytes::Bytes::from_static(b"\n"))));
        }
        Poll::Pending
    }
}

// === Views ===

fn summary_json(w: &Window, secs: f64) -> Value {
    let s = w.summary(secs);
    json!({
        "requests": s.requests,
        "rps": s.rps,
        "success_rate": s.success_rate,
        "tls_share": s.tls_share,
        "latency_ms": s.latency_ms,
    })
}

/// Seconds the merged buckets cover: from the oldest bucket's start to now.
fn covered_secs(g: &Gathered, buckets: &BTreeMap<i64, Bucket>) -> f64 {
    let oldest = buckets
        .keys()
        .next()
        .copied()
        .unwrap_or(g.now_unix)
        .max(g.now_unix - i64::from(g.window_secs));
    ((g.now_unix - oldest) as f64).max(1.0)
}

/// Merged buckets of the proxies matching `keep`.
fn merged(g: &Gathered, keep: impl Fn(&SessionTarget) -> bool) -> BTreeMap<i64, Bucket> {
    let since = g.now_unix - i64::from(g.window_secs);
    merge_buckets(
        g.answers
            .iter()
            .filter(|a| keep(&a.target))
            .flat_map(|a| a.buckets.iter())
            .filter(|b| b.start_unix + BUCKET_SECS > since),
    )
}

/// The total and the per-bucket points of the series `keep` selects.
fn accumulate(
    buckets: &BTreeMap<i64, Bucket>,
    keep: impl Fn(&SeriesKey) -> bool,
) -> (Window, BTreeMap<i64, Window>) {
    let mut total = Window::default();
    let mut points: BTreeMap<i64, Window> = BTreeMap::new();
    for (start, b) in buckets {
        for (_, w) in b.series.iter().filter(|(k, _)| keep(k)) {
            total.merge(w);
            points.entry(*start).or_default().merge(w);
        }
    }
    (total, points)
}

/// Per-bucket points for sparklines.
fn series_json(points: &BTreeMap<i64, Window>) -> Vec<Value> {
    points
        .iter()
        .map(|(start, w)| {
            let s = w.summary(BUCKET_SECS as f64);
            json!({
                "start_unix": start,
                "requests": s.requests,
                "success_rate": s.success_rate,
                "p99_ms": s.latency_ms.p99,
            })
        })
        .collect()
}

fn envelope(g: &Gathered, items: Vec<Value>) -> Value {
    json!({
        "window_secs": g.window_secs,
        "bucket_secs": BUCKET_SECS,
        "generated_unix_ms": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        "proxies_asked": g.asked,
        "proxies_answered": g.answers.len(),
        "items": items,
    })
}

/// Per service, as its own proxies saw their inbound traffic (what callers got), with its
/// registered instances and which callers keep which of them out of rotation.
pub fn services_view(
    g: &Gathered,
    registry: &BTreeMap<ServiceName, Vec<DiscoveredEndpoint>>,
    only: Option<&ServiceName>,
) -> Value {
    let mut names: Vec<ServiceName> = registry.keys().cloned().collect();
    for a in &g.answers {
        if !names.contains(&a.target.service) {
            names.push(a.target.service.clone());
        }
    }
    names.sort();
    names.retain(|n| only.is_none_or(|o| o == n));
    let items = names
        .into_iter()
        .map(|name| {
            let buckets = merged(g, |t| t.service == name);
            let secs = covered_secs(g, &buckets);
            let (total, points) = accumulate(&buckets, |k| k.direction == Direction::Inbound);
            let instances = registry.get(&name).cloned().unwrap_or_default();
            let endpoints: Vec<Value> = instances
                .iter()
                .map(|e| {
                    let address = e.address.to_string();
                    let mut ejected_by: Vec<String> = Vec::new();
                    let mut state = "healthy".to_owned();
                    let mut reason = None;
                    for a in &g.answers {
                        for s in &a.endpoints {
                            if s.service == name.as_str() && s.address == address {
                                if !ejected_by.contains(&a.target.service.to_string()) {
                                    ejected_by.push(a.target.service.to_string());
                                }
                                state = s.state.clone();
                                reason = Some(s.reason.clone());
                            }
                        }
                    }
                    json!({
                        "instance_id": e.instance_id,
                        "address": address,
                        "zone": e.zone,
                        "state": state,
                        "reason": reason,
                        "ejected_by": ejected_by,
                    })
                })
                .collect();
            let mut item = summary_json(&total, secs);
            item["service"] = json!(name);
            item["instances"] = json!(instances.len());
            item["series"] = json!(series_json(&points));
            item["endpoints"] = json!(endpoints);
            item
        })
        .collect();
    envelope(g, items)
}

/// Per caller → callee pair, as the callers' proxies saw their outbound traffic. The callee's
/// identity is the one the caller's proxy verified when the edge is mTLS; for a name with no
/// instances of its own (a route that splits to other services) there is no single identity.
pub fn edges_view(
    g: &Gathered,
    registry: &BTreeMap<ServiceName, Vec<DiscoveredEndpoint>>,
    trust_domain: &str,
) -> Value {
    let mut callers: Vec<&SessionTarget> = Vec::new();
    for a in &g.answers {
        if !callers.iter().any(|c| c.service == a.target.service) {
            callers.push(&a.target);
        }
    }
    callers.sort_by(|a, b| a.service.cmp(&b.service));
    let mut items = Vec::new();
    for caller in callers {
        let src = &caller.service;
        let buckets = merged(g, |t| t.service == *src);
        let secs = covered_secs(g, &buckets);
        let peers: std::collections::BTreeSet<&str> = buckets
            .values()
            .flat_map(|b| b.series.keys())
            .filter(|k| k.direction == Direction::Outbound)
            .map(|k| k.peer.as_str())
            .collect();
        for dst in peers {
            let (total, points) = accumulate(&buckets, |k| {
                k.direction == Direction::Outbound && k.peer == dst
            });
            let mut item = summary_json(&total, secs);
            item["src"] = json!(src);
            item["dst"] = json!(dst);
            item["src_identity"] = json!(format!(
                "spiffe://{trust_domain}/ns/{}/svc/{src}",
                caller.namespace.as_str()
            ));
            let callee = ServiceName::new(dst)
                .ok()
                .and_then(|name| registry.get(&name)?.first().cloned());
            item["dst_identity"] = match callee {
                Some(e) if total.tls > 0 => json!(format!(
                    "spiffe://{trust_domain}/ns/{}/svc/{dst}",
                    e.namespace.as_str()
                )),
                _ => Value::Null,
            };
            item["series"] = json!(series_json(&points));
            items.push(item);
        }
    }
    envelope(g, items)
}

/// Inbound traffic of `service` per route.
pub fn routes_view(g: &Gathered, service: &ServiceName) -> Value {
    let buckets = merged(g, |t| t.service == *service);
    let secs = covered_secs(g, &buckets);
    let mut routes: BTreeMap<String, Window> = BTreeMap::new();
    for b in buckets.values() {
        for (k, w) in &b.series {
            if k.direction == Direction::Inbound {
                routes.entry(k.route.clone()).or_default().merge(w);
            }
        }
    }
    let items = routes
        .into_iter()
        .map(|(route, w)| {
            let mut item = summary_json(&w, secs);
            item["service"] = json!(service);
            item["route"] = json!(route);
            item
        })
        .collect();
    envelope(g, items)
}

/// The busiest inbound paths of `service`, most requests first (`other` holds paths beyond
/// the proxies' limits).
pub fn paths_view(g: &Gathered, service: &ServiceName, limit: usize) -> Value {
    let buckets = merged(g, |t| t.service == *service);
    let secs = covered_secs(g, &buckets);
    let mut paths: HashMap<(String, String), Window> = HashMap::new();
    for b in buckets.values() {
        for (k, w) in &b.paths {
            if k.direction == Direction::Inbound {
                paths
                    .entry((k.method.clone(), k.path.clone()))
                    .or_default()
                    .merge(w);
            }
        }
    }
    let mut sorted: Vec<_> = paths.into_iter().collect();
    sorted.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(&b.0)));
    let items = sorted
        .into_iter()
        .take(limit)
        .map(|((method, path), w)| {
            let mut item = summary_json(&w, secs);
            item["service"] = json!(service);
            item["method"] = json!(method);
            item["path"] = json!(path);
            item
        })
        .collect();
    envelope(g, items)
}
