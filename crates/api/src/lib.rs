//! The control plane <-> proxy gRPC API (`proto/trellis/control/v1/control.proto`) and its
//! conversions to core types. Protobuf types stop here: the control plane and the proxy work
//! on `trellis_core` types, converted at the edge, where malformed messages from the network
//! become [`ApiError`]s (never panics).

use std::time::Duration;

use trellis_core::authz::InboundPolicy;
use trellis_core::discovery::{
    DestinationDelta, DiscoveredEndpoint, ExternalEndpoints, InstanceInfo, Mirror, PathRule,
    RouteMatch, RouteRule, RouteTable, WeightedBackend,
};
use trellis_core::names::{Namespace, ServiceName};
use trellis_core::policy::{
    ActiveHealthCheck, ConcurrencyLimits, DestinationPolicy, FaultPolicy, InboundRateLimit,
    OutlierDetection, RateLimit, RetryBudget, RetryPolicy,
};
use trellis_core::resources::{
    AppProtocol, AuthzAction, AuthzRule, AuthzSource, AuthzTarget, DefaultPolicy, ExternalTls,
    HeaderModifier, HeaderValuePair, LoadBalancer, MeshConfigSpec, MetricsConfig, MtlsMode,
    OtlpProtocol, TracingConfig,
};

pub mod tls;

#[allow(clippy::all, unreachable_pub, missing_docs)]
pub mod pb {
    tonic::include_proto!("trellis.control.v1");
}

/// OTLP trace export messages and service (a subset of opentelemetry-proto, wire-compatible),
/// and the helpers every producer and reader of them needs.
pub mod otlp {
    #[allow(clippy::all, unreachable_pub, missing_docs)]
    mod generated {
        tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
    }
    pub use generated::*;

    const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

    /// Lower-case hex of `bytes` into `out` (twice as long), without allocating: trace and
    /// span ids are written per request.
    pub fn hex_into(bytes: &[u8], out: &mut [u8]) {
        for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
            pair[0] = HEX_DIGITS[(b >> 4) as usize];
            pair[1] = HEX_DIGITS[(b & 15) as usize];
        }
    }

    /// Lower-case hex of a trace or span id, as W3C `traceparent` and OTLP/JSON write them.
    pub fn hex(bytes: &[u8]) -> String {
        let mut out = vec![0u8; bytes.len() * 2];
        hex_into(bytes, &mut out);
        // Only ASCII hex digits were written.
        String::from_utf8(out).unwrap_or_default()
    }

    /// An attribute's value as text.
    pub fn value_text(v: &AnyValue) -> String {
        match &v.value {
            Some(any_value::Value::StringValue(s)) => s.clone(),
            Some(any_value::Value::BoolValue(b)) => b.to_string(),
            Some(any_value::Value::IntValue(i)) => i.to_string(),
            Some(any_value::Value::DoubleValue(d)) => d.to_string(),
            None => String::new(),
        }
    }

    impl ResourceSpans {
        /// The reporting service (`service.name` of the resource), or "".
        pub fn service_name(&self) -> String {
            self.resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(value_text)
                .unwrap_or_default()
        }
    }
}

pub mod signals;

/// A message that does not describe a valid value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ApiError {
    pub field: String,
    pub reason: String,
}

fn err(field: &str, reason: impl std::fmt::Display) -> ApiError {
    ApiError {
        field: field.into(),
        reason: reason.to_string(),
    }
}

fn service(field: &str, s: &str) -> Result<ServiceName, ApiError> {
    ServiceName::new(s).map_err(|e| err(field, format!("{s:?} {e}")))
}

fn namespace(field: &str, s: &str) -> Result<Namespace, ApiError> {
    if s.is_empty() {
        return Ok(Namespace::default());
    }
    Namespace::new(s).map_err(|e| err(field, format!("{s:?} {e}")))
}

fn addr(field: &str, s: &str) -> Result<std::net::SocketAddr, ApiError> {
    s.parse()
        .map_err(|_| err(field, format!("{s:?} is not IP:PORT")))
}

// === instances ===

impl From<&InstanceInfo> for pb::Instance {
    fn from(i: &InstanceInfo) -> Self {
        pb::Instance {
            service: i.service.to_string(),
            namespace: i.namespace.to_string(),
            instance_id: i.instance_id.clone(),
            address: i.address.to_string(),
            zone: i.zone.clone(),
            labels: i.labels.clone().into_iter().collect(),
        }
    }
}

