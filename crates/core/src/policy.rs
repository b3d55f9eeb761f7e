//! Resolved resilience policy: what a proxy applies to calls to one destination service and to
//! one route. Built by the control plane from DestinationPolicy, FaultInjection and route
//! resources with every default filled in, so the proxy never guesses and `trellis explain`
//! prints exactly what is in force.

use std::time::Duration;

use serde::Serialize;

use crate::duration::parse_duration;
use crate::resources::{
    DestinationPolicySpec, FaultInjectionSpec, LoadBalancer, RateLimitPolicySpec, Retry,
};

/// Default consecutive failures (connect errors, 5xx) before an endpoint is ejected.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// Default first ejection; doubles with each repeated ejection up to the maximum.
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
/// At most this share of a destination's endpoints is ever ejected at once.
pub const DEFAULT_MAX_EJECTED_PERCENT: u32 = 50;
/// Retry budget: retries may add this fraction of the request rate ...
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
/// ... plus this many retries per second, so low-traffic callers can still retry.
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
/// Default wait before the first retry (doubles per attempt, full jitter).
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);
/// Retry backoff never grows past this.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Request bodies up to this size are kept for replay; larger requests are never retried.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;
/// Default active health-check interval and failures before an endpoint counts unhealthy.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;

/// Passive health: ejection of endpoints that keep failing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
            max_ejected_percent: DEFAULT_MAX_EJECTED_PERCENT,
        }
    }
}

/// Per-destination admission limits; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConcurrencyLimits {
    pub max_concurrent: Option<u32>,
    /// Requests allowed to wait for a slot once `max_concurrent` are in flight (default 0:
    /// fail at once rather than queue).
    pub max_pending: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    pub ratio: f64,
    pub min_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: DEFAULT_BUDGET_RATIO,
            min_per_second: DEFAULT_BUDGET_MIN_PER_SECOND,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ActiveHealthCheck {
    pub path: String,
    pub interval: Duration,
    pub unhealthy_threshold: u32,
}

/// Faults injected into calls to a destination (resilience testing).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultPolicy {
    /// `(delay, percent of requests)`.
    pub delay: Option<(Duration, f64)>,
    /// `(status, percent of requests)`.
    pub abort: Option<(u16, f64)>,
}

/// Everything a proxy applies to calls to one destination service.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationPolicy {
    pub load_balancer: LoadBalancer,
    pub outlier: OutlierDetection,
    pub limits: ConcurrencyLimits,
    pub retry_budget: RetryBudget,
    pub health_check: Option<ActiveHealthCheck>,
    /// Prefer endpoints in the caller's zone, spilling over as they become unhealthy.
    pub locality_failover: bool,
    pub fault: Option<FaultPolicy>,
}

impl Default for DestinationPolicy {
    fn default() -> Self {
        Self {
            load_balancer: LoadBalancer::P2cEwma,
            outlier: OutlierDetection::default(),
            limits: ConcurrencyLimits::default(),
            retry_budget: RetryBudget::default(),
            health_check: None,
            locality_failover: true,
            fault: None,
        }
    }
}

fn duration_or(s: Option<&String>, default: Duration) -> Duration {
    s.and_then(|s| parse_duration(s).ok()).unwrap_or(default)
}

impl DestinationPolicy {
    /// Resolves the (validated) resources that target one service into the policy in force.
    pub fn resolve(
        spec: Option<&DestinationPolicySpec>,
        fault: Option<&FaultInjectionSpec>,
    ) -> Self {
        let mut p = Self::default();
        if let Some(s) = spec {
            p.load_balancer = s.load_balancer.unwrap_or_default();
            if let Some(cb) = &s.circuit_breaker {
                p.outlier = OutlierDetection {
                    consecutive_failures: cb
                        .consecutive_failures
                        .unwrap_or(DEFAULT_CONSECUTIVE_FAILURES)
                        .max(1),
                    base_ejection: duration_or(
                        cb.base_ejection_time.as_ref(),
                        DEFAULT_BASE_EJECTION,
                    ),
                    max_ejection: duration_or(cb.max_ejection_time.as_ref(), DEFAULT_MAX_EJECTION),
                    max_ejected_percent: cb
                        .max_ejected_percent
                        .unwrap_or(DEFAULT_MAX_EJECTED_PERCENT)
                        .min(100),
                };
            }
            if let Some(l) = &s.limits {
                p.limits = ConcurrencyLimits {
                    max_concurrent: l.max_concurrent_requests,
                    max_pending: l.max_pending_requests.unwrap_or(0),
                };
            }
            if let Some(b) = &s.retry_budget {
                p.retry_budget = RetryBudget {
                    ratio: b.ratio.clamp(0.0, 1.0),
                    min_per_second: b.min_per_second.unwrap_or(DEFAULT_BUDGET_MIN_PER_SECOND),
                };
            }
            p.health_check = s.health_check.as_ref().map(|h| ActiveHealthCheck {
                path: h.path.clone(),
                interval: duration_or(h.interval.as_ref(), DEFAULT_HEALTH_INTERVAL),
                unhealthy_threshold: h
                    .unhealthy_threshold
                    .unwrap_or(DEFAULT_UNHEALTHY_THRESHOLD)
                    .max(1),
            });
            if let Some(l) = &s.locality {
                p.locality_failover = l.failover;
            }
        }
        p.fault = fault.map(|f| FaultPolicy {
            delay: f.delay.as_ref().and_then(|d| {
                parse_duration(&d.duration)
                    .ok()
                    .map(|t| (t, d.percent.clamp(0.0, 100.0)))
            }),
            abort: f
                .abort
                .as_ref()
                .map(|a| (a.status, a.percent.clamp(0.0, 100.0))),
        });
        p
    }
}

