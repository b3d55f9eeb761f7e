//! The discovery hub: the registry of live instances, the route tables derived from resources,
//! and every connected proxy's subscriptions. It is transport-free: sessions receive
//! [`DestinationDelta`]s through channels, and the gRPC layer only converts and forwards.
//!
//! Each session remembers what it was last sent per watched service, so every change turns
//! into a minimal diff (upserted/removed endpoints, routes only when they changed). A session
//! whose channel is full is closed rather than blocking the hub; its proxy reconnects and
//! resyncs from a fresh snapshot.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use trellis_core::authz::InboundPolicy;
use trellis_core::discovery::{
    DestinationDelta, DiscoveredEndpoint, ExternalEndpoints, InstanceInfo, RouteTable,
};
use trellis_core::names::{Namespace, ServiceName};
use trellis_core::policy::{DestinationPolicy, InboundRateLimit};
use trellis_core::resources::{
    AppProtocol, DestinationPolicySpec, FaultInjectionSpec, GrpcRouteSpec, MeshConfigSpec,
    Resource, Spec, TargetRef,
};

use crate::metrics::ControlMetrics;

pub type SessionId = u64;

/// What the hub sends to a session.
#[derive(Debug, Clone)]
pub enum Push {
    Destination(Box<DestinationDelta>),
    MeshConfig(MeshConfigSpec),
    Inbound(InboundView),
    TrustBundle(String),
    /// Asks for the golden-signal buckets of the last `window_secs` seconds (with per-path
    /// windows when `paths`).
    SignalsRequest {
        query_id: u64,
        window_secs: u32,
        paths: bool,
    },
    TapStart {
        tap_id: u64,
        path_prefix: String,
        method: String,
        max_per_second: u32,
    },
    TapStop {
        tap_id: u64,
    },
}

/// A connected proxy, for fan-out requests (signals, tap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionTarget {
    pub session: SessionId,
    pub namespace: Namespace,
    pub service: ServiceName,
    pub instances: Vec<String>,
}

/// What a proxy needs to authorize its own inbound traffic: the policies targeting its service
/// and that service's routes (for route-scoped policies).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InboundView {
    pub policies: Vec<InboundPolicy>,
    pub routes: RouteTable,
    pub rate_limits: Vec<InboundRateLimit>,
}

/// Most services one proxy may watch (a bound against a rogue client).
pub const MAX_WATCHES_PER_SESSION: usize = 10_000;
/// Queue of pushes per session before it is considered stuck.
pub const SESSION_QUEUE: usize = 4096;

#[derive(Debug, Clone, Default, PartialEq)]
struct ServiceView {
    endpoints: BTreeMap<String, DiscoveredEndpoint>,
    routes: RouteTable,
    policy: DestinationPolicy,
    external: Option<ExternalEndpoints>,
    protocol: Option<AppProtocol>,
    declared: bool,
}

impl ServiceView {
    fn exists(&self) -> bool {
        self.declared
            || self.external.is_some()
            || !self.endpoints.is_empty()
            || !self.routes.rules.is_empty()
    }
}

struct Session {
    tx: mpsc::Sender<Push>,
    /// What this session was last sent, per watched service.
    sent: HashMap<ServiceName, ServiceView>,
    /// Instances registered through this session (normally one).
    instances: HashSet<(ServiceName, String)>,
    last_seen: Instant,
    /// The service this session's proxy serves, and the inbound view it was last sent.
    own: Option<(Namespace, ServiceName)>,
    inbound_sent: Option<InboundView>,
    /// From the last heartbeat: certificate expiry (Unix s) and the proxy's clock minus ours
    /// (ms; includes half a network trip, negligible next to the skews that matter).
    report: Option<(i64, i64)>,
}

/// One connected proxy's certificate and clock, as it last reported them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyReport {
    pub service: String,
    pub namespace: String,
    pub instances: Vec<String>,
    pub cert_expires_unix: i64,
    pub clock_skew_ms: i64,
}