impl TryFrom<pb::Instance> for InstanceInfo {
    type Error = ApiError;
    fn try_from(i: pb::Instance) -> Result<Self, ApiError> {
        if i.instance_id.is_empty() || i.instance_id.len() > 253 {
            return Err(err("instance.instance_id", "must be 1-253 characters"));
        }
        if i.labels.len() > 64 {
            return Err(err("instance.labels", "at most 64 labels"));
        }
        Ok(InstanceInfo {
            service: service("instance.service", &i.service)?,
            namespace: if i.namespace.is_empty() {
                Namespace::default()
            } else {
                Namespace::new(i.namespace.as_str()).map_err(|e| err("instance.namespace", e))?
            },
            instance_id: i.instance_id,
            address: addr("instance.address", &i.address)?,
            zone: i.zone,
            labels: i.labels.into_iter().collect(),
        })
    }
}

// === endpoints and routes ===

impl From<&DiscoveredEndpoint> for pb::Endpoint {
    fn from(e: &DiscoveredEndpoint) -> Self {
        pb::Endpoint {
            instance_id: e.instance_id.clone(),
            address: e.address.to_string(),
            zone: e.zone.clone(),
            labels: e.labels.clone().into_iter().collect(),
            namespace: e.namespace.as_str().to_owned(),
        }
    }
}

impl TryFrom<pb::Endpoint> for DiscoveredEndpoint {
    type Error = ApiError;
    fn try_from(e: pb::Endpoint) -> Result<Self, ApiError> {
        Ok(DiscoveredEndpoint {
            address: addr("endpoint.address", &e.address)?,
            namespace: namespace("endpoint.namespace", &e.namespace)?,
            instance_id: e.instance_id,
            zone: e.zone,
            labels: e.labels.into_iter().collect(),
        })
    }
}

fn ms(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64)
}

