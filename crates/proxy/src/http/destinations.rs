//! What the proxy knows about destination services: endpoints, route table, protocol.
//!
//! In static mode the file fills [`Destinations`] once. With a control plane, a service is
//! *discovered on first use*: resolving an unknown name creates its entry and asks the control
//! client to watch it; the request waits (bounded) for the first update. Updates replace a
//! [`Snapshot`] atomically (copy-on-write), so the per-request path takes one read lock and an
//! `Arc` clone. Entries unused for a while are dropped and unwatched, so proxy memory follows
//! what the app calls, not the size of the mesh.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use trellis_core::discovery::{
    DestinationDelta, DiscoveredEndpoint, ExternalEndpoints, RouteRule, RouteTable,
};
use trellis_core::policy::DestinationPolicy;
use trellis_core::resources::AppProtocol;
use trellis_core::{Destination, Endpoint, Namespace, ProtocolHint, ServiceName};

use crate::error::ProxyError;
use crate::http::balance::{self, BalancerState, Candidates, EndpointLoad, EndpointMeta, InFlight};
use crate::http::outlier::{HealthView, Outcome, Transition};
use crate::layers::concurrency::Limiter;
use crate::layers::retry::RetryBudget;
use crate::metrics::Label;

/// Most destinations one proxy tracks (a bound against an app calling random host names).
pub const MAX_DESTINATIONS: usize = 10_000;

/// Everything known about one destination at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Whether an answer arrived (always true in static mode).
    pub known: bool,
    /// Whether the service exists.
    pub exists: bool,
    pub protocol: ProtocolHint,
    /// Default request timeout (static config); routes may set their own.
    pub timeout: Option<Duration>,
    pub endpoints: Arc<[Endpoint]>,
    /// Load of each endpoint, index-aligned with `endpoints` (kept across updates by address).
    pub loads: Arc<[Arc<EndpointLoad>]>,
    /// Zone and weight of each endpoint, index-aligned with `endpoints`.
    pub meta: Arc<[EndpointMeta]>,
    pub routes: RouteTable,
    /// Metric labels of `routes.rules`, index-aligned (built once per update, not per request).
    pub route_labels: Vec<Label>,
    /// `routes.rules`, shared, so a request can carry its rule without copying it.
    pub route_rules: Vec<Arc<RouteRule>>,
    /// Load balancing, ejection, limits, budget and faults for calls to this service.
    pub policy: Arc<DestinationPolicy>,
    /// Set for an ExternalService: its addresses per environment (endpoints are this
    /// proxy's environment's, resolved).
    pub external: Option<ExternalEndpoints>,
    /// TLS to an ExternalService's endpoints, when it originates TLS.
    pub external_tls: Option<Arc<rustls::ClientConfig>>,
    /// Endpoint details by instance id (dynamic mode), for `/config` and patching.
    pub instances: BTreeMap<String, DiscoveredEndpoint>,
}

impl Snapshot {
    /// Loads for a new endpoint set: endpoints that stay (same address) keep what was learned
    /// about them (latency, in flight, health); new ones start fresh.
    fn carry_loads(&self, endpoints: &[Endpoint]) -> Arc<[Arc<EndpointLoad>]> {
        let known: HashMap<std::net::SocketAddr, &Arc<EndpointLoad>> = self
            .endpoints
            .iter()
            .zip(self.loads.iter())
            .map(|(e, l)| (e.address, l))
            .collect();
        endpoints
            .iter()
            .map(|e| {
                known
                    .get(&e.address)
                    .map_or_else(Arc::default, |l| Arc::clone(l))
            })
            .collect()
    }
}

