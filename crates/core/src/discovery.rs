//! What a proxy needs to know about a destination service: its endpoints and its route table.
//! Built by the control plane from the registry and resources, carried over the API, and
//! evaluated by the proxy per request ([`RouteTable::select`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use crate::duration::parse_duration;
use crate::names::ServiceName;
use crate::policy::{DestinationPolicy, RetryPolicy};
use crate::resources::{
    FilterType, GrpcRouteSpec, HeaderModifier, HttpRouteFilter, HttpRouteMatch, HttpRouteSpec,
    PathMatchType,
};

/// One instance of a service, as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DiscoveredEndpoint {
    pub instance_id: String,
    /// The instance proxy's inbound (advertised) address.
    pub address: SocketAddr,
    /// The instance's namespace: with the service, the identity its proxy must present.
    pub namespace: crate::names::Namespace,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
}

/// Where a matched request goes: a service and its share of traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WeightedBackend {
    pub service: ServiceName,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PathRule {
    Exact(String),
    Prefix(String),
    /// gRPC method matches without a service: `/<any service>/<method>`.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteMatch {
    pub path: Option<PathRule>,
    /// Exact header matches (names lower-case).
    pub headers: Vec<(String, String)>,
    pub query: Vec<(String, String)>,
    pub method: Option<String>,
}

/// Copies of a route's requests sent to a shadow service (responses dropped).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mirror {
    pub service: ServiceName,
    /// Share of requests copied, 0–100.
    pub percent: f64,
}

/// One route: the first rule whose matches accept a request decides its backends.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteRule {
    /// `<route name>` or `<route name>.<rule name>`; the metrics `route` label.
    pub name: String,
    /// Any one must match; empty matches everything.
    pub matches: Vec<RouteMatch>,
    /// Empty: the destination service itself.
    pub backends: Vec<WeightedBackend>,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    /// `None`: only requests that never reached an endpoint are tried again (by the proxy's
    /// forwarding, once, on another endpoint).
    pub retry: Option<RetryPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

impl RouteRule {
    /// A rule that sends everything to `backends` with no other behaviour.
    pub fn plain(name: impl Into<String>, backends: Vec<WeightedBackend>) -> Self {
        Self {
            name: name.into(),
            matches: Vec::new(),
            backends,
            request_timeout: None,
            backend_timeout: None,
            retry: None,
            request_headers: None,
            response_headers: None,
            mirror: None,
        }
    }
}

/// Ordered route rules of one service (most specific first).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct RouteTable {
    pub rules: Vec<RouteRule>,
}

/// Header lookup by lower-case name (implemented by the proxy over its header map).
pub trait Headers {
    fn get(&self, name: &str) -> Option<&str>;
}

/// The parts of a request that routes look at.
pub struct RequestFacts<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a dyn Headers,
}

impl RouteMatch {
    fn accepts(&self, req: &RequestFacts<'_>) -> bool {
        let path_ok = match &self.path {
            None => true,
            Some(PathRule::Exact(p)) => req.path == p,
            Some(PathRule::Prefix(p)) => path_has_prefix(req.path, p),
            Some(PathRule::Suffix(s)) => req.path.ends_with(s.as_str()),
        };
        path_ok
            && self.method.as_deref().is_none_or(|m| m == req.method)
            && self
                .headers
                .iter()
                .all(|(k, v)| req.headers.get(k) == Some(v.as_str()))
            && self.query.iter().all(|(k, v)| {
                req.query.is_some_and(|q| {
                    q.split('&').any(|kv| {
                        kv.split_once('=')
                            .is_some_and(|(qk, qv)| qk == k && qv == v)
                    })
                })
            })
    }

    /// Gateway API precedence: exact path, then longer prefix, then method, headers, query.
    fn precedence(&self) -> (u8, usize, u8, usize, usize) {
        let (exact, len) = match &self.path {
            Some(PathRule::Exact(p)) => (1, p.len()),
            Some(PathRule::Prefix(p)) => (0, p.len()),
            Some(PathRule::Suffix(s)) => (0, s.len()),
            None => (0, 1),
        };
        (
            exact,
            len,
            u8::from(self.method.is_some()),
            self.headers.len(),
            self.query.len(),
        )
    }
}