fn from_ms(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

impl From<&RouteTable> for pb::RouteTable {
    fn from(t: &RouteTable) -> Self {
        pb::RouteTable {
            rules: t
                .rules
                .iter()
                .map(|r| pb::RouteRule {
                    name: r.name.clone(),
                    matches: r
                        .matches
                        .iter()
                        .map(|m| pb::RouteMatch {
                            path: m.path.as_ref().map(|p| match p {
                                PathRule::Exact(v) => pb::route_match::Path::Exact(v.clone()),
                                PathRule::Prefix(v) => pb::route_match::Path::Prefix(v.clone()),
                                PathRule::Suffix(v) => pb::route_match::Path::Suffix(v.clone()),
                            }),
                            headers: kvs(&m.headers),
                            query: kvs(&m.query),
                            method: m.method.clone().unwrap_or_default(),
                        })
                        .collect(),
                    backends: r
                        .backends
                        .iter()
                        .map(|b| pb::WeightedBackend {
                            service: b.service.to_string(),
                            weight: b.weight,
                        })
                        .collect(),
                    request_timeout_ms: ms(r.request_timeout),
                    backend_timeout_ms: ms(r.backend_timeout),
                    retry: r.retry.as_ref().map(|p| pb::RetryPolicy {
                        codes: p.codes.iter().map(|c| u32::from(*c)).collect(),
                        attempts: p.attempts,
                        backoff_ms: ms(Some(p.backoff)),
                        non_idempotent: p.non_idempotent,
                    }),
                    request_headers: r.request_headers.as_ref().map(header_modifier),
                    response_headers: r.response_headers.as_ref().map(header_modifier),
                    mirror: r.mirror.as_ref().map(|m| pb::Mirror {
                        service: m.service.to_string(),
                        percent: m.percent,
                    }),
                })
                .collect(),
        }
    }
}

fn header_modifier(m: &HeaderModifier) -> pb::HeaderModifier {
    let kv = |v: &[HeaderValuePair]| {
        v.iter()
            .map(|p| pb::KeyValue {
                name: p.name.clone(),
                value: p.value.clone(),
            })
            .collect()
    };
    pb::HeaderModifier {
        set: kv(&m.set),
        add: kv(&m.add),
        remove: m.remove.clone(),
    }
}

/// Header names and values must be valid on the wire: checked here so the proxy can build
/// them without failing per request.
fn header_modifier_from(field: &str, m: pb::HeaderModifier) -> Result<HeaderModifier, ApiError> {
    let pair = |kv: pb::KeyValue| {
        if http::HeaderName::from_bytes(kv.name.as_bytes()).is_err()
            || http::HeaderValue::from_str(&kv.value).is_err()
        {
            return Err(err(
                field,
                format!("invalid header {:?}: {:?}", kv.name, kv.value),
            ));
        }
        Ok(HeaderValuePair {
            name: kv.name.to_ascii_lowercase(),
            value: kv.value,
        })
    };
    Ok(HeaderModifier {
        set: m.set.into_iter().map(pair).collect::<Result<_, _>>()?,
        add: m.add.into_iter().map(pair).collect::<Result<_, _>>()?,
        remove: m
            .remove
            .into_iter()
            .map(|n| {
                http::HeaderName::from_bytes(n.as_bytes())
                    .map(|h| h.as_str().to_owned())
                    .map_err(|_| err(field, format!("invalid header name {n:?}")))
            })
            .collect::<Result<_, _>>()?,
    })
}

fn kvs(pairs: &[(String, String)]) -> Vec<pb::KeyValue> {
    pairs
        .iter()
        .map(|(name, value)| pb::KeyValue {
            name: name.clone(),
            value: value.clone(),
        })
        .collect()
}

fn pairs(kvs: Vec<pb::KeyValue>) -> Vec<(String, String)> {
    kvs.into_iter()
        .map(|kv| (kv.name.to_ascii_lowercase(), kv.value))
        .collect()
}

impl TryFrom<pb::RouteTable> for RouteTable {
    type Error = ApiError;
    fn try_from(t: pb::RouteTable) -> Result<Self, ApiError> {
        let mut rules = Vec::with_capacity(t.rules.len());
        for (i, r) in t.rules.into_iter().enumerate() {
            let mut backends = Vec::with_capacity(r.backends.len());
            for b in r.backends {
                backends.push(WeightedBackend {
                    service: service(&format!("routes.rules[{i}].backends.service"), &b.service)?,
                    weight: b.weight,
                });
            }
            rules.push(RouteRule {
                name: r.name,
                matches: r
                    .matches
                    .into_iter()
                    .map(|m| RouteMatch {
                        path: m.path.map(|p| match p {
                            pb::route_match::Path::Exact(v) => PathRule::Exact(v),
                            pb::route_match::Path::Prefix(v) => PathRule::Prefix(v),
                            pb::route_match::Path::Suffix(v) => PathRule::Suffix(v),
                        }),
                        headers: pairs(m.headers),
                        query: m.query.into_iter().map(|kv| (kv.name, kv.value)).collect(),
                        method: (!m.method.is_empty()).then_some(m.method),
                    })
                    .collect(),
                backends,
                request_timeout: from_ms(r.request_timeout_ms),
                backend_timeout: from_ms(r.backend_timeout_ms),
                retry: r.retry.map(|p| RetryPolicy {
                    codes: p
                        .codes
                        .into_iter()
                        .filter_map(|c| u16::try_from(c).ok())
                        .collect(),
                    attempts: p.attempts.min(10),
                    backoff: Duration::from_millis(p.backoff_ms),
                    non_idempotent: p.non_idempotent,
                }),
                request_headers: r
                    .request_headers
                    .map(|m| header_modifier_from(&format!("routes.rules[{i}].request_headers"), m))
                    .transpose()?,
                response_headers: r
                    .response_headers
                    .map(|m| {
                        header_modifier_from(&format!("routes.rules[{i}].response_headers"), m)
                    })
                    .transpose()?,
                mirror: r
                    .mirror
                    .map(|m| {
                        Ok::<_, ApiError>(Mirror {
                            service: service(
                                &format!("routes.rules[{i}].mirror.service"),
                                &m.service,
                            )?,
                            percent: m.percent.clamp(0.0, 100.0),
                        })
                    })
                    .transpose()?,
            });
        }
        Ok(RouteTable { rules })
    }
}

// === destination updates ===

fn protocol_str(p: Option<AppProtocol>) -> &'static str {
    match p {
        None => "",
        Some(AppProtocol::Http) => "http",
        Some(AppProtocol::Http2) => "http2",
        Some(AppProtocol::Grpc) => "grpc",
        Some(AppProtocol::Tcp) => "tcp",
    }
}