#[derive(Default)]
struct State {
    services: HashMap<ServiceName, ServiceView>,
    sessions: HashMap<SessionId, Session>,
    watchers: HashMap<ServiceName, HashSet<SessionId>>,
    mesh_config: MeshConfigSpec,
    next_session: SessionId,
    /// Instances remembered from before a restart whose proxies have not reconnected yet;
    /// they expire like silent sessions.
    orphans: HashMap<(ServiceName, String), Instant>,
    /// Bumped on every registry change (for persistence).
    registry_version: u64,
    /// Authorization policies by the service (and namespace) they target.
    policies: HashMap<(Namespace, ServiceName), Vec<InboundPolicy>>,
    /// Rate limits by the service (and namespace) they target.
    rate_limits: HashMap<(Namespace, ServiceName), Vec<InboundRateLimit>>,
}

/// Shared handle to the hub.
#[derive(Clone)]
pub struct Hub {
    state: Arc<Mutex<State>>,
    metrics: ControlMetrics,
    /// Signalled on every registry change (the persister waits on it).
    registry_changed: Arc<tokio::sync::Notify>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HubError {
    #[error("unknown session")]
    UnknownSession,
    #[error("too many watched services (at most {MAX_WATCHES_PER_SESSION})")]
    TooManyWatches,
}

impl Hub {
    pub fn new(metrics: ControlMetrics) -> Self {
        Self {
            state: Arc::default(),
            metrics,
            registry_changed: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving with the state as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session for a newly connected proxy.
    pub fn open_session(&self) -> (SessionId, mpsc::Receiver<Push>) {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let mut st = self.lock();
        st.next_session += 1;
        let id = st.next_session;
        let _ = tx.try_send(Push::MeshConfig(st.mesh_config.clone()));
        st.sessions.insert(
            id,
            Session {
                tx,
                sent: HashMap::new(),
                instances: HashSet::new(),
                last_seen: Instant::now(),
                own: None,
                inbound_sent: None,
                report: None,
            },
        );
        self.metrics.proxies_connected.set(st.sessions.len() as i64);
        (id, rx)
    }

    /// Registers (or re-registers) an instance owned by `session`.
    pub fn register(&self, session: SessionId, info: InstanceInfo) -> Result<(), HubError> {
        let start = Instant::now();
        let mut st = self.lock();
        let s = st
            .sessions
            .get_mut(&session)
            .ok_or(HubError::UnknownSession)?;
        s.instances
            .insert((info.service.clone(), info.instance_id.clone()));
        s.last_seen = Instant::now();
        s.own = Some((info.namespace.clone(), info.service.clone()));
        let service = info.service.clone();
        st.orphans
            .remove(&(service.clone(), info.instance_id.clone()));
        st.registry_version += 1;
        st.services
            .entry(service.clone())
            .or_default()
            .endpoints
            .insert(info.instance_id.clone(), info.endpoint());
        self.update_instance_gauge(&st);
        self.fan_out(&mut st, &service, start);
        Self::push_inbound(&mut st, session);
        Ok(())
    }

    /// Sends a session its inbound view if it changed since the last one it got.
    fn push_inbound(st: &mut State, session: SessionId) {
        let Some(own) = st.sessions.get(&session).and_then(|s| s.own.clone()) else {
            return;
        };
        let view = InboundView {
            policies: st.policies.get(&own).cloned().unwrap_or_default(),
            rate_limits: st.rate_limits.get(&own).cloned().unwrap_or_default(),
            routes: st
                .services
                .get(&own.1)
                .map(|v| v.routes.clone())
                .unwrap_or_default(),
        };
        if let Some(s) = st.sessions.get_mut(&session)
            && s.inbound_sent.as_ref() != Some(&view)
            && s.tx.try_send(Push::Inbound(view.clone())).is_ok()
        {
            s.inbound_sent = Some(view);
        }
    }

    /// Removes the instances a session registered (deregistration, or the stream broke).
    pub fn deregister(&self, session: SessionId) {
        let start = Instant::now();
        let mut st = self.lock();
        let Some(s) = st.sessions.get_mut(&session) else {
            return;
        };
        let owned: Vec<_> = s.instances.drain().collect();
        if !owned.is_empty() {
            st.registry_version += 1;
        }
        for (service, id) in owned {
            if let Some(view) = st.services.get_mut(&service) {
                view.endpoints.remove(&id);
            }
            self.fan_out(&mut st, &service, start);
        }
        self.update_instance_gauge(&st);
    }

    /// Ends a session: its instances leave the registry, its watches end.
    pub fn close_session(&self, session: SessionId) {
        self.deregister(session);
        let mut st = self.lock();
        if let Some(s) = st.sessions.remove(&session) {
            for service in s.sent.keys() {
                if let Some(w) = st.watchers.get_mut(service) {
                    w.remove(&session);
                }
            }
        }
        self.metrics.proxies_connected.set(st.sessions.len() as i64);
    }

    /// `report`: the proxy's certificate expiry and its clock at sending (see [`ProxyReport`]).
    pub fn heartbeat(
        &self,
        session: SessionId,
        report: Option<(i64, i64)>,
    ) -> Result<(), HubError> {
        let mut st = self.lock();
        let s = st
            .sessions
            .get_mut(&session)
            .ok_or(HubError::UnknownSession)?;
        s.last_seen = Instant::now();
        if let Some((cert_expires_unix, sent_unix_ms)) = report {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            s.report = Some((cert_expires_unix, sent_unix_ms.saturating_sub(now_ms)));
        }
        Ok(())
    }

    /// The sessions whose proxies serve `service` (every registered session with `None`).
    pub fn session_targets(&self, service: Option<&ServiceName>) -> Vec<SessionTarget> {
        let st = self.lock();
        let mut out: Vec<SessionTarget> = st
            .sessions
            .iter()
            .filter_map(|(id, s)| {
                let (namespace, own) = s.own.clone()?;
                if service.is_some_and(|wanted| *wanted != own) {
                    return None;
                }
                let mut instances: Vec<String> =
                    s.instances.iter().map(|(_, i)| i.clone()).collect();
                instances.sort();
                Some(SessionTarget {
                    session: *id,
                    namespace,
                    service: own,
                    instances,
                })
            })
            .collect();
        out.sort_by_key(|t| t.session);
        out
    }

    /// Sends `push` to one session without waiting; false if it is gone or its queue is full
    /// (observability requests never close a session, unlike configuration pushes).
    pub fn send_to(&self, session: SessionId, push: Push) -> bool {
        let st = self.lock();
        st.sessions
            .get(&session)
            .is_some_and(|s| s.tx.try_send(push).is_ok())
    }

    /// What connected proxies last reported, for `trellis check`.
    pub fn proxy_reports(&self) -> Vec<ProxyReport> {
        let st = self.lock();
        let mut out: Vec<ProxyReport> = st
            .sessions
            .values()
            .filter_map(|s| {
                let (namespace, service) = s.own.clone()?;
                let (cert_expires_unix, clock_skew_ms) = s.report?;
                Some(ProxyReport {
                    service: service.as_str().to_owned(),
                    namespace: namespace.as_str().to_owned(),
                    instances: s.instances.iter().map(|(_, id)| id.clone()).collect(),
                    cert_expires_unix,
                    clock_skew_ms,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.service, &a.instances).cmp(&(&b.service, &b.instances)));
        out
    }

    /// Starts watching `service`: the session gets a full snapshot now and diffs after.
    pub fn watch(&self, session: SessionId, service: ServiceName) -> Result<(), HubError> {
        let mut st = self.lock();
        let view = st.services.get(&service).cloned().unwrap_or_default();
        let s = st
            .sessions
            .get_mut(&session)
            .ok_or(HubError::UnknownSession)?;
        if !s.sent.contains_key(&service) && s.sent.len() >= MAX_WATCHES_PER_SESSION {
            return Err(HubError::TooManyWatches);
        }
        let delta = DestinationDelta {
            service: service.clone(),
            reset: true,
            exists: view.exists(),
            protocol: view.protocol,
            upserted: view.endpoints.values().cloned().collect(),
            removed: Vec::new(),
            routes: Some(view.routes.clone()),
            policy: Some(view.policy.clone()),
            external: view.external.clone(),
        };
        let ok = s.tx.try_send(Push::Destination(Box::new(delta))).is_ok();
        s.sent.insert(service.clone(), view);
        st.watchers.entry(service).or_default().insert(session);
        if !ok {
            drop(st);
            self.close_session(session);
        }
        Ok(())
    }

    pub fn unwatch(&self, session: SessionId, service: &ServiceName) {
        let mut st = self.lock();
        if let Some(s) = st.sessions.get_mut(&session) {
            s.sent.remove(service);
        }
        if let Some(w) = st.watchers.get_mut(service) {
            w.remove(&session);
        }
    }

    /// Restores instances persisted before a restart. They serve (so callers see no gap while
    /// proxies reconnect) and expire after the heartbeat TTL unless their proxy re-registers.
    pub fn preload(&self, instances: Vec<(ServiceName, DiscoveredEndpoint)>) {
        let mut st = self.lock();
        let now = Instant::now();
        for (service, ep) in instances {
            st.orphans
                .insert((service.clone(), ep.instance_id.clone()), now);
            st.services
                .entry(service)
                .or_default()
                .endpoints
                .insert(ep.instance_id.clone(), ep);
        }
        self.update_instance_gauge(&st);
    }

    /// The registry as it stands, with its change counter (for persistence).
    pub fn registry(&self) -> (u64, Vec<(ServiceName, DiscoveredEndpoint)>) {
        let st = self.lock();
        let all = st
            .services
            .iter()
            .flat_map(|(name, v)| {
                v.endpoints
                    .values()
                    .map(move |ep| (name.clone(), ep.clone()))
            })
            .collect();
        (st.registry_version, all)
    }

    /// Expires sessions that sent nothing for `ttl` (a hung proxy whose TCP stream stays up),
    /// and remembered instances whose proxies did not come back.
    pub fn expire(&self, ttl: Duration) -> usize {
        let start = Instant::now();
        let gone: Vec<(ServiceName, String)> = {
            let mut st = self.lock();
            let gone: Vec<_> = st
                .orphans
                .iter()
                .filter(|(_, since)| since.elapsed() > ttl)
                .map(|(k, _)| k.clone())
                .collect();
            for key in &gone {
                st.orphans.remove(key);
                if let Some(v) = st.services.get_mut(&key.0) {
                    v.endpoints.remove(&key.1);
                }
            }
            if !gone.is_empty() {
                st.registry_version += 1;
            }
            gone
        };
        if !gone.is_empty() {
            let mut st = self.lock();
            for (service, id) in &gone {
                tracing::info!(%service, instance = %id, "instance did not re-register after restart; removed");
                self.fan_out(&mut st, service, start);
            }
            self.update_instance_gauge(&st);
        }
        let stale: Vec<SessionId> = {
            let st = self.lock();
            st.sessions
                .iter()
                .filter(|(_, s)| s.last_seen.elapsed() > ttl && !s.instances.is_empty())
                .map(|(id, _)| *id)
                .collect()
        };
        for id in &stale {
            tracing::info!(session = id, "instance heartbeat expired");
            self.deregister(*id);
        }
        stale.len() + gone.len()
    }

    /// Recomputes route tables, protocols and declared services from the full resource set.
    pub fn resources_changed(&self, resources: &[Resource]) {
        let start = Instant::now();
        let mut routes: HashMap<ServiceName, Vec<(&str, &trellis_core::resources::HttpRouteSpec)>> =
            HashMap::new();
        let mut declared: HashMap<ServiceName, Option<AppProtocol>> = HashMap::new();
        let mut mesh_config = MeshConfigSpec::default();
        let mut policies: HashMap<(Namespace, ServiceName), Vec<InboundPolicy>> = HashMap::new();
        let mut rate_limits: HashMap<(Namespace, ServiceName), Vec<InboundRateLimit>> =
            HashMap::new();
        let mut grpc_routes: HashMap<ServiceName, Vec<(&str, &GrpcRouteSpec)>> = HashMap::new();
        let mut dest_policies: HashMap<ServiceName, &DestinationPolicySpec> = HashMap::new();
        let mut faults: HashMap<ServiceName, &FaultInjectionSpec> = HashMap::new();
        let mut externals: HashMap<ServiceName, ExternalEndpoints> = HashMap::new();
        let target = |r: &Resource, t: &TargetRef| {
            let ns = t
                .namespace
                .as_deref()
                .unwrap_or(r.metadata.namespace.as_str());
            Some((
                Namespace::new(ns).ok()?,
                ServiceName::new(t.name.as_str()).ok()?,
            ))
        };
        for r in resources {
            match &r.spec {
                Spec::HTTPRoute(spec) => {
                    for p in &spec.parent_refs {
                        if let Ok(name) = ServiceName::new(p.name.as_str()) {
                            routes
                                .entry(name)
                                .or_default()
                                .push((r.metadata.name.as_str(), spec));
                        }
                    }
                }
                Spec::Service(spec) => {
                    if let Ok(name) = ServiceName::new(r.metadata.name.as_str()) {
                        declared.insert(name, spec.ports.first().map(|p| p.app_protocol));
                    }
                }
                Spec::MeshConfig(spec) => mesh_config = spec.clone(),
                Spec::GRPCRoute(spec) => {
                    for p in &spec.parent_refs {
                        if let Ok(name) = ServiceName::new(p.name.as_str()) {
                            grpc_routes
                                .entry(name)
                                .or_default()
                                .push((r.metadata.name.as_str(), spec));
                        }
                    }
                }
                Spec::DestinationPolicy(spec) => {
                    if let Some((_, svc)) = target(r, &spec.target_ref) {
                        dest_policies.insert(svc, spec);
                    }
                }
                Spec::ExternalService(spec) => {
                    if let Ok(name) = ServiceName::new(r.metadata.name.as_str()) {
                        declared.insert(name.clone(), Some(spec.protocol));
                        externals.insert(
                            name,
                            ExternalEndpoints {
                                by_env: spec.endpoints.clone(),
                                tls: spec.tls.clone(),
                            },
                        );
                    }
                }
                Spec::FaultInjection(spec) => {
                    if let Some((_, svc)) = target(r, &spec.target_ref) {
                        faults.insert(svc, spec);
                    }
                }
                Spec::RateLimitPolicy(spec) => {
                    if let Some(key) = target(r, &spec.target_ref) {
                        rate_limits
                            .entry(key)
                            .or_default()
                            .push(InboundRateLimit::from_spec(
                                &r.metadata.namespace,
                                &r.metadata.name,
                                spec,
                            ));
                    }
                }
                Spec::AuthorizationPolicy(spec) if spec.target_ref.kind == "Service" => {
                    if let Some(key) = target(r, &spec.target_ref) {
                        policies.entry(key).or_default().push(InboundPolicy {
                            name: r.metadata.name.clone(),
                            namespace: r.metadata.namespace.clone(),
                            action: spec.action,
                            route: spec.target_ref.route.clone(),
                            rules: spec.rules.clone(),
                        });
                    }
                }
                _ => {}
            }
        }
        let mut st = self.lock();
        st.policies = policies;
        st.rate_limits = rate_limits;
        let names: HashSet<ServiceName> = st
            .services
            .keys()
            .chain(routes.keys())
            .chain(grpc_routes.keys())
            .chain(declared.keys())
            .chain(dest_policies.keys())
            .chain(faults.keys())
            .chain(externals.keys())
            .cloned()
            .collect();
        for name in names {
            let table = RouteTable::from_routes(
                routes.get(&name).into_iter().flatten().copied(),
                grpc_routes.get(&name).into_iter().flatten().copied(),
            );
            let policy = DestinationPolicy::resolve(
                dest_policies.get(&name).copied(),
                faults.get(&name).copied(),
            );
            let external = externals.get(&name).cloned();
            let view = st.services.entry(name.clone()).or_default();
            let protocol = declared.get(&name).copied().flatten();
            let is_declared = declared.contains_key(&name);
            if view.routes != table
                || view.protocol != protocol
                || view.declared != is_declared
                || view.policy != policy
                || view.external != external
            {
                view.routes = table;
                view.policy = policy;
                view.external = external;
                view.protocol = protocol;
                view.declared = is_declared;
                self.fan_out(&mut st, &name, start);
            }
        }
        let sessions: Vec<SessionId> = st.sessions.keys().copied().collect();
        for id in sessions {
            Self::push_inbound(&mut st, id);
        }
        if st.mesh_config != mesh_config {
            st.mesh_config = mesh_config.clone();
            for s in st.sessions.values() {
                let _ = s.tx.try_send(Push::MeshConfig(mesh_config.clone()));
            }
        }
    }

    /// Sends every watcher of `service` what changed since its last push.
    fn fan_out(&self, st: &mut State, service: &ServiceName, change_start: Instant) {
        let Some(view) = st.services.get(service).cloned() else {
            return;
        };
        let watchers: Vec<SessionId> = st
            .watchers
            .get(service)
            .map(|w| w.iter().copied().collect())
            .unwrap_or_default();
        let mut stuck = Vec::new();
        for id in watchers {
            let Some(s) = st.sessions.get_mut(&id) else {
                continue;
            };
            let Some(sent) = s.sent.get_mut(service) else {
                continue;
            };
            let delta = diff(service, sent, &view);
            let Some(delta) = delta else { continue };
            match s.tx.try_send(Push::Destination(Box::new(delta))) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    stuck.push(id);
                    continue;
                }
                // The session is ending; its close removes it.
                Err(mpsc::error::TrySendError::Closed(_)) => continue,
            }
            *sent = view.clone();
        }
        self.metrics
            .push_duration
            .observe(change_start.elapsed().as_secs_f64());
        for id in stuck {
            tracing::warn!(
                session = id,
                "proxy is not reading its updates; closing its session"
            );
            if let Some(s) = st.sessions.remove(&id) {
                for svc in s.sent.keys() {
                    if let Some(w) = st.watchers.get_mut(svc) {
                        w.remove(&id);
                    }
                }
                // Its instances leave too, and their watchers must hear about it.
                for (svc, inst) in s.instances {
                    if let Some(v) = st.services.get_mut(&svc) {
                        v.endpoints.remove(&inst);
                    }
                    st.registry_version += 1;
                    self.fan_out(st, &svc, change_start);
                }
                self.update_instance_gauge(st);
            }
        }
        self.metrics.proxies_connected.set(st.sessions.len() as i64);
    }

    /// Sends every connected proxy the trust bundle (a root rotation).
    pub fn broadcast_trust_bundle(&self, pem: String) {
        let st = self.lock();
        for s in st.sessions.values() {
            let _ = s.tx.try_send(Push::TrustBundle(pem.clone()));
        }
    }

    /// Completes after the next registry change.
    pub async fn registry_changed(&self) {
        self.registry_changed.notified().await;
    }

    fn update_instance_gauge(&self, st: &State) {
        self.registry_changed.notify_one();
        let n: usize = st.services.values().map(|v| v.endpoints.len()).sum();
        self.metrics.instances.set(n as i64);
    }

    /// Services and their live instances, for the API and the CLI.
    pub fn snapshot(&self) -> BTreeMap<ServiceName, Vec<DiscoveredEndpoint>> {
        let st = self.lock();
        st.services
            .iter()
            .filter(|(_, v)| v.exists())
            .map(|(k, v)| (k.clone(), v.endpoints.values().cloned().collect()))
            .collect()
    }

    /// What `trellis explain` needs about a destination when no proxy of the caller can be
    /// asked: its routes, the policy for calls to it, and its live instances.
    pub fn destination_view(
        &self,
        service: &ServiceName,
    ) -> Option<(RouteTable, DestinationPolicy, Vec<DiscoveredEndpoint>)> {
        let st = self.lock();
        let v = st.services.get(service).filter(|v| v.exists())?;
        Some((
            v.routes.clone(),
            v.policy.clone(),
            v.endpoints.values().cloned().collect(),
        ))
    }

    /// What a proxy of `service` authorizes with: its policies, the mesh default, its routes.
    pub fn authorization_view(
        &self,
        namespace: &Namespace,
        service: &ServiceName,
    ) -> (
        Vec<InboundPolicy>,
        trellis_core::resources::DefaultPolicy,
        RouteTable,
    ) {
        let st = self.lock();
        (
            st.policies
                .get(&(namespace.clone(), service.clone()))
                .cloned()
                .unwrap_or_default(),
            st.mesh_config.default_policy,
            st.services
                .get(service)
                .map(|v| v.routes.clone())
                .unwrap_or_default(),
        )
    }

    pub fn sessions(&self) -> usize {
        self.lock().sessions.len()
    }
}

/// The delta from `sent` to `now`, or `None` when nothing changed.
fn diff(service: &ServiceName, sent: &ServiceView, now: &ServiceView) -> Option<DestinationDelta> {
    let upserted: Vec<DiscoveredEndpoint> = now
        .endpoints
        .iter()
        .filter(|(id, ep)| sent.endpoints.get(*id) != Some(ep))
        .map(|(_, ep)| ep.clone())
        .collect();
    let removed: Vec<String> = sent
        .endpoints
        .keys()
        .filter(|id| !now.endpoints.contains_key(*id))
        .cloned()
        .collect();
    let routes = (sent.routes != now.routes).then(|| now.routes.clone());
    let policy = (sent.policy != now.policy).then(|| now.policy.clone());
    let external = (sent.external != now.external)
        .then(|| now.external.clone())
        .flatten();
    // An ExternalService that went away: a reset with the registered endpoints replaces it.
    if sent.external.is_some() && now.external.is_none() {
        return Some(DestinationDelta {
            service: service.clone(),
            reset: true,
            exists: now.exists(),
            protocol: now.protocol,
            upserted: now.endpoints.values().cloned().collect(),
            removed: Vec::new(),
            routes: Some(now.routes.clone()),
            policy: Some(now.policy.clone()),
            external: None,
        });
    }
    let meta_changed = sent.protocol != now.protocol || sent.exists() != now.exists();
    if upserted.is_empty()
        && removed.is_empty()
        && routes.is_none()
        && policy.is_none()
        && external.is_none()
        && !meta_changed
    {
        return None;
    }
    Some(DestinationDelta {
        service: service.clone(),
        reset: false,
        exists: now.exists(),
        protocol: now.protocol,
        upserted,
        removed,
        routes,
        policy,
        external,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn hub() -> Hub {
        Hub::new(ControlMetrics::new(&mut Registry::default()))
    }

    fn instance(service: &str, id: &str, port: u16) -> InstanceInfo {
        InstanceInfo {
            service: ServiceName::new(service).expect("name"),
            namespace: Default::default(),
            instance_id: id.into(),
            address: ([127, 0, 0, 1], port).into(),
            zone: String::new(),
            labels: BTreeMap::new(),
        }
    }

    fn next_destination(rx: &mut mpsc::Receiver<Push>) -> DestinationDelta {
        loop {
            match rx.try_recv().expect("a push") {
                Push::Destination(d) => return *d,
                _ => continue,
            }
        }
    }

    #[test]
    fn watchers_get_a_snapshot_then_minimal_diffs() {
        let hub = hub();
        let (server, _srx) = hub.open_session();
        hub.register(server, instance("payments", "p1", 1))
            .expect("register");
        let (client, mut rx) = hub.open_session();
        let payments = ServiceName::new("payments").expect("name");
        hub.watch(client, payments.clone()).expect("watch");
        let snap = next_destination(&mut rx);
        assert!(snap.reset && snap.exists);
        assert_eq!(snap.upserted.len(), 1);

        let (server2, _rx2) = hub.open_session();
        hub.register(server2, instance("payments", "p2", 2))
            .expect("register");
        let d = next_destination(&mut rx);
        assert!(!d.reset);
        assert_eq!(
            d.upserted
                .iter()
                .map(|e| e.instance_id.as_str())
                .collect::<Vec<_>>(),
            vec!["p2"]
        );
        assert!(d.routes.is_none(), "routes unchanged, not resent");

        hub.close_session(server);
        let d = next_destination(&mut rx);
        assert_eq!(d.removed, vec!["p1".to_string()]);
        assert!(rx.try_recv().is_err(), "nothing else pending");
    }

    #[test]
    fn unknown_services_report_not_existing_until_they_appear() {
        let hub = hub();
        let (client, mut rx) = hub.open_session();
        hub.watch(client, ServiceName::new("ghost").expect("name"))
            .expect("watch");
        assert!(!next_destination(&mut rx).exists);
        let (server, _r) = hub.open_session();
        hub.register(server, instance("ghost", "g1", 1))
            .expect("register");
        assert!(next_destination(&mut rx).exists);
    }

    #[test]
    fn route_changes_reach_watchers() {
        let hub = hub();
        let (client, mut rx) = hub.open_session();
        let web = ServiceName::new("web").expect("name");
        hub.watch(client, web).expect("watch");
        let _ = next_destination(&mut rx);
        let rs = trellis_core::resources::parse_documents(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: split}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n    - backendRefs: [{name: web-v1, weight: 80}, {name: web-v2, weight: 20}]\n",
        )
        .expect("valid");
        hub.resources_changed(&rs);
        let d = next_destination(&mut rx);
        let routes = d.routes.expect("routes pushed");
        assert_eq!(routes.rules[0].backends.len(), 2);
        hub.resources_changed(&rs);
        assert!(rx.try_recv().is_err(), "same resources, no push");
    }

    #[test]
    fn watch_limit_is_enforced() {
        let hub = hub();
        let (client, mut rx) = hub.open_session();
        for i in 0..MAX_WATCHES_PER_SESSION {
            hub.watch(client, ServiceName::new(format!("s{i}")).expect("name"))
                .expect("within limit");
            while rx.try_recv().is_ok() {}
        }
        let over = hub.watch(client, ServiceName::new("one-more").expect("name"));
        assert_eq!(over, Err(HubError::TooManyWatches));
    }

    #[test]
    fn a_proxy_that_stops_reading_is_disconnected() {
        let hub = hub();
        let (client, _rx_never_read) = hub.open_session();
        // The watch that finds the queue full closes the session; later calls fail.
        let mut closed = false;
        for i in 0..SESSION_QUEUE + 1 {
            if hub
                .watch(client, ServiceName::new(format!("s{i}")).expect("name"))
                .is_err()
            {
                closed = true;
                break;
            }
        }
        assert!(closed);
        assert_eq!(hub.sessions(), 0);
    }

    #[test]
    fn preloaded_instances_serve_until_their_proxy_returns_or_expire() {
        let hub = hub();
        let ep = |id: &str| instance("payments", id, 1).endpoint();
        let payments = ServiceName::new("payments").expect("name");
        hub.preload(vec![
            (payments.clone(), ep("back")),
            (payments.clone(), ep("gone")),
        ]);
        assert_eq!(hub.snapshot()[&payments].len(), 2);
        // The orphans are older than the TTL below; the re-registered session is fresh.
        std::thread::sleep(Duration::from_millis(300));
        let (s, _rx) = hub.open_session();
        hub.register(s, instance("payments", "back", 1))
            .expect("register");
        assert_eq!(
            hub.expire(Duration::from_millis(150)),
            1,
            "only the orphan expires"
        );
        let left: Vec<_> = hub.snapshot()[&payments]
            .iter()
            .map(|e| e.instance_id.clone())
            .collect();
        assert_eq!(left, vec!["back".to_string()]);
    }

    #[test]
    fn silent_sessions_expire() {
        let hub = hub();
        let (server, _rx) = hub.open_session();
        hub.register(server, instance("payments", "p1", 1))
            .expect("register");
        assert_eq!(hub.expire(Duration::from_secs(3600)), 0);
        assert_eq!(hub.expire(Duration::ZERO), 1);
        assert!(
            hub.snapshot()
                .get(&ServiceName::new("payments").expect("n"))
                .is_none_or(|e| e.is_empty())
        );
    }
}