/// `/api` matches `/api`, `/api/` and `/api/x`, not `/apix` (segment-wise, as the Gateway API).
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl RouteTable {
    /// The rule for a request, if any rule matches.
    pub fn select(&self, req: &RequestFacts<'_>) -> Option<&RouteRule> {
        self.select_index(req).map(|i| &self.rules[i])
    }

    /// Like [`RouteTable::select`], returning the rule's index.
    pub fn select_index(&self, req: &RequestFacts<'_>) -> Option<usize> {
        self.rules
            .iter()
            .position(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.accepts(req)))
    }

    /// Builds the table of `service` from the HTTPRoutes attached to it, ordered by
    /// precedence. `routes` are `(route name, spec)`.
    pub fn from_http_routes<'a>(
        routes: impl IntoIterator<Item = (&'a str, &'a HttpRouteSpec)>,
    ) -> Self {
        Self::from_routes(routes, [])
    }

    /// Builds the table of a service from its HTTPRoutes and GRPCRoutes (gRPC methods become
    /// paths `/<service>/<method>`), ordered by precedence.
    pub fn from_routes<'a>(
        http: impl IntoIterator<Item = (&'a str, &'a HttpRouteSpec)>,
        grpc: impl IntoIterator<Item = (&'a str, &'a GrpcRouteSpec)>,
    ) -> Self {
        let mut flat: Vec<(RouteMatch, RouteRule)> = Vec::new();
        let rule_name = |route: &str, rule: &Option<String>| match rule {
            Some(n) => format!("{route}.{n}"),
            None => route.to_owned(),
        };
        for (route_name, spec) in http {
            for rule in &spec.rules {
                let mut base = base_rule(
                    rule_name(route_name, &rule.name),
                    &rule.backend_refs,
                    rule.timeouts.as_ref(),
                    rule.retry.as_ref(),
                );
                apply_filters(&mut base, &rule.filters);
                let matches: Vec<RouteMatch> = if rule.matches.is_empty() {
                    vec![convert_match(&HttpRouteMatch {
                        path: None,
                        headers: vec![],
                        query_params: vec![],
                        method: None,
                    })]
                } else {
                    rule.matches.iter().map(convert_match).collect()
                };
                for m in matches {
                    flat.push((m, base.clone()));
                }
            }
        }
        for (route_name, spec) in grpc {
            for rule in &spec.rules {
                let base = base_rule(
                    route_name.to_owned(),
                    &rule.backend_refs,
                    rule.timeouts.as_ref(),
                    rule.retry.as_ref(),
                );
                let matches: Vec<RouteMatch> = if rule.matches.is_empty() {
                    vec![RouteMatch {
                        path: None,
                        headers: vec![],
                        query: vec![],
                        method: None,
                    }]
                } else {
                    rule.matches
                        .iter()
                        .map(|m| {
                            let method = m.method.as_ref();
                            let service = method.and_then(|x| x.service.as_deref());
                            let name = method.and_then(|x| x.method.as_deref());
                            RouteMatch {
                                path: match (service, name) {
                                    (Some(s), Some(n)) => {
                                        Some(PathRule::Exact(format!("/{s}/{n}")))
                                    }
                                    (Some(s), None) => Some(PathRule::Prefix(format!("/{s}"))),
                                    (None, Some(n)) => Some(PathRule::Suffix(format!("/{n}"))),
                                    (None, None) => None,
                                },
                                headers: m
                                    .headers
                                    .iter()
                                    .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                                    .collect(),
                                query: vec![],
                                method: None,
                            }
                        })
                        .collect()
                };
                for m in matches {
                    flat.push((m, base.clone()));
                }
            }
        }
        // Stable sort keeps apply order among equals.
        flat.sort_by_key(|b| std::cmp::Reverse(b.0.precedence()));
        RouteTable {
            rules: flat
                .into_iter()
                .map(|(m, mut rule)| {
                    rule.matches = vec![m];
                    rule
                })
                .collect(),
        }
    }
}

fn base_rule(
    name: String,
    backend_refs: &[crate::resources::BackendRef],
    timeouts: Option<&crate::resources::Timeouts>,
    retry: Option<&crate::resources::Retry>,
) -> RouteRule {
    let backends = backend_refs
        .iter()
        .filter_map(|b| {
            Some(WeightedBackend {
                service: ServiceName::new(b.name.as_str()).ok()?,
                weight: u32::try_from(b.weight).ok()?,
            })
        })
        .collect::<Vec<_>>();
    let dur = |s: Option<&String>| s.and_then(|s| parse_duration(s).ok());
    RouteRule {
        request_timeout: dur(timeouts.and_then(|t| t.request.as_ref())),
        backend_timeout: dur(timeouts.and_then(|t| t.backend_request.as_ref())),
        retry: retry.map(RetryPolicy::from_spec),
        ..RouteRule::plain(name, backends)
    }
}