impl From<&DestinationDelta> for pb::DestinationUpdate {
    fn from(d: &DestinationDelta) -> Self {
        pb::DestinationUpdate {
            service: d.service.to_string(),
            reset: d.reset,
            exists: d.exists,
            protocol: protocol_str(d.protocol).into(),
            upserted: d.upserted.iter().map(Into::into).collect(),
            removed: d.removed.clone(),
            routes: d.routes.as_ref().map(Into::into),
            policy: d.policy.as_ref().map(Into::into),
            external: d.external.as_ref().map(|e| pb::External {
                environments: e
                    .by_env
                    .iter()
                    .map(|(env, addrs)| pb::EnvAddresses {
                        env: env.clone(),
                        addresses: addrs.clone(),
                    })
                    .collect(),
                tls: e.tls.is_some(),
                sni: e
                    .tls
                    .as_ref()
                    .and_then(|t| t.sni.clone())
                    .unwrap_or_default(),
                ca_bundle_pem: e
                    .tls
                    .as_ref()
                    .and_then(|t| t.ca_bundle.clone())
                    .unwrap_or_default(),
            }),
        }
    }
}

fn load_balancer_str(lb: LoadBalancer) -> &'static str {
    match lb {
        LoadBalancer::P2cEwma => "p2c-ewma",
        LoadBalancer::RoundRobin => "round-robin",
        LoadBalancer::LeastRequest => "least-request",
        LoadBalancer::Random => "random",
    }
}

impl From<&DestinationPolicy> for pb::DestinationPolicy {
    fn from(p: &DestinationPolicy) -> Self {
        pb::DestinationPolicy {
            load_balancer: load_balancer_str(p.load_balancer).into(),
            consecutive_failures: p.outlier.consecutive_failures,
            base_ejection_ms: ms(Some(p.outlier.base_ejection)),
            max_ejection_ms: ms(Some(p.outlier.max_ejection)),
            max_ejected_percent: p.outlier.max_ejected_percent,
            max_concurrent_requests: p.limits.max_concurrent.unwrap_or(0),
            max_pending_requests: p.limits.max_pending,
            retry_budget_ratio: p.retry_budget.ratio,
            retry_budget_min_per_second: p.retry_budget.min_per_second,
            health_check: p.health_check.as_ref().map(|h| pb::HealthCheck {
                path: h.path.clone(),
                interval_ms: ms(Some(h.interval)),
                unhealthy_threshold: h.unhealthy_threshold,
            }),
            locality_failover: p.locality_failover,
            fault: p.fault.as_ref().map(|f| pb::Fault {
                delay_ms: ms(f.delay.map(|d| d.0)),
                delay_percent: f.delay.map_or(0.0, |d| d.1),
                abort_status: f.abort.map_or(0, |a| u32::from(a.0)),
                abort_percent: f.abort.map_or(0.0, |a| a.1),
            }),
        }
    }
}

impl TryFrom<pb::DestinationPolicy> for DestinationPolicy {
    type Error = ApiError;
    fn try_from(p: pb::DestinationPolicy) -> Result<Self, ApiError> {
        let load_balancer = match p.load_balancer.as_str() {
            "" | "p2c-ewma" => LoadBalancer::P2cEwma,
            "round-robin" => LoadBalancer::RoundRobin,
            "least-request" => LoadBalancer::LeastRequest,
            "random" => LoadBalancer::Random,
            other => {
                return Err(err(
                    "policy.load_balancer",
                    format!("unknown load balancer {other:?}"),
                ));
            }
        };
        let percent = |field: &str, v: f64| {
            if (0.0..=100.0).contains(&v) {
                Ok(v)
            } else {
                Err(err(field, format!("{v} is not a percentage")))
            }
        };
        let fault = match p.fault {
            None => None,
            Some(f) => Some(FaultPolicy {
                delay: (f.delay_ms > 0)
                    .then(|| percent("policy.fault.delay_percent", f.delay_percent))
                    .transpose()?
                    .map(|pct| (Duration::from_millis(f.delay_ms), pct)),
                abort: match u16::try_from(f.abort_status) {
                    Ok(0) => None,
                    Ok(s @ 100..=599) => {
                        Some((s, percent("policy.fault.abort_percent", f.abort_percent)?))
                    }
                    _ => return Err(err("policy.fault.abort_status", "not an HTTP status")),
                },
            }),
        };
        Ok(DestinationPolicy {
            load_balancer,
            outlier: OutlierDetection {
                consecutive_failures: p.consecutive_failures.max(1),
                base_ejection: Duration::from_millis(p.base_ejection_ms),
                max_ejection: Duration::from_millis(p.max_ejection_ms.max(p.base_ejection_ms)),
                max_ejected_percent: p.max_ejected_percent.min(100),
            },
            limits: ConcurrencyLimits {
                max_concurrent: (p.max_concurrent_requests > 0)
                    .then_some(p.max_concurrent_requests),
                max_pending: p.max_pending_requests,
            },
            retry_budget: RetryBudget {
                ratio: if p.retry_budget_ratio.is_finite() {
                    p.retry_budget_ratio.clamp(0.0, 1.0)
                } else {
                    0.0
                },
                min_per_second: p.retry_budget_min_per_second,
            },
            health_check: p
                .health_check
                .map(|h| {
                    if !h.path.starts_with('/') || h.interval_ms == 0 {
                        return Err(err("policy.health_check", "needs a /path and an interval"));
                    }
                    Ok(ActiveHealthCheck {
                        path: h.path,
                        interval: Duration::from_millis(h.interval_ms),
                        unhealthy_threshold: h.unhealthy_threshold.max(1),
                    })
                })
                .transpose()?,
            locality_failover: p.locality_failover,
            fault,
        })
    }
}

