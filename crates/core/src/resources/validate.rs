//! Value checks per kind, and conflicts across resources. Errors are `(field path, reason)`.

use std::collections::BTreeMap;

use super::spec::*;
use super::{Resource, ResourceError};
use crate::duration::parse_duration;
use crate::names::ServiceName;

type Check = Result<(), (String, String)>;

fn fail<T>(path: impl Into<String>, reason: impl Into<String>) -> Result<T, (String, String)> {
    Err((path.into(), reason.into()))
}

/// DNS subdomain (Kubernetes object names): lowercase alphanumerics, `-` and `.`, ≤ 253.
fn check_object_name(path: &str, name: &str) -> Check {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        fail(
            path,
            format!(
                "{name:?} is not a valid name (lowercase letters, digits, '-' and '.', at most 253 characters, starting and ending with a letter or digit)"
            ),
        )
    }
}

fn check_label(path: &str, name: &str) -> Check {
    ServiceName::new(name)
        .map(|_| ())
        .or_else(|e| fail(path, format!("{name:?} {e}")))
}

fn check_duration(path: &str, d: &Option<String>) -> Check {
    match d {
        None => Ok(()),
        Some(s) => match parse_duration(s) {
            Ok(d) if d.is_zero() => fail(path, "must be greater than zero"),
            Ok(_) => Ok(()),
            Err(e) => fail(path, e),
        },
    }
}

fn check_percent(path: &str, p: f64) -> Check {
    if (0.0..=100.0).contains(&p) {
        Ok(())
    } else {
        fail(path, format!("{p} is not a percentage between 0 and 100"))
    }
}

fn check_status(path: &str, s: u16) -> Check {
    if (100..=599).contains(&s) {
        Ok(())
    } else {
        fail(path, format!("{s} is not an HTTP status code"))
    }
}