fn apply_filters(rule: &mut RouteRule, filters: &[HttpRouteFilter]) {
    for f in filters {
        match f.kind {
            FilterType::RequestHeaderModifier => {
                rule.request_headers = f.request_header_modifier.clone();
            }
            FilterType::ResponseHeaderModifier => {
                rule.response_headers = f.response_header_modifier.clone();
            }
            FilterType::RequestMirror => {
                rule.mirror = f.request_mirror.as_ref().and_then(|m| {
                    Some(Mirror {
                        service: ServiceName::new(m.backend_ref.name.as_str()).ok()?,
                        percent: m.percent.unwrap_or(100.0).clamp(0.0, 100.0),
                    })
                });
            }
        }
    }
}

fn convert_match(m: &HttpRouteMatch) -> RouteMatch {
    RouteMatch {
        path: m.path.as_ref().map(|p| match p.kind {
            PathMatchType::Exact => PathRule::Exact(p.value.clone()),
            _ => PathRule::Prefix(p.value.clone()),
        }),
        headers: m
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect(),
        query: m
            .query_params
            .iter()
            .map(|q| (q.name.clone(), q.value.clone()))
            .collect(),
        method: m.method.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Spec, parse_documents};

    fn table(yaml: &str) -> RouteTable {
        let rs = parse_documents(yaml).expect("valid");
        RouteTable::from_http_routes(rs.iter().filter_map(|r| match &r.spec {
            Spec::HTTPRoute(s) => Some((r.metadata.name.as_str(), s)),
            _ => None,
        }))
    }

    struct H(Vec<(&'static str, &'static str)>);
    impl Headers for H {
        fn get(&self, name: &str) -> Option<&str> {
            self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
        }
    }

    fn facts<'a>(method: &'a str, path: &'a str, headers: &'a H) -> RequestFacts<'a> {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        RequestFacts {
            method,
            path,
            query,
            headers,
        }
    }

    const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catchall}
spec:
  parentRefs: [{name: web}]
  rules:
    - backendRefs: [{name: web-v1}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api}
spec:
  parentRefs: [{name: web}]
  rules:
    - name: canary
      matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: X-Canary, value: "yes"}]}]
      backendRefs: [{name: web-v2}]
    - matches: [{path: {type: PathPrefix, value: /api}}]
      backendRefs: [{name: web-v1, weight: 80}, {name: web-v2, weight: 20}]
      timeouts: {request: 2s}
    - matches: [{path: {type: Exact, value: /api/health}, method: GET}]
      backendRefs: [{name: health}]
    - matches: [{path: {value: /search}, queryParams: [{name: beta, value: "1"}]}]
      backendRefs: [{name: search-beta}]
"#;

    #[test]
    fn most_specific_rule_wins() {
        let t = table(ROUTES);
        let none = H(vec![]);
        let canary = H(vec![("x-canary", "yes")]);
        let pick = |m, p, h: &H| {
            t.select(&facts(m, p, h))
                .map(|r| r.backends[0].service.to_string())
        };
        assert_eq!(pick("GET", "/api/health", &none).as_deref(), Some("health"));
        assert_eq!(
            pick("POST", "/api/health", &none).as_deref(),
            Some("web-v1")
        );
        assert_eq!(
            pick("GET", "/api/orders", &canary).as_deref(),
            Some("web-v2")
        );
        assert_eq!(pick("GET", "/api/orders", &none).as_deref(), Some("web-v1"));
        assert_eq!(
            pick("GET", "/apix", &none).as_deref(),
            Some("web-v1"),
            "falls to catch-all"
        );
        assert_eq!(
            pick("GET", "/search?beta=1", &none).as_deref(),
            Some("search-beta")
        );
        assert_eq!(
            t.select(&facts("GET", "/api/x", &none))
                .map(|r| r.name.as_str()),
            Some("api")
        );
        assert_eq!(
            t.select(&facts("GET", "/api/x", &canary))
                .map(|r| r.name.as_str()),
            Some("api.canary")
        );
        let split = t.select(&facts("GET", "/api/x", &none)).expect("rule");
        assert_eq!(split.request_timeout, Some(Duration::from_secs(2)));
        assert_eq!(
            split.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            vec![80, 20]
        );
    }

    #[test]
    fn grpc_routes_match_service_and_method_and_filters_carry_over() {
        let rs = parse_documents(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: inv}
spec:
  parentRefs: [{name: inventory}]
  rules:
    - matches: [{method: {service: shop.Inventory, method: Check}}]
      backendRefs: [{name: inventory-v2}]
      retry: {codes: [503], attempts: 3}
    - matches: [{method: {service: shop.Inventory}}]
      backendRefs: [{name: inventory-v1}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{name: web}]
  rules:
    - filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-env, value: canary}]}
        - type: RequestMirror
          requestMirror: {backendRef: {name: shadow}, percent: 5}
