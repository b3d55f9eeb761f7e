//! Inbound rate limits (RateLimitPolicy): token buckets per policy, optionally per route, and
//! optionally one bucket per calling identity. A refused request gets 429 with `retry-after`
//! and `x-trellis-error: rate-limited` and never reaches the app. Limits apply per proxy
//! (each instance enforces its share), as in Envoy's local rate limit.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::time::Instant;
use tower::{Layer, Service};
use trellis_core::policy::{InboundRateLimit, RateLimit};

use super::authz::PeerIdentity;
use super::{HttpRequest, HttpResponse};
use crate::error::ProxyError;
use crate::identity::InboundPolicyCell;
use crate::metrics::{Label, Metrics, RateLimitLabels};

/// Most per-caller buckets kept per policy; beyond it, full (idle) buckets are forgotten.
const MAX_CALLER_BUCKETS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(limit: &RateLimit, now: Instant) -> Self {
        Self {
            tokens: f64::from(limit.burst),
            at: now,
        }
    }

    fn refill(&mut self, limit: &RateLimit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * limit.requests_per_second).min(f64::from(limit.burst));
        self.at = now;
    }

    /// Takes a token, or says how many whole seconds until one is there.
    fn take(&mut self, limit: &RateLimit, now: Instant) -> Result<(), u64> {
        self.refill(limit, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - self.tokens) / limit.requests_per_second)
                .ceil()
                .max(1.0) as u64)
        }
    }
}

#[derive(Debug)]
struct PolicyBuckets {
    config: InboundRateLimit,
    total: Bucket,
    callers: HashMap<Arc<str>, Bucket>,
}

/// Bucket state, keyed by policy name; rebuilt for a policy when its config changes.
#[derive(Debug, Default)]
pub struct RateLimiters {
    by_policy: Mutex<HashMap<String, PolicyBuckets>>,
}