/// When and how often a route's requests are retried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Response statuses that are retried (connection failures always are).
    pub codes: Vec<u16>,
    /// Retries after the first try.
    pub attempts: u32,
    pub backoff: Duration,
    /// Retry POST, PATCH and other non-idempotent methods too (the route opted in).
    pub non_idempotent: bool,
}

impl RetryPolicy {
    /// From a route's (validated) `retry`.
    pub fn from_spec(r: &Retry) -> Self {
        Self {
            codes: r.codes.clone(),
            attempts: r.attempts.unwrap_or(2),
            backoff: duration_or(r.backoff.as_ref(), DEFAULT_RETRY_BACKOFF),
            non_idempotent: r.non_idempotent,
        }
    }

    /// Whether a response status asks for another try.
    pub fn retries_status(&self, status: u16) -> bool {
        self.codes.contains(&status)
    }
}

/// Methods that may be sent twice without changing the outcome (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// A token bucket's shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    pub requests_per_second: f64,
    /// Requests allowed at once above the steady rate (at least 1).
    pub burst: u32,
}

/// An inbound rate limit of the proxy's own service.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundRateLimit {
    /// `<namespace>/<name>` of the RateLimitPolicy (metrics and errors name it).
    pub name: String,
    /// Only requests on this route (rule name as in the route table), if set.
    pub route: Option<String>,
    pub total: RateLimit,
    /// A bucket per calling identity, if set.
    pub per_caller: Option<RateLimit>,
}

impl InboundRateLimit {
    pub fn from_spec(namespace: &str, name: &str, s: &RateLimitPolicySpec) -> Self {
        // A burst of at least one second's worth, so a steady rate is never refused.
        let burst = |rps: f64, b: Option<u32>| b.unwrap_or_else(|| rps.ceil() as u32).max(1);
        Self {
            name: format!("{namespace}/{name}"),
            route: s.target_ref.route.clone(),
            total: RateLimit {
                requests_per_second: s.requests_per_second,
                burst: burst(s.requests_per_second, s.burst),
            },
            per_caller: s.per_caller.as_ref().map(|p| RateLimit {
                requests_per_second: p.requests_per_second,
                burst: burst(p.requests_per_second, p.burst),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Spec, parse_documents};

    #[test]
    fn unset_fields_take_documented_defaults() {
        let docs = parse_documents(
            r#"
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: orders}
spec:
  targetRef: {name: orders}
  loadBalancer: least-request
  circuitBreaker: {consecutiveFailures: 3, baseEjectionTime: 2s}
  limits: {maxConcurrentRequests: 10}
---
apiVersion: trellis.dev/v1alpha1
kind: FaultInjection
metadata: {name: chaos}
spec:
  targetRef: {name: orders}
  abort: {status: 503, percent: 50}
"#,
        )
        .expect("valid");
        let (Spec::DestinationPolicy(d), Spec::FaultInjection(f)) = (&docs[0].spec, &docs[1].spec)
        else {
            panic!("kinds")
        };
        let p = DestinationPolicy::resolve(Some(d), Some(f));
        assert_eq!(p.load_balancer, LoadBalancer::LeastRequest);
        assert_eq!(p.outlier.consecutive_failures, 3);
        assert_eq!(p.outlier.base_ejection, Duration::from_secs(2));
        assert_eq!(p.outlier.max_ejection, DEFAULT_MAX_EJECTION);
        assert_eq!(p.limits.max_concurrent, Some(10));
        assert_eq!(p.limits.max_pending, 0);
        assert_eq!(p.retry_budget, RetryBudget::default());
        assert!(p.locality_failover);
        assert_eq!(p.fault.and_then(|f| f.abort), Some((503, 50.0)));
        assert_eq!(
            DestinationPolicy::resolve(None, None),
            DestinationPolicy::default()
        );
    }

    #[test]
    fn route_retry_defaults_and_idempotence() {
        let r = RetryPolicy::from_spec(&Retry {
            codes: vec![503],
            attempts: None,
            backoff: None,
            non_idempotent: false,
        });
        assert_eq!(r.attempts, 2);
        assert_eq!(r.backoff, DEFAULT_RETRY_BACKOFF);
        assert!(r.retries_status(503) && !r.retries_status(500));
        assert!(is_idempotent("GET") && is_idempotent("PUT") && !is_idempotent("POST"));
    }
}