impl From<&InboundRateLimit> for pb::RateLimitPolicy {
    fn from(r: &InboundRateLimit) -> Self {
        let bucket = |b: &RateLimit| pb::TokenBucket {
            requests_per_second: b.requests_per_second,
            burst: b.burst,
        };
        pb::RateLimitPolicy {
            name: r.name.clone(),
            route: r.route.clone().unwrap_or_default(),
            total: Some(bucket(&r.total)),
            per_caller: r.per_caller.as_ref().map(bucket),
        }
    }
}

impl TryFrom<pb::RateLimitPolicy> for InboundRateLimit {
    type Error = ApiError;
    fn try_from(r: pb::RateLimitPolicy) -> Result<Self, ApiError> {
        let bucket = |field: &str, b: pb::TokenBucket| {
            if !(b.requests_per_second > 0.0 && b.requests_per_second.is_finite()) {
                return Err(err(field, "requests_per_second must be positive"));
            }
            Ok(RateLimit {
                requests_per_second: b.requests_per_second,
                burst: b.burst.max(1),
            })
        };
        Ok(InboundRateLimit {
            name: r.name,
            route: (!r.route.is_empty()).then_some(r.route),
            total: bucket(
                "rate_limit.total",
                r.total.ok_or_else(|| err("rate_limit.total", "missing"))?,
            )?,
            per_caller: r
                .per_caller
                .map(|b| bucket("rate_limit.per_caller", b))
                .transpose()?,
        })
    }
}

impl TryFrom<pb::DestinationUpdate> for DestinationDelta {
    type Error = ApiError;
    fn try_from(d: pb::DestinationUpdate) -> Result<Self, ApiError> {
        let protocol = match d.protocol.as_str() {
            "" => None,
            "http" => Some(AppProtocol::Http),
            "http2" => Some(AppProtocol::Http2),
            "grpc" => Some(AppProtocol::Grpc),
            "tcp" => Some(AppProtocol::Tcp),
            other => {
                return Err(err(
                    "destination.protocol",
                    format!("unknown protocol {other:?}"),
                ));
            }
        };
        Ok(DestinationDelta {
            service: service("destination.service", &d.service)?,
            reset: d.reset,
            exists: d.exists,
            protocol,
            upserted: d
                .upserted
                .into_iter()
                .map(DiscoveredEndpoint::try_from)
                .collect::<Result<_, _>>()?,
            removed: d.removed,
            routes: d.routes.map(RouteTable::try_from).transpose()?,
            policy: d.policy.map(DestinationPolicy::try_from).transpose()?,
            external: d.external.map(|e| ExternalEndpoints {
                by_env: e
                    .environments
                    .into_iter()
                    .map(|a| (a.env, a.addresses))
                    .collect(),
                tls: e.tls.then(|| ExternalTls {
                    sni: (!e.sni.is_empty()).then_some(e.sni),
                    ca_bundle: (!e.ca_bundle_pem.is_empty()).then_some(e.ca_bundle_pem),
                }),
            }),
        })
    }
}

// === mesh config ===