fn check_header_name(path: &str, name: &str) -> Check {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.is_empty() && name.bytes().all(token) {
        Ok(())
    } else {
        fail(path, format!("{name:?} is not a valid header name"))
    }
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn check_target_ref(path: &str, t: &TargetRef) -> Check {
    if t.kind != "Service" {
        return fail(
            format!("{path}.kind"),
            format!("{:?} is not supported; use Service", t.kind),
        );
    }
    check_label(&format!("{path}.name"), &t.name)
}

fn check_backends(path: &str, refs: &[BackendRef]) -> Check {
    for (i, b) in refs.iter().enumerate() {
        let p = format!("{path}[{i}]");
        check_label(&format!("{p}.name"), &b.name)?;
        if b.weight < 0 {
            return fail(format!("{p}.weight"), format!("{} is negative", b.weight));
        }
        if b.weight > 1_000_000 {
            return fail(format!("{p}.weight"), "must be at most 1000000");
        }
    }
    if !refs.is_empty() && refs.iter().all(|b| b.weight == 0) {
        return fail(
            path,
            "all weights are zero; at least one backend must receive traffic",
        );
    }
    Ok(())
}

fn check_matches_headers(path: &str, headers: &[HeaderMatch]) -> Check {
    for (i, h) in headers.iter().enumerate() {
        check_header_name(&format!("{path}[{i}].name"), &h.name)?;
        if h.kind == ValueMatchType::RegularExpression {
            return fail(
                format!("{path}[{i}].type"),
                "RegularExpression is not supported yet; use Exact",
            );
        }
    }
    Ok(())
}

fn check_timeouts_retry(path: &str, t: &Option<Timeouts>, r: &Option<Retry>) -> Check {
    if let Some(t) = t {
        check_duration(&format!("{path}.timeouts.request"), &t.request)?;
        check_duration(
            &format!("{path}.timeouts.backendRequest"),
            &t.backend_request,
        )?;
    }
    if let Some(r) = r {
        for (i, c) in r.codes.iter().enumerate() {
            check_status(&format!("{path}.retry.codes[{i}]"), *c)?;
        }
        if let Some(a) = r.attempts
            && a > 10
        {
            return fail(format!("{path}.retry.attempts"), "must be at most 10");
        }
        check_duration(&format!("{path}.retry.backoff"), &r.backoff)?;
    }
    Ok(())
}

fn check_parent_refs(refs: &[ParentRef]) -> Check {
    if refs.is_empty() {
        return fail("spec.parentRefs", "must name at least one Service");
    }
    for (i, p) in refs.iter().enumerate() {
        if p.kind != "Service" {
            return fail(
                format!("spec.parentRefs[{i}].kind"),
                format!("{:?} is not supported; use Service", p.kind),
            );
        }
        check_label(&format!("spec.parentRefs[{i}].name"), &p.name)?;
    }
    Ok(())
}

/// Checks one resource's values.
pub fn validate(r: &Resource) -> Check {
    check_object_name("metadata.name", &r.metadata.name)?;
    check_label("metadata.namespace", &r.metadata.namespace)?;
    match &r.spec {
        Spec::Service(s) => {
            check_label("metadata.name", &r.metadata.name)?;
            let mut seen = BTreeMap::new();
            for (i, p) in s.ports.iter().enumerate() {
                if p.port == 0 {
                    return fail(format!("spec.ports[{i}].port"), "must be 1-65535");
                }
                if let Some(j) = seen.insert(p.port, i) {
                    return fail(
                        format!("spec.ports[{i}].port"),
                        format!("duplicates spec.ports[{j}]"),
                    );
                }
            }
        }
        Spec::HTTPRoute(s) => {
            check_parent_refs(&s.parent_refs)?;
            for (i, rule) in s.rules.iter().enumerate() {
                let p = format!("spec.rules[{i}]");
                for (j, m) in rule.matches.iter().enumerate() {
                    let mp = format!("{p}.matches[{j}]");
                    if let Some(path) = &m.path {
                        if path.kind == PathMatchType::RegularExpression {
                            return fail(
                                format!("{mp}.path.type"),
                                "RegularExpression is not supported yet; use Exact or PathPrefix",
                            );
                        }
                        if !path.value.starts_with('/') {
                            return fail(
                                format!("{mp}.path.value"),
                                format!("{:?} must start with '/'", path.value),
                            );
                        }
                    }
                    for (k, q) in m.query_params.iter().enumerate() {
                        if q.kind == ValueMatchType::RegularExpression {
                            return fail(
                                format!("{mp}.queryParams[{k}].type"),
                                "RegularExpression is not supported yet; use Exact",
                            );
                        }
                    }
                    check_matches_headers(&format!("{mp}.headers"), &m.headers)?;
                    if let Some(method) = &m.method
                        && !METHODS.contains(&method.as_str())
                    {
                        return fail(
                            format!("{mp}.method"),
                            format!("{method:?} is not one of {}", METHODS.join(", ")),
                        );
                    }
                }
                check_backends(&format!("{p}.backendRefs"), &rule.backend_refs)?;
                for (j, f) in rule.filters.iter().enumerate() {
                    let fp = format!("{p}.filters[{j}]");
                    let present = match f.kind {
                        FilterType::RequestHeaderModifier => f.request_header_modifier.is_some(),
                        FilterType::ResponseHeaderModifier => f.response_header_modifier.is_some(),
                        FilterType::RequestMirror => f.request_mirror.is_some(),
                    };
                    if !present {
                        return fail(&fp, format!("type {:?} needs its matching field", f.kind));
                    }
                    if let Some(m) = &f.request_mirror {
                        check_label(
                            &format!("{fp}.requestMirror.backendRef.name"),
                            &m.backend_ref.name,
                        )?;
                        if let Some(pct) = m.percent {
                            check_percent(&format!("{fp}.requestMirror.percent"), pct)?;
                        }
                    }
                    for m in [&f.request_header_modifier, &f.response_header_modifier]
                        .into_iter()
                        .flatten()
                    {
                        for (k, h) in m.set.iter().chain(&m.add).enumerate() {
                            check_header_name(&format!("{fp}.headers[{k}].name"), &h.name)?;
                        }
                    }
                }
                check_timeouts_retry(&p, &rule.timeouts, &rule.retry)?;
            }
        }
        Spec::GRPCRoute(s) => {
            check_parent_refs(&s.parent_refs)?;
            for (i, rule) in s.rules.iter().enumerate() {
                let p = format!("spec.rules[{i}]");
                for (j, m) in rule.matches.iter().enumerate() {
                    check_matches_headers(&format!("{p}.matches[{j}].headers"), &m.headers)?;
                }
                check_backends(&format!("{p}.backendRefs"), &rule.backend_refs)?;
                check_timeouts_retry(&p, &rule.timeouts, &rule.retry)?;
            }
        }
        Spec::DestinationPolicy(s) => {
            check_target_ref("spec.targetRef", &s.target_ref)?;
            if let Some(cb) = &s.circuit_breaker {
                check_duration(
                    "spec.circuitBreaker.baseEjectionTime",
                    &cb.base_ejection_time,
                )?;
                check_duration("spec.circuitBreaker.maxEjectionTime", &cb.max_ejection_time)?;
                if let Some(p) = cb.max_ejected_percent {
                    check_percent("spec.circuitBreaker.maxEjectedPercent", f64::from(p))?;
                }
                if cb.consecutive_failures == Some(0) {
                    return fail(
                        "spec.circuitBreaker.consecutiveFailures",
                        "must be at least 1",
                    );
                }
            }
            if let Some(b) = &s.retry_budget
                && !(0.0..=1.0).contains(&b.ratio)
            {
                return fail(
                    "spec.retryBudget.ratio",
                    format!("{} is not between 0 and 1", b.ratio),
                );
            }
            if let Some(h) = &s.health_check {
                if !h.path.starts_with('/') {
                    return fail("spec.healthCheck.path", "must start with '/'");
                }
                check_duration("spec.healthCheck.interval", &h.interval)?;
            }
        }
        Spec::AuthorizationPolicy(s) => {
            check_target_ref("spec.targetRef", &s.target_ref)?;
            for (i, rule) in s.rules.iter().enumerate() {
                for (j, from) in rule.from.iter().enumerate() {
                    for (k, svc) in from.services.iter().enumerate() {
                        check_label(&format!("spec.rules[{i}].from[{j}].services[{k}]"), svc)?;
                    }
                    for (k, id) in from.identities.iter().enumerate() {
                        if !id.starts_with("spiffe://") {
                            return fail(
                                format!("spec.rules[{i}].from[{j}].identities[{k}]"),
                                "must be a spiffe:// ID",
                            );
                        }
                    }
                }
                for (j, to) in rule.to.iter().enumerate() {
                    for (k, path) in to.paths.iter().enumerate() {
                        if !path.starts_with('/') {
                            return fail(
                                format!("spec.rules[{i}].to[{j}].paths[{k}]"),
                                "must start with '/'",
                            );
                        }
                    }
                    for (k, m) in to.methods.iter().enumerate() {
                        if !METHODS.contains(&m.as_str()) {
                            return fail(
                                format!("spec.rules[{i}].to[{j}].methods[{k}]"),
                                format!("{m:?} is not an HTTP method"),
                            );
                        }
                    }
                }
            }
        }
        Spec::RateLimitPolicy(s) => {
            check_target_ref("spec.targetRef", &s.target_ref)?;
            if !(s.requests_per_second > 0.0 && s.requests_per_second.is_finite()) {
                return fail("spec.requestsPerSecond", "must be greater than zero");
            }
            if let Some(pc) = &s.per_caller
                && !(pc.requests_per_second > 0.0 && pc.requests_per_second.is_finite())
            {
                return fail(
                    "spec.perCaller.requestsPerSecond",
                    "must be greater than zero",
                );
            }
        }
        Spec::FaultInjection(s) => {
            check_target_ref("spec.targetRef", &s.target_ref)?;
            if s.delay.is_none() && s.abort.is_none() {
                return fail("spec", "needs a delay, an abort, or both");
            }
            if let Some(d) = &s.delay {
                check_duration("spec.delay.duration", &Some(d.duration.clone()))?;
                check_percent("spec.delay.percent", d.percent)?;
            }
            if let Some(a) = &s.abort {
                check_status("spec.abort.status", a.status)?;
                check_percent("spec.abort.percent", a.percent)?;
            }
        }
        Spec::ExternalService(s) => {
            check_label("metadata.name", &r.metadata.name)?;
            if s.endpoints.is_empty() {
                return fail(
                    "spec.endpoints",
                    "needs at least one environment (dev, staging, prod)",
                );
            }
            for (env, addrs) in &s.endpoints {
                check_label(&format!("spec.endpoints.{env}"), env)?;
                for (i, a) in addrs.iter().enumerate() {
                    let ok = a.rsplit_once(':').is_some_and(|(host, port)| {
                        !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
                    });
                    if !ok {
                        return fail(
                            format!("spec.endpoints.{env}[{i}]"),
                            format!("{a:?} is not host:port"),
                        );
                    }
                }
            }
            if let Some(tls) = &s.tls
                && let Some(pem) = &tls.ca_bundle
                && !pem.contains("-----BEGIN CERTIFICATE-----")
            {
                return fail("spec.tls.caBundle", "is not a PEM certificate bundle");
            }
        }
        Spec::MeshConfig(s) => {
            if let Some(t) = &s.tracing
                && !(0.0..=1.0).contains(&t.sampling)
            {
                return fail(
                    "spec.tracing.sampling",
                    format!("{} is not between 0 and 1", t.sampling),
                );
            }
            if let Some(endpoint) = s.tracing.as_ref().and_then(|t| t.otlp_endpoint.as_ref())
                && !endpoint.starts_with("http://")
            {
                // Export is plaintext: point at a collector or agent on the node.
                return fail(
                    "spec.tracing.otlpEndpoint",
                    format!("{endpoint:?} is not an http:// URL (TLS export is not supported)"),
                );
            }
            for (i, name) in s.access_log_services.iter().enumerate() {
                if let Err(e) = crate::names::ServiceName::new(name.as_str()) {
                    return fail(format!("spec.accessLogServices[{i}]"), e.to_string());
                }
            }
            if let Some(m) = &s.metrics {
                for (field, value) in [
                    ("maxRoutesPerService", m.max_routes_per_service),
                    ("maxPaths", m.max_paths),
                ] {
                    if let Some(v) = value
                        && !(1..=10_000).contains(&v)
                    {
                        return fail(
                            format!("spec.metrics.{field}"),
                            format!("{v} is not between 1 and 10000"),
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn canonical<M: serde::Serialize>(m: &M) -> String {
    serde_json::to_string(m).unwrap_or_default()
}

/// What a route claims on each parent: one `(claim key, description)` per parent and match.
fn route_claims(
    protocol: &str,
    namespace: &str,
    parents: &[ParentRef],
    matches: Vec<String>,
) -> Vec<(String, String)> {
    let mut keys = Vec::new();
    for p in parents {
        let parent = format!(
            "{}/{}:{:?}",
            p.namespace.as_deref().unwrap_or(namespace),
            p.name,
            p.port
        );
        for m in &matches {
            keys.push((
                format!("{protocol} {parent} {m}"),
                format!("both match {m} on Service {}", p.name),
            ));
        }
    }
    keys
}

/// Checks a complete set of resources (the store as it would be after an apply) for
/// conflicts: two routes claiming the same match on the same Service, two DestinationPolicies
/// for one Service, more than one MeshConfig.
pub fn check_conflicts(all: &[Resource]) -> Result<(), ResourceError> {
    let conflict = |a: &Resource, b: &Resource, what: String| ResourceError {
        document: 0,
        resource: Some(format!("{}/{}", a.kind, a.metadata.name)),
        path: "spec".into(),
        reason: format!(
            "conflicts with {}/{}/{}: {what}",
            b.kind, b.metadata.namespace, b.metadata.name
        ),
    };
    let mut claims: BTreeMap<String, &Resource> = BTreeMap::new();
    let mut mesh_config: Option<&Resource> = None;
    for r in all {
        let ns = &r.metadata.namespace;
        let keys: Vec<(String, String)> = match &r.spec {
            Spec::HTTPRoute(s) => {
                let catch_all = HttpRouteMatch {
                    path: Some(PathMatch {
                        kind: PathMatchType::PathPrefix,
                        value: "/".into(),
                    }),
                    headers: vec![],
                    query_params: vec![],
                    method: None,
                };
                let matches = s.rules.iter().flat_map(|rule| {
                    if rule.matches.is_empty() {
                        vec![canonical(&catch_all)]
                    } else {
                        rule.matches.iter().map(canonical).collect()
                    }
                });
                route_claims("http", ns, &s.parent_refs, matches.collect())
            }
            Spec::GRPCRoute(s) => {
                let matches = s
                    .rules
                    .iter()
                    .flat_map(|rule| rule.matches.iter().map(canonical));
                route_claims("grpc", ns, &s.parent_refs, matches.collect())
            }
            Spec::DestinationPolicy(s) => {
                let target = format!(
                    "{}/{}",
                    s.target_ref.namespace.as_deref().unwrap_or(ns),
                    s.target_ref.name
                );
                vec![(
                    format!("destpolicy {target}"),
                    format!("both configure calls to Service {}", s.target_ref.name),
                )]
            }
            Spec::MeshConfig(_) => {
                if let Some(other) = mesh_config
                    && other.key() != r.key()
                {
                    return Err(conflict(
                        r,
                        other,
                        "a mesh has exactly one MeshConfig".into(),
                    ));
                }
                mesh_config = Some(r);
                vec![]
            }
            _ => vec![],
        };
        let mut own = std::collections::BTreeSet::new();
        for (key, what) in keys {
            if !own.insert(key.clone()) {
                continue;
            }
            match claims.get(&key) {
                Some(other) if other.key() != r.key() => return Err(conflict(r, other, what)),
                _ => {
                    claims.insert(key, r);
                }
            }
        }
    }
    Ok(())
}

/// A route's parents and, per rule, its backends, as `(field path, service)`.
fn route_references<'a>(
    parents: &'a [ParentRef],
    rule_backends: impl Iterator<Item = &'a [BackendRef]>,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = parents
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("spec.parentRefs[{i}].name"), p.name.clone()))
        .collect();
    for (i, backends) in rule_backends.enumerate() {
        for (j, b) in backends.iter().enumerate() {
            out.push((
                format!("spec.rules[{i}].backendRefs[{j}].name"),
                b.name.clone(),
            ));
        }
    }
    out
}

/// Kinds whose spec refers to other services, for "unknown service" warnings.
pub fn referenced_services(r: &Resource) -> Vec<(String, String)> {
    let mut out = Vec::new();
    match &r.spec {
        Spec::HTTPRoute(s) => {
            out = route_references(&s.parent_refs, s.rules.iter().map(|r| &r.backend_refs[..]))
        }
        Spec::GRPCRoute(s) => {
            out = route_references(&s.parent_refs, s.rules.iter().map(|r| &r.backend_refs[..]))
        }
        Spec::DestinationPolicy(s) => {
            out.push(("spec.targetRef.name".into(), s.target_ref.name.clone()))
        }
        Spec::AuthorizationPolicy(s) => {
            out.push(("spec.targetRef.name".into(), s.target_ref.name.clone()))
        }
        Spec::RateLimitPolicy(s) => {
            out.push(("spec.targetRef.name".into(), s.target_ref.name.clone()))
        }
        Spec::FaultInjection(s) => {
            out.push(("spec.targetRef.name".into(), s.target_ref.name.clone()))
        }
        _ => {}
    }
    out
}