"#,
        )
        .expect("valid");
        let grpc: Vec<_> = rs
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::GRPCRoute(s) => Some((r.metadata.name.as_str(), s)),
                _ => None,
            })
            .collect();
        let t = RouteTable::from_routes([], grpc);
        let none = H(vec![]);
        let pick = |p| {
            t.select(&facts("POST", p, &none))
                .map(|r| r.backends[0].service.to_string())
        };
        assert_eq!(
            pick("/shop.Inventory/Check").as_deref(),
            Some("inventory-v2")
        );
        assert_eq!(
            pick("/shop.Inventory/List").as_deref(),
            Some("inventory-v1")
        );
        assert_eq!(pick("/other.Svc/Check"), None);
        let check = t
            .select(&facts("POST", "/shop.Inventory/Check", &none))
            .expect("rule");
        assert_eq!(check.retry.as_ref().map(|r| r.attempts), Some(3));

        let http: Vec<_> = rs
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::HTTPRoute(s) => Some((r.metadata.name.as_str(), s)),
                _ => None,
            })
            .collect();
        let t = RouteTable::from_http_routes(http);
        let rule = &t.rules[0];
        assert_eq!(
            rule.request_headers
                .as_ref()
                .map(|m| m.set[0].value.as_str()),
            Some("canary")
        );
        assert_eq!(
            rule.mirror
                .as_ref()
                .map(|m| (m.service.as_str(), m.percent)),
            Some(("shadow", 5.0))
        );
    }

    #[test]
    fn prefix_matching_is_segment_wise() {
        assert!(path_has_prefix("/api", "/api"));
        assert!(path_has_prefix("/api/", "/api"));
        assert!(path_has_prefix("/api/x", "/api/"));
        assert!(!path_has_prefix("/apix", "/api"));
        assert!(path_has_prefix("/anything", "/"));
    }

    #[test]
    fn empty_table_selects_nothing() {
        let none = H(vec![]);
        assert!(
            RouteTable::default()
                .select(&facts("GET", "/", &none))
                .is_none()
        );
    }
}

/// A proxy's own instance, as it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    pub service: ServiceName,
    pub namespace: crate::names::Namespace,
    pub instance_id: String,
    pub address: SocketAddr,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
}

impl InstanceInfo {
    pub fn endpoint(&self) -> DiscoveredEndpoint {
        DiscoveredEndpoint {
            instance_id: self.instance_id.clone(),
            address: self.address,
            namespace: self.namespace.clone(),
            zone: self.zone.clone(),
            labels: self.labels.clone(),
        }
    }
}

/// A change to what a proxy knows about one destination service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DestinationDelta {
    pub service: ServiceName,
    /// Replace everything known (first push or resync) rather than patch.
    pub reset: bool,
    /// Whether the service exists at all (a Service resource or at least one instance).
    pub exists: bool,
    pub protocol: Option<crate::resources::AppProtocol>,
    pub upserted: Vec<DiscoveredEndpoint>,
    pub removed: Vec<String>,
    /// The new route table, when it changed.
    pub routes: Option<RouteTable>,
    /// The policy for calls to the service, when it changed (always on reset).
    pub policy: Option<DestinationPolicy>,
    /// For an ExternalService: its addresses per environment (replaces endpoints); sent
    /// whenever it changed and on reset.
    pub external: Option<ExternalEndpoints>,
}

/// Where an ExternalService lives, per environment; the proxy picks by its `--env`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ExternalEndpoints {
    pub by_env: BTreeMap<String, Vec<String>>,
    pub tls: Option<crate::resources::ExternalTls>,
}