impl From<&InboundPolicy> for pb::AuthorizationPolicy {
    fn from(p: &InboundPolicy) -> Self {
        pb::AuthorizationPolicy {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            action: match p.action {
                AuthzAction::Allow => "ALLOW",
                AuthzAction::Deny => "DENY",
                AuthzAction::Audit => "AUDIT",
            }
            .into(),
            route: p.route.clone().unwrap_or_default(),
            rules: p
                .rules
                .iter()
                .map(|r| pb::AuthzRule {
                    from: r
                        .from
                        .iter()
                        .map(|f| pb::AuthzSource {
                            services: f.services.clone(),
                            namespaces: f.namespaces.clone(),
                            identities: f.identities.clone(),
                        })
                        .collect(),
                    to: r
                        .to
                        .iter()
                        .map(|t| pb::AuthzTarget {
                            paths: t.paths.clone(),
                            methods: t.methods.clone(),
                            ports: t.ports.iter().map(|p| u32::from(*p)).collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::AuthorizationPolicy> for InboundPolicy {
    type Error = ApiError;
    fn try_from(p: pb::AuthorizationPolicy) -> Result<Self, ApiError> {
        let action = match p.action.as_str() {
            "ALLOW" => AuthzAction::Allow,
            "DENY" => AuthzAction::Deny,
            "AUDIT" => AuthzAction::Audit,
            other => return Err(err("policy.action", format!("{other:?}"))),
        };
        let mut rules = Vec::with_capacity(p.rules.len());
        for r in p.rules {
            let mut to = Vec::with_capacity(r.to.len());
            for t in r.to {
                let ports = t
                    .ports
                    .into_iter()
                    .map(|p| u16::try_from(p).map_err(|_| err("policy.rules.to.ports", p)))
                    .collect::<Result<_, _>>()?;
                to.push(AuthzTarget {
                    paths: t.paths,
                    methods: t.methods,
                    ports,
                });
            }
            rules.push(AuthzRule {
                from: r
                    .from
                    .into_iter()
                    .map(|f| AuthzSource {
                        services: f.services,
                        namespaces: f.namespaces,
                        identities: f.identities,
                    })
                    .collect(),
                to,
            });
        }
        Ok(InboundPolicy {
            name: p.name,
            namespace: p.namespace,
            action,
            route: (!p.route.is_empty()).then_some(p.route),
            rules,
        })
    }
}

impl From<&MeshConfigSpec> for pb::MeshConfig {
    fn from(m: &MeshConfigSpec) -> Self {
        pb::MeshConfig {
            mtls: match m.mtls {
                MtlsMode::Strict => "strict",
                MtlsMode::Permissive => "permissive",
            }
            .into(),
            default_policy: match m.default_policy {
                DefaultPolicy::Allow => "allow",
                DefaultPolicy::Deny => "deny",
                DefaultPolicy::AllowAuthenticated => "allow-authenticated",
            }
            .into(),
            tracing_sampling: m.tracing.as_ref().map_or(0.0, |t| t.sampling),
            otlp_endpoint: m
                .tracing
                .as_ref()
                .and_then(|t| t.otlp_endpoint.clone())
                .unwrap_or_default(),
            access_log: m.access_log.unwrap_or(false),
            access_log_services: m.access_log_services.clone(),
            otlp_protocol: match m.tracing.as_ref().map(|t| t.protocol) {
                Some(OtlpProtocol::HttpProtobuf) => "http/protobuf",
                _ => "grpc",
            }
            .into(),
            max_routes_per_service: m
                .metrics
                .as_ref()
                .and_then(|x| x.max_routes_per_service)
                .unwrap_or(0),
            max_paths: m.metrics.as_ref().and_then(|x| x.max_paths).unwrap_or(0),
        }
    }
}

impl TryFrom<pb::MeshConfig> for MeshConfigSpec {
    type Error = ApiError;
    fn try_from(m: pb::MeshConfig) -> Result<Self, ApiError> {
        Ok(MeshConfigSpec {
            mtls: match m.mtls.as_str() {
                "strict" | "" => MtlsMode::Strict,
                "permissive" => MtlsMode::Permissive,
                other => return Err(err("mesh_config.mtls", format!("{other:?}"))),
            },
            default_policy: match m.default_policy.as_str() {
                "allow" | "" => DefaultPolicy::Allow,
                "deny" => DefaultPolicy::Deny,
                "allow-authenticated" => DefaultPolicy::AllowAuthenticated,
                other => return Err(err("mesh_config.default_policy", format!("{other:?}"))),
            },
            tracing: Some(TracingConfig {
                sampling: m.tracing_sampling.clamp(0.0, 1.0),
                otlp_endpoint: (!m.otlp_endpoint.is_empty()).then_some(m.otlp_endpoint),
                protocol: match m.otlp_protocol.as_str() {
                    "grpc" | "" => OtlpProtocol::Grpc,
                    "http/protobuf" => OtlpProtocol::HttpProtobuf,
                    other => return Err(err("mesh_config.otlp_protocol", format!("{other:?}"))),
                },
            }),
            access_log: Some(m.access_log),
            access_log_services: m.access_log_services,
            metrics: Some(MetricsConfig {
                max_routes_per_service: (m.max_routes_per_service > 0)
                    .then_some(m.max_routes_per_service),
                max_paths: (m.max_paths > 0).then_some(m.max_paths),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_delta_round_trips() {
        let delta = DestinationDelta {
            service: ServiceName::new("payments").expect("name"),
            reset: true,
            exists: true,
            protocol: Some(AppProtocol::Grpc),
            upserted: vec![DiscoveredEndpoint {
                instance_id: "p-1".into(),
                address: "127.0.0.1:4143".parse().expect("addr"),
                namespace: Default::default(),
                zone: "z1".into(),
                labels: [("version".to_string(), "v2".to_string())].into(),
            }],
            removed: vec!["p-0".into()],
            routes: Some(RouteTable {
                rules: vec![RouteRule {
                    name: "split".into(),
                    matches: vec![RouteMatch {
                        path: Some(PathRule::Prefix("/api".into())),
                        headers: vec![("x-canary".into(), "yes".into())],
                        query: vec![],
                        method: Some("GET".into()),
                    }],
                    backends: vec![WeightedBackend {
                        service: ServiceName::new("payments-v2").expect("name"),
                        weight: 20,
                    }],
                    request_timeout: Some(Duration::from_millis(1500)),
                    backend_timeout: None,
                    retry: Some(RetryPolicy {
                        codes: vec![503],
                        attempts: 3,
                        backoff: Duration::from_millis(50),
                        non_idempotent: true,
                    }),
                    request_headers: Some(HeaderModifier {
                        set: vec![HeaderValuePair {
                            name: "x-env".into(),
                            value: "canary".into(),
                        }],
                        add: vec![],
                        remove: vec!["x-debug".into()],
                    }),
                    response_headers: None,
                    mirror: Some(Mirror {
                        service: ServiceName::new("payments-shadow").expect("name"),
                        percent: 25.0,
                    }),
                }],
            }),
            policy: Some(DestinationPolicy {
                load_balancer: LoadBalancer::LeastRequest,
                limits: ConcurrencyLimits {
                    max_concurrent: Some(10),
                    max_pending: 2,
                },
                fault: Some(FaultPolicy {
                    delay: Some((Duration::from_millis(100), 10.0)),
                    abort: Some((503, 50.0)),
                }),
                ..DestinationPolicy::default()
            }),
            external: Some(ExternalEndpoints {
                by_env: [("prod".to_string(), vec!["api.example.com:443".to_string()])].into(),
                tls: Some(ExternalTls {
                    sni: Some("api.example.com".into()),
                    ca_bundle: None,
                }),
            }),
        };
        let wire = pb::DestinationUpdate::from(&delta);
        assert_eq!(DestinationDelta::try_from(wire).expect("valid"), delta);
    }

    #[test]
    fn garbage_from_the_network_is_an_error_not_a_panic() {
        let bad = pb::Instance {
            service: "Not A Name".into(),
            instance_id: "x".into(),
            address: "127.0.0.1:1".into(),
            ..Default::default()
        };
        assert_eq!(
            InstanceInfo::try_from(bad).expect_err("bad").field,
            "instance.service"
        );
        let bad = pb::Instance {
            service: "web".into(),
            instance_id: "x".into(),
            address: "nowhere".into(),
            ..Default::default()
        };
        assert_eq!(
            InstanceInfo::try_from(bad).expect_err("bad").field,
            "instance.address"
        );
        let bad = pb::DestinationUpdate {
            service: "web".into(),
            protocol: "smtp".into(),
            ..Default::default()
        };
        assert!(DestinationDelta::try_from(bad).is_err());
    }
}