/// One destination service.
#[derive(Debug)]
pub struct DestinationState {
    pub name: ServiceName,
    pub label: Label,
    snapshot: RwLock<Arc<Snapshot>>,
    updates: watch::Sender<u64>,
    /// Seconds since proxy start when last used.
    last_used: AtomicU64,
    /// The calling proxy's zone (locality preference).
    local_zone: Arc<str>,
    balancer: BalancerState,
    /// Admission limits (`limits` of the DestinationPolicy), kept across updates.
    pub limiter: Limiter,
    /// How many retries calls to this destination may still add.
    pub retry_budget: RetryBudget,
    /// Whether the policy injects faults (read per request without the snapshot).
    faults: std::sync::atomic::AtomicBool,
}

impl DestinationState {
    fn with_snapshot(name: ServiceName, snapshot: Snapshot, local_zone: Arc<str>) -> Self {
        let limiter = Limiter::new(&snapshot.policy.limits);
        let retry_budget = RetryBudget::new(&snapshot.policy.retry_budget);
        Self {
            label: Label::from(name.as_str()),
            name,
            snapshot: RwLock::new(Arc::new(snapshot)),
            updates: watch::Sender::new(0),
            last_used: AtomicU64::new(0),
            local_zone,
            balancer: BalancerState::default(),
            limiter,
            retry_budget,
            faults: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether calls to this destination have faults injected.
    pub fn injects_faults(&self) -> bool {
        self.faults.load(Ordering::Acquire)
    }

    /// A destination from static configuration.
    pub fn new(name: ServiceName, config: Destination) -> Self {
        Self::with_snapshot(
            name,
            Snapshot {
                known: true,
                exists: true,
                protocol: config.protocol,
                timeout: config.timeout,
                loads: config.endpoints.iter().map(|_| Arc::default()).collect(),
                meta: config
                    .endpoints
                    .iter()
                    .map(|_| EndpointMeta::default())
                    .collect(),
                endpoints: config.endpoints.into(),
                ..Snapshot::default()
            },
            Arc::from(""),
        )
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn replace(&self, s: Snapshot) {
        match self.snapshot.write() {
            Ok(mut g) => *g = Arc::new(s),
            Err(p) => *p.into_inner() = Arc::new(s),
        }
        self.updates.send_modify(|v| *v += 1);
    }

    /// Waits until the first answer about this service arrived, at most `timeout`.
    pub async fn known(&self, timeout: Duration) -> Arc<Snapshot> {
        let snap = self.snapshot();
        if snap.known {
            return snap;
        }
        let mut rx = self.updates.subscribe();
        let _ = tokio::time::timeout(timeout, async {
            while !self.snapshot().known {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        self.snapshot()
    }

    /// An available endpoint chosen by the destination's load balancer ([`balance`]), counted
    /// in flight until the returned guard drops. Fails with `circuit-open` when every endpoint
    /// is ejected or unhealthy.
    pub fn pick(&self) -> Result<(Endpoint, InFlight), ProxyError> {
        let snap = self.snapshot();
        let (Some(_), true, true) = (
            snap.endpoints.first(),
            snap.loads.len() == snap.endpoints.len(),
            snap.meta.len() == snap.endpoints.len(),
        ) else {
            return Err(ProxyError::NoEndpoints {
                service: self.name.to_string(),
            });
        };
        let candidates = Candidates {
            loads: &snap.loads,
            meta: &snap.meta,
            local_zone: &self.local_zone,
            locality_failover: snap.policy.locality_failover,
        };
        let Some(i) = balance::choose(
            snap.policy.load_balancer,
            &self.balancer,
            &candidates,
            Instant::now(),
        ) else {
            return Err(ProxyError::CircuitOpen {
                service: self.name.to_string(),
            });
        };
        let mut in_flight = snap.loads[i].start();
        in_flight.probe = snap.loads[i].health.begin();
        Ok((snap.endpoints[i].clone(), in_flight))
    }

    /// Like [`DestinationState::pick`], preferring an endpoint other than `avoid` (a retry
    /// after it failed) when another is available: a couple of extra draws, no list building.
    pub fn pick_avoiding(
        &self,
        avoid: std::net::SocketAddr,
    ) -> Result<(Endpoint, InFlight), ProxyError> {
        let mut picked = self.pick()?;
        for _ in 0..2 {
            if picked.0.address != avoid {
                break;
            }
            picked = self.pick()?;
        }
        Ok(picked)
    }

    /// Feeds a request's outcome to its endpoint's outlier detection.
    pub fn record(&self, in_flight: &InFlight, outcome: Outcome) -> Transition {
        let health = &in_flight.load().health;
        if outcome == Outcome::Success && health.is_pristine() {
            return Transition::None;
        }
        let snap = self.snapshot();
        let policy = &snap.policy.outlier;
        let may_eject = match outcome {
            Outcome::Success => true,
            Outcome::Failure(_) => {
                let ejected = snap
                    .loads
                    .iter()
                    .filter(|l| l.health.counts_as_ejected())
                    .count();
                (ejected + 1) * 100 <= policy.max_ejected_percent as usize * snap.loads.len()
            }
        };
        in_flight
            .load()
            .health
            .record(outcome, policy, may_eject, Instant::now())
    }

    /// Applies an update from the control plane.
    pub fn apply(&self, delta: DestinationDelta) {
        let old = self.snapshot();
        let mut instances = if delta.reset {
            BTreeMap::new()
        } else {
            old.instances.clone()
        };
        for id in &delta.removed {
            instances.remove(id);
        }
        for ep in delta.upserted {
            instances.insert(ep.instance_id.clone(), ep);
        }
        // An ExternalService keeps its resolved endpoints until `set_external` replaces them.
        let external = delta.external.is_some() || (old.external.is_some() && !delta.reset);
        let endpoints: Arc<[Endpoint]> = if external {
            old.endpoints.clone()
        } else {
            instances
                .values()
                .map(|e| Endpoint {
                    address: e.address,
                    meshed: true,
                    namespace: Some(e.namespace.clone()),
                    external_host: None,
                })
                .collect()
        };
        let loads = old.carry_loads(&endpoints);
        let meta = if external {
            old.meta.clone()
        } else {
            instances
                .values()
                .map(|e| EndpointMeta {
                    zone: Arc::from(e.zone.as_str()),
                    weight: endpoint_weight(e),
                })
                .collect()
        };
        let routes = match delta.routes {
            Some(r) => r,
            None if delta.reset => RouteTable::default(),
            None => old.routes.clone(),
        };
        let route_labels = routes
            .rules
            .iter()
            .map(|r| Label::from(r.name.as_str()))
            .collect();
        let route_rules = routes.rules.iter().cloned().map(Arc::new).collect();
        let policy = match delta.policy {
            Some(p) => Arc::new(p),
            None if delta.reset => Arc::default(),
            None => old.policy.clone(),
        };
        if policy.limits != old.policy.limits {
            self.limiter.reconfigure(&policy.limits);
        }
        if policy.retry_budget != old.policy.retry_budget {
            self.retry_budget.reconfigure(&policy.retry_budget);
        }
        self.faults.store(policy.fault.is_some(), Ordering::Release);
        self.replace(Snapshot {
            external: if external {
                delta.external.or_else(|| old.external.clone())
            } else {
                None
            },
            external_tls: if external {
                old.external_tls.clone()
            } else {
                None
            },
            route_labels,
            route_rules,
            meta,
            policy,
            known: true,
            exists: delta.exists,
            protocol: match delta.protocol {
                None => ProtocolHint::Detect,
                Some(AppProtocol::Http) => ProtocolHint::Http,
                Some(AppProtocol::Http2) => ProtocolHint::Http2,
                Some(AppProtocol::Grpc) => ProtocolHint::Grpc,
                Some(AppProtocol::Tcp) => ProtocolHint::Tcp,
            },
            timeout: old.timeout,
            endpoints,
            loads,
            routes,
            instances,
        });
    }
}

impl DestinationState {
    /// Replaces an ExternalService's endpoints (resolved for this proxy's environment).
    pub fn set_external(&self, endpoints: Vec<Endpoint>, tls: Option<Arc<rustls::ClientConfig>>) {
        let old = self.snapshot();
        if old.external.is_none() {
            return;
        }
        let loads = old.carry_loads(&endpoints);
        let meta = endpoints.iter().map(|_| EndpointMeta::default()).collect();
        let mut next = (*old).clone();
        next.endpoints = endpoints.into();
        next.loads = loads;
        next.meta = meta;
        next.external_tls = tls;
        self.replace(next);
    }

    /// JSON view for `/config` and `trellis explain`: endpoints with their health, routes and
    /// the policy in force.
    pub fn describe(&self) -> serde_json::Value {
        let s = self.snapshot();
        let now = Instant::now();
        let endpoints: Vec<serde_json::Value> = s
            .endpoints
            .iter()
            .zip(s.loads.iter())
            .zip(s.meta.iter())
            .map(|((e, l), meta)| {
                let health = l.health.view(now);
                serde_json::json!({
                    "address": e.address,
                    "meshed": e.meshed,
                    "zone": &*meta.zone,
                    "weight": meta.weight,
                    "state": health.state,
                    "health": health,
                    "inFlight": l.pending(),
                })
            })
            .collect();
        serde_json::json!({
            "known": s.known,
            "exists": s.exists,
            "external": s.external.as_ref().map(|e| serde_json::json!({"environments": e.by_env, "tls": e.tls.is_some()})),
            "protocol": s.protocol,
            "endpoints": endpoints,
            "routes": s.routes,
            "policy": &*s.policy,
            "retryBudget": self.retry_budget.view(),
        })
    }
}

/// Registration label giving an instance's relative weight (default 1; 0 takes it out of
/// rotation unless every endpoint is 0).
pub const WEIGHT_LABEL: &str = "trellis.dev/weight";

fn endpoint_weight(e: &DiscoveredEndpoint) -> u32 {
    e.labels
        .get(WEIGHT_LABEL)
        .and_then(|w| w.parse::<u32>().ok())
        .map_or(1, |w| w.min(10_000))
}

/// What a request or connection is addressed to.
#[derive(Debug, Clone)]
pub enum Target {
    Known(Arc<DestinationState>),
    /// An authority that names no known service (kept for the error message).
    Unknown(String),
    /// No authority at all.
    Missing,
}

impl Target {
    pub fn label(&self) -> Label {
        match self {
            Target::Known(d) => d.label.clone(),
            Target::Unknown(_) | Target::Missing => Label::from(crate::metrics::UNKNOWN),
        }
    }

    pub fn destination(&self) -> Result<&Arc<DestinationState>, ProxyError> {
        match self {
            Target::Known(d) => Ok(d),
            Target::Unknown(authority) => Err(ProxyError::UnknownService {
                authority: authority.clone(),
            }),
            Target::Missing => Err(ProxyError::MissingAuthority),
        }
    }
}

/// Requests from the data path to the control client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchRequest {
    Watch(ServiceName),
    Unwatch(ServiceName),
}

/// All destinations this proxy knows, by name.
#[derive(Debug)]
pub struct Destinations {
    by_name: RwLock<HashMap<ServiceName, Arc<DestinationState>>>,
    namespace: Namespace,
    /// Set in control-plane mode: where watch requests go.
    discovery: Option<mpsc::UnboundedSender<WatchRequest>>,
    started: Instant,
    local_zone: Arc<str>,
}

impl Destinations {
    /// Static destinations only.
    pub fn new(config: &BTreeMap<ServiceName, Destination>, namespace: Namespace) -> Self {
        Self::with_discovery(config, namespace, None)
    }

    pub fn with_discovery(
        config: &BTreeMap<ServiceName, Destination>,
        namespace: Namespace,
        discovery: Option<mpsc::UnboundedSender<WatchRequest>>,
    ) -> Self {
        let by_name = config
            .iter()
            .map(|(name, dest)| {
                (
                    name.clone(),
                    Arc::new(DestinationState::new(name.clone(), dest.clone())),
                )
            })
            .collect();
        Self {
            by_name: RwLock::new(by_name),
            namespace,
            discovery,
            started: Instant::now(),
            local_zone: Arc::from(""),
        }
    }

    /// Sets the zone this proxy runs in (before any destination is discovered).
    pub fn with_local_zone(mut self, zone: &str) -> Self {
        self.local_zone = Arc::from(zone);
        self
    }

    pub fn is_dynamic(&self) -> bool {
        self.discovery.is_some()
    }

    pub fn get(&self, name: &str) -> Option<Arc<DestinationState>> {
        let map = self.by_name.read().unwrap_or_else(|p| p.into_inner());
        map.get(name).cloned()
    }

    /// The state for `name`, creating and watching it in control-plane mode.
    pub fn get_or_discover(&self, name: &str) -> Option<Arc<DestinationState>> {
        let found = self.get(name);
        let state = match (found, &self.discovery) {
            (Some(s), _) => s,
            (None, None) => return None,
            (None, Some(tx)) => {
                let service = ServiceName::new(name).ok()?;
                let mut map = self.by_name.write().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = map.get(name) {
                    s.clone()
                } else {
                    if map.len() >= MAX_DESTINATIONS {
                        return None;
                    }
                    let state = Arc::new(DestinationState::with_snapshot(
                        service.clone(),
                        Snapshot::default(),
                        self.local_zone.clone(),
                    ));
                    map.insert(service.clone(), state.clone());
                    let _ = tx.send(WatchRequest::Watch(service));
                    state
                }
            }
        };
        state
            .last_used
            .store(self.started.elapsed().as_secs(), Ordering::Relaxed);
        Some(state)
    }

    /// Maps an authority to a service. Accepted host forms: `name`, `name.<namespace>` and
    /// `name.<namespace>.svc.cluster.local`, each with an optional port.
    pub fn resolve(&self, authority: Option<&str>) -> Target {
        let Some(authority) = authority else {
            return Target::Missing;
        };
        let host = strip_port(authority);
        let host = host.strip_suffix(".svc.cluster.local").unwrap_or(host);
        let name = match host.split_once('.') {
            None => host,
            Some((name, ns)) if ns.eq_ignore_ascii_case(self.namespace.as_str()) => name,
            Some(_) => return Target::Unknown(authority.to_owned()),
        };
        let found = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.get_or_discover(&name.to_ascii_lowercase())
        } else {
            self.get_or_discover(name)
        };
        match found {
            Some(d) => Target::Known(d),
            None => Target::Unknown(authority.to_owned()),
        }
    }

    /// Installs an ExternalService's resolved endpoints (see `http::external`).
    pub fn set_external(
        &self,
        name: &str,
        endpoints: Vec<Endpoint>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) {
        if let Some(state) = self.get(name) {
            state.set_external(endpoints, tls);
        }
    }

    /// Applies a control-plane update (ignored if the service is no longer tracked).
    pub fn apply(&self, delta: DestinationDelta) {
        if let Some(state) = self.get(delta.service.as_str()) {
            state.apply(delta);
        }
    }

    /// Every destination currently tracked.
    pub fn all(&self) -> Vec<Arc<DestinationState>> {
        let map = self.by_name.read().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    /// Names currently tracked (to resume watches after a reconnect).
    pub fn names(&self) -> Vec<ServiceName> {
        let map = self.by_name.read().unwrap_or_else(|p| p.into_inner());
        map.keys().cloned().collect()
    }

    /// Drops discovered destinations unused for `idle`; returns the dropped names.
    pub fn drop_idle(&self, idle: Duration, pinned: &[ServiceName]) -> Vec<ServiceName> {
        if self.discovery.is_none() {
            return Vec::new();
        }
        let now = self.started.elapsed().as_secs();
        let mut map = self.by_name.write().unwrap_or_else(|p| p.into_inner());
        let stale: Vec<ServiceName> = map
            .iter()
            .filter(|(name, s)| {
                !pinned.contains(name)
                    && now.saturating_sub(s.last_used.load(Ordering::Relaxed)) >= idle.as_secs()
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in &stale {
            map.remove(name);
        }
        stale
    }

    /// The endpoints this proxy keeps out of rotation (ejected, half-open, failing health
    /// checks), with their destination and why.
    pub fn unavailable(&self) -> Vec<(ServiceName, std::net::SocketAddr, HealthView)> {
        let map = self.by_name.read().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut out = Vec::new();
        for (name, state) in map.iter() {
            let s = state.snapshot();
            for (e, l) in s.endpoints.iter().zip(s.loads.iter()) {
                let health = l.health.view(now);
                if health.state != "healthy" {
                    out.push((name.clone(), e.address, health));
                }
            }
        }
        out
    }

    /// JSON view for `/config`.
    pub fn describe(&self) -> serde_json::Value {
        let map = self.by_name.read().unwrap_or_else(|p| p.into_inner());
        let mut out = serde_json::Map::new();
        for (name, state) in map.iter() {
            out.insert(name.to_string(), state.describe());
        }
        serde_json::Value::Object(out)
    }
}

fn strip_port(authority: &str) -> &str {
    // `[v6]:port`, `host:port` or `host`.
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// A cheap per-thread random number in `0..n` (xorshift; not for cryptography).
pub fn random_below(n: u64) -> u64 {
    let x = random_u64();
    if n == 0 { 0 } else { x % n }
}

/// A cheap per-thread random `u64` (xorshift; not for cryptography): balancer draws, sampling
/// decisions and trace ids.
pub fn random_u64() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0x9e37_79b9, |d| d.as_nanos() as u64);
            let addr = &t as *const u64 as u64;
            (t ^ addr.rotate_left(32)) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

/// Picks a backend of `rule` by weight; `None` when the rule has no backends (the destination
/// itself serves) or all weights are zero.
pub fn choose_backend(rule: &RouteRule) -> Option<&ServiceName> {
    let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut x = random_below(total);
    for b in &rule.backends {
        let w = u64::from(b.weight);
        if x < w {
            return Some(&b.service);
        }
        x -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dests(discovery: Option<mpsc::UnboundedSender<WatchRequest>>) -> Destinations {
        let mut cfg = BTreeMap::new();
        cfg.insert(
            ServiceName::new("payments").expect("name"),
            Destination {
                protocol: ProtocolHint::Detect,
                timeout: Some(Duration::from_secs(1)),
                endpoints: vec![
                    Endpoint {
                        address: "127.0.0.1:1".parse().expect("a"),
                        meshed: true,
                        namespace: None,
                        external_host: None,
                    },
                    Endpoint {
                        address: "127.0.0.1:2".parse().expect("a"),
                        meshed: false,
                        namespace: None,
                        external_host: None,
                    },
                ],
            },
        );
        cfg.insert(
            ServiceName::new("empty").expect("name"),
            Destination {
                protocol: ProtocolHint::Tcp,
                timeout: None,
                endpoints: vec![],
            },
        );
        Destinations::with_discovery(&cfg, Namespace::new("shop").expect("ns"), discovery)
    }

    #[test]
    fn resolves_host_forms() {
        let d = dests(None);
        for authority in [
            "payments",
            "payments:8080",
            "PAYMENTS",
            "payments.shop",
            "payments.shop:80",
            "payments.shop.svc.cluster.local",
        ] {
            assert!(
                matches!(d.resolve(Some(authority)), Target::Known(_)),
                "{authority}"
            );
        }
        for authority in ["payments.other", "example.com", "[::1]:80", "pay"] {
            assert!(
                matches!(d.resolve(Some(authority)), Target::Unknown(_)),
                "{authority}"
            );
        }
        assert!(matches!(d.resolve(None), Target::Missing));
    }

    #[test]
    fn spreads_in_flight_requests_and_reports_empty() {
        let d = dests(None);
        let Target::Known(p) = d.resolve(Some("payments")) else {
            panic!("known")
        };
        // While the first request is in flight, its endpoint costs more: the next goes elsewhere.
        let (a, _first) = p.pick().expect("ep");
        let (b, _second) = p.pick().expect("ep");
        assert_ne!(a.address, b.address);
        let Target::Known(e) = d.resolve(Some("empty")) else {
            panic!("known")
        };
        assert_eq!(e.pick().expect_err("none").reason(), "no-endpoints");
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_names_are_discovered_and_patched() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let d = dests(Some(tx));
        let Target::Known(orders) = d.resolve(Some("orders")) else {
            panic!("discovered")
        };
        assert_eq!(
            rx.try_recv().expect("watch"),
            WatchRequest::Watch(ServiceName::new("orders").expect("n"))
        );
        assert!(!orders.snapshot().known);
        // A second resolution reuses the entry and does not watch again.
        let _ = d.resolve(Some("orders"));
        assert!(rx.try_recv().is_err());

        let ep = |id: &str, port: u16| DiscoveredEndpoint {
            instance_id: id.into(),
            address: ([127, 0, 0, 1], port).into(),
            namespace: Default::default(),
            zone: String::new(),
            labels: BTreeMap::new(),
        };
        let name = ServiceName::new("orders").expect("n");
        let waiter = tokio::spawn({
            let orders = orders.clone();
            async move { orders.known(Duration::from_secs(5)).await.endpoints.len() }
        });
        tokio::task::yield_now().await;
        d.apply(DestinationDelta {
            service: name.clone(),
            reset: true,
            exists: true,
            protocol: Some(AppProtocol::Grpc),
            upserted: vec![ep("a", 1), ep("b", 2)],
            removed: vec![],
            routes: Some(RouteTable::default()),
            policy: None,
            external: None,
        });
        assert_eq!(waiter.await.expect("join"), 2);
        d.apply(DestinationDelta {
            service: name,
            reset: false,
            exists: true,
            protocol: Some(AppProtocol::Grpc),
            upserted: vec![ep("c", 3)],
            removed: vec!["a".into()],
            routes: None,
            policy: None,
            external: None,
        });
        let snap = orders.snapshot();
        let ports: Vec<u16> = snap.endpoints.iter().map(|e| e.address.port()).collect();
        assert_eq!(ports, vec![2, 3]);
        assert_eq!(snap.protocol, ProtocolHint::Grpc);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_an_unknown_service_is_bounded() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let d = dests(Some(tx));
        let Target::Known(ghost) = d.resolve(Some("ghost")) else {
            panic!("discovered")
        };
        let snap = ghost.known(Duration::from_millis(100)).await;
        assert!(!snap.known);
    }

    #[test]
    fn idle_destinations_are_dropped_but_pinned_ones_stay() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let d = dests(Some(tx));
        let _ = d.resolve(Some("orders"));
        let pinned = [
            ServiceName::new("payments").expect("n"),
            ServiceName::new("empty").expect("n"),
        ];
        assert!(d.drop_idle(Duration::from_secs(3600), &pinned).is_empty());
        let dropped = d.drop_idle(Duration::ZERO, &pinned);
        assert_eq!(dropped, vec![ServiceName::new("orders").expect("n")]);
        assert!(d.get("orders").is_none());
        assert!(d.get("payments").is_some());
    }

    #[test]
    fn weighted_choice_follows_weights() {
        let rule = RouteRule::plain(
            "split",
            vec![
                trellis_core::discovery::WeightedBackend {
                    service: ServiceName::new("v1").expect("n"),
                    weight: 80,
                },
                trellis_core::discovery::WeightedBackend {
                    service: ServiceName::new("v2").expect("n"),
                    weight: 20,
                },
            ],
        );
        let n = 20_000;
        let v2 = (0..n)
            .filter(|_| choose_backend(&rule).map(|s| s.as_str()) == Some("v2"))
            .count();
        let share = v2 as f64 / n as f64;
        assert!((0.18..0.22).contains(&share), "v2 share {share}");
    }
}