impl RateLimiters {
    /// Checks `policies` that apply to a request on `route` from `caller`: `Err((policy,
    /// retry after seconds))` when one refuses. A request refused by one bucket takes no
    /// token from the others.
    fn check(
        &self,
        policies: &[InboundRateLimit],
        route: Option<&str>,
        caller: Option<&str>,
        now: Instant,
    ) -> Result<(), (String, u64, &'static str)> {
        let mut map = self.by_policy.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|name, _| policies.iter().any(|p| &p.name == name));
        let applicable = policies
            .iter()
            .filter(|p| p.route.is_none() || p.route.as_deref() == route);
        let mut taken: Vec<&InboundRateLimit> = Vec::new();
        for p in applicable {
            let entry = map.entry(p.name.clone()).or_insert_with(|| PolicyBuckets {
                config: p.clone(),
                total: Bucket::full(&p.total, now),
                callers: HashMap::new(),
            });
            if entry.config != *p {
                *entry = PolicyBuckets {
                    config: p.clone(),
                    total: Bucket::full(&p.total, now),
                    callers: HashMap::new(),
                };
            }
            let mut refused = None;
            if let (Some(limit), Some(caller)) = (&p.per_caller, caller) {
                if entry.callers.len() >= MAX_CALLER_BUCKETS && !entry.callers.contains_key(caller)
                {
                    entry.callers.retain(|_, b| {
                        b.refill(limit, now);
                        b.tokens < f64::from(limit.burst)
                    });
                }
                let bucket = entry
                    .callers
                    .entry(Arc::from(caller))
                    .or_insert_with(|| Bucket::full(limit, now));
                if let Err(wait) = bucket.take(limit, now) {
                    refused = Some((wait, "caller"));
                }
            }
            if refused.is_none()
                && let Err(wait) = entry.total.take(&p.total, now)
            {
                refused = Some((wait, "total"));
                // Give back this policy's caller token: the request is refused anyway.
                if let (Some(caller), Some(_)) = (caller, &p.per_caller)
                    && let Some(b) = entry.callers.get_mut(caller)
                {
                    b.tokens += 1.0;
                }
            }
            if let Some((wait, scope)) = refused {
                // Refund the policies that already granted a token.
                for earlier in taken {
                    if let Some(e) = map.get_mut(&earlier.name) {
                        e.total.tokens += 1.0;
                        if let (Some(caller), Some(_)) = (caller, &earlier.per_caller)
                            && let Some(b) = e.callers.get_mut(caller)
                        {
                            b.tokens += 1.0;
                        }
                    }
                }
                return Err((p.name.clone(), wait, scope));
            }
            taken.push(p);
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct RateLimitLayer {
    policy: Arc<InboundPolicyCell>,
    limiters: Arc<RateLimiters>,
    metrics: Metrics,
}

impl RateLimitLayer {
    pub fn new(policy: Arc<InboundPolicyCell>, metrics: Metrics) -> Self {
        Self {
            policy,
            limiters: Arc::default(),
            metrics,
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;
    fn layer(&self, inner: S) -> RateLimited<S> {
        RateLimited {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimited<S> {
    inner: S,
    layer: RateLimitLayer,
}

impl<S> Service<HttpRequest> for RateLimited<S>
where
    S: Service<HttpRequest, Response = HttpResponse, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, ProxyError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let policy = self.layer.policy.current();
        if policy.rate_limits.is_empty() {
            return Box::pin(self.inner.call(req));
        }
        let route = policy
            .rate_limits
            .iter()
            .any(|l| l.route.is_some())
            .then(|| policy.route_of(&req))
            .flatten();
        let caller = req
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.0.as_ref().map(|p| p.id.to_string()));
        match self.layer.limiters.check(
            &policy.rate_limits,
            route,
            caller.as_deref(),
            Instant::now(),
        ) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err((name, retry_after_secs, scope)) => {
                self.layer
                    .metrics
                    .rate_limited
                    .get_or_create(&RateLimitLabels {
                        policy: Label::from(name.as_str()),
                        scope,
                    })
                    .inc();
                Box::pin(std::future::ready(Err(ProxyError::RateLimited {
                    policy: name,
                    retry_after_secs,
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limit(name: &str, rps: f64, burst: u32, per_caller: Option<(f64, u32)>) -> InboundRateLimit {
        InboundRateLimit {
            name: name.into(),
            route: None,
            total: RateLimit {
                requests_per_second: rps,
                burst,
            },
            per_caller: per_caller.map(|(rps, burst)| RateLimit {
                requests_per_second: rps,
                burst,
            }),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn steady_rate_passes_and_excess_is_refused_with_a_wait() {
        let l = RateLimiters::default();
        let policies = vec![limit("shop/orders", 100.0, 100, None)];
        let now = Instant::now();
        let granted = (0..150)
            .filter(|_| l.check(&policies, None, None, now).is_ok())
            .count();
        assert_eq!(granted, 100, "the burst");
        let (name, wait, scope) = l.check(&policies, None, None, now).expect_err("refused");
        assert_eq!((name.as_str(), wait, scope), ("shop/orders", 1, "total"));
        // One second later, one second's worth.
        let later = now + Duration::from_secs(1);
        let granted = (0..150)
            .filter(|_| l.check(&policies, None, None, later).is_ok())
            .count();
        assert_eq!(granted, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn per_caller_buckets_are_separate_and_route_scope_applies() {
        let l = RateLimiters::default();
        let policies = vec![limit("shop/api", 1000.0, 1000, Some((2.0, 2)))];
        let now = Instant::now();
        let a = (0..5)
            .filter(|_| l.check(&policies, None, Some("spiffe://a"), now).is_ok())
            .count();
        let b = (0..5)
            .filter(|_| l.check(&policies, None, Some("spiffe://b"), now).is_ok())
            .count();
        assert_eq!((a, b), (2, 2));
        let scoped = vec![InboundRateLimit {
            route: Some("orders.write".into()),
            ..limit("shop/writes", 1.0, 1, None)
        }];
        for _ in 0..5 {
            assert!(l.check(&scoped, Some("orders.read"), None, now).is_ok());
        }
        assert!(l.check(&scoped, Some("orders.write"), None, now).is_ok());
        assert!(l.check(&scoped, Some("orders.write"), None, now).is_err());
    }
}
