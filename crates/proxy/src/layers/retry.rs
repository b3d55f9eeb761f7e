//! Retries: a failed try is sent again (to an endpoint the balancer picks afresh, so usually
//! another one) when
//! - the request never reached an endpoint (connection refused or timed out): always, once,
//!   whatever the method;
//! - the route's `retry` lists the response status, or the try failed in transit or hit the
//!   per-try timeout: only for idempotent methods unless the route sets `nonIdempotent`.
//!
//! Every retry must fit the destination's retry budget (by default 20% of its requests plus
//! 10 per second, over a 10 s window), so retries cannot multiply the load on a service that
//! is already failing. Bodies up to 64 KiB are kept for replay ([`ReplayBody`]); a larger
//! body is never retried. Retried requests carry `x-trellis-retry-attempt: N`; the backoff
//! between tries doubles from the route's `backoff`, with full jitter.

use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request};
use serde::Serialize;
use tokio::time::Instant;
use tower::{Layer, Service};
use trellis_core::policy::{self, MAX_REPLAY_BODY, MAX_RETRY_BACKOFF, RetryPolicy};

use super::{HttpRequest, HttpResponse, MaybeBoxed, ResponseFuture};
use crate::body;
use crate::error::ProxyError;
use crate::http::RequestMeta;
use crate::http::destinations::random_below;
use crate::http::outbound::{AnsweredBy, AvoidEndpoint, SelectedRoute, backend_of};
use crate::http::replay::ReplayBody;
use crate::metrics::{Label, Metrics, RetryLabels};

/// Header on retried requests: which retry this is (1, 2, ...).
pub const RETRY_ATTEMPT: &str = "x-trellis-retry-attempt";

/// The budget's window, in one-second buckets.
const WINDOW_SECS: usize = 10;

/// Retries allowed per destination: `ratio × requests + minPerSecond × window` over the last
/// ten seconds.
#[derive(Debug)]
pub struct RetryBudget {
    state: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    ratio: f64,
    min_per_second: u32,
    origin: Instant,
    /// `(second, requests, retries)` per slot, slot = second % window.
    buckets: [(u64, u32, u32); WINDOW_SECS],
}

/// `/config` view of a budget.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetView {
    pub requests_10s: u32,
    pub retries_10s: u32,
    pub allowed_10s: u32,
}

impl BudgetState {
    fn slot(&mut self, now: Instant) -> &mut (u64, u32, u32) {
        let second = now.saturating_duration_since(self.origin).as_secs();
        let slot = &mut self.buckets[(second % WINDOW_SECS as u64) as usize];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot
    }

    fn totals(&self, now: Instant) -> (u32, u32) {
        let second = now.saturating_duration_since(self.origin).as_secs();
        self.buckets
            .iter()
            .filter(|b| second.saturating_sub(b.0) < WINDOW_SECS as u64 && b.0 <= second)
            .fold((0, 0), |(r, t), b| (r + b.1, t + b.2))
    }

    fn allowed(&self, requests: u32) -> u32 {
        (self.ratio * f64::from(requests)) as u32 + self.min_per_second * WINDOW_SECS as u32
    }
}

impl RetryBudget {
    pub fn new(config: &policy::RetryBudget) -> Self {
        Self {
            state: Mutex::new(BudgetState {
                ratio: config.ratio,
                min_per_second: config.min_per_second,
                origin: Instant::now(),
                buckets: [(u64::MAX, 0, 0); WINDOW_SECS],
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn reconfigure(&self, config: &policy::RetryBudget) {
        let mut s = self.lock();
        s.ratio = config.ratio;
        s.min_per_second = config.min_per_second;
    }

    /// Counts an original request.
    pub fn deposit(&self) {
        self.lock().slot(Instant::now()).1 += 1;
    }

    /// Takes one retry from the budget, if any is left.
    pub fn withdraw(&self) -> bool {
        let now = Instant::now();
        let mut s = self.lock();
        let (requests, retries) = s.totals(now);
        if retries >= s.allowed(requests) {
            return false;
        }
        s.slot(now).2 += 1;
        true
    }

    pub fn view(&self) -> BudgetView {
        let s = self.lock();
        let (requests, retries) = s.totals(Instant::now());
        BudgetView {
            requests_10s: requests,
            retries_10s: retries,
            allowed_10s: s.allowed(requests),
        }
    }
}

#[derive(Clone)]
pub struct RetryLayer {
    metrics: Metrics,
}

impl RetryLayer {
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    metrics: Metrics,
}

/// Why a try is worth repeating, if it is.
fn retry_reason(
    result: &Result<HttpResponse, ProxyError>,
    policy: &RetryPolicy,
    idempotent: bool,
) -> Option<&'static str> {
    match result {
        Err(e) if e.never_sent() => Some("connect-failed"),
        _ if !idempotent => None,
        Ok(rsp) if policy.retries_status(rsp.status().as_u16()) => Some("status"),
        Ok(_) => None,
        // In transit or per-try timeout: only when the route asked for retries.
        Err(ProxyError::Upstream(_)) if !policy.codes.is_empty() => Some("upstream-failed"),
        Err(ProxyError::Timeout(_)) if !policy.codes.is_empty() => Some("timeout"),
        Err(_) => None,
    }
}

/// Full jitter over `base × 2^(retry-1)`, capped.
fn backoff(base: Duration, retry: u32) -> Duration {
    if base.is_zero() {
        return Duration::ZERO;
    }
    let ceiling = base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
        .min(MAX_RETRY_BACKOFF);
    let micros = ceiling.as_micros().max(1) as u64;
    Duration::from_micros(random_below(micros + 1))
}

impl<S> Service<HttpRequest> for Retry<S>
where
    S: Service<HttpRequest, Response = HttpResponse, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = ProxyError;
    type Future = MaybeBoxed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let Some(dest) = backend_of(&req) else {
            return MaybeBoxed::direct(self.inner.call(req));
        };
        dest.retry_budget.deposit();
        // Without a route `retry`, nothing is copied: a request that never reached an
        // endpoint is re-picked inside `Forward`, which still holds it.
        let policy = req
            .extensions()
            .get::<SelectedRoute>()
            .and_then(|r| r.0.retry.clone());
        let too_large = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|n| n > MAX_REPLAY_BODY);
        let tunnel =
            req.method() == http::Method::CONNECT || crate::http::headers::is_upgrade(&req);
        let (Some(policy), false, false) = (policy, too_large, tunnel) else {
            return MaybeBoxed::direct(self.inner.call(req));
        };
        let dest = dest.clone();
        let mut inner = self.inner.clone();
        let metrics = self.metrics.clone();
        MaybeBoxed::boxed(async move {
            let idempotent = policy::is_idempotent(req.method().as_str()) || policy.non_idempotent;

            let (parts, original) = req.into_parts();
            let (first, replay) = ReplayBody::new(original, MAX_REPLAY_BODY);
            let (method, uri, version, headers, extensions) = (
                parts.method.clone(),
                parts.uri.clone(),
                parts.version,
                parts.headers.clone(),
                parts.extensions.clone(),
            );
            let mut attempt_req = Request::from_parts(parts, body::boxed(first));
            let mut retries = 0u32;
            loop {
                let call: ResponseFuture = Box::pin(inner.call(attempt_req));
                let result = call.await;
                let Some(reason) = retry_reason(&result, &policy, idempotent) else {
                    return result;
                };
                if retries >= policy.attempts {
                    return result;
                }
                let labels = |result: &'static str| RetryLabels {
                    dst: dest.label.clone(),
                    route: extensions
                        .get::<RequestMeta>()
                        .map_or_else(|| Label::from("default"), |m| m.route.clone()),
                    reason,
                    result,
                };
                let Some(next) = replay.replay() else {
                    metrics
                        .retries
                        .get_or_create(&labels("body-too-large"))
                        .inc();
                    return result;
                };
                if !dest.retry_budget.withdraw() {
                    metrics
                        .retries
                        .get_or_create(&labels("budget-exhausted"))
                        .inc();
                    return result;
                }
                retries += 1;
                metrics.retries.get_or_create(&labels("retried")).inc();
                if let Some(events) = extensions.get::<crate::trace::SpanEvents>() {
                    events.add(
                        "retry",
                        vec![
                            ("attempt", retries.to_string()),
                            ("reason", reason.to_owned()),
                        ],
                    );
                }
                let avoid = result
                    .as_ref()
                    .ok()
                    .and_then(|r| r.extensions().get::<AnsweredBy>().copied());
                tracing::debug!(dst = %dest.name, reason, retry = retries, "retrying request");
                drop(result);
                tokio::time::sleep(backoff(policy.backoff, retries)).await;
                let mut next_req = Request::new(body::boxed(next));
                *next_req.method_mut() = method.clone();
                *next_req.uri_mut() = uri.clone();
                *next_req.version_mut() = version;
                *next_req.headers_mut() = headers.clone();
                *next_req.extensions_mut() = extensions.clone();
                next_req
                    .headers_mut()
                    .insert(RETRY_ATTEMPT, HeaderValue::from(retries));
                if let Some(AnsweredBy(addr)) = avoid {
                    next_req.extensions_mut().insert(AvoidEndpoint(addr));
                }
                attempt_req = next_req;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn budget_allows_the_ratio_plus_the_floor() {
        let budget = RetryBudget::new(&policy::RetryBudget {
            ratio: 0.2,
            min_per_second: 1,
        });
        for _ in 0..100 {
            budget.deposit();
        }
        // 20% of 100 + 1/s × 10 s.
        let granted = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 30);
        // The window moves on: old requests and retries stop counting.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(budget.view().requests_10s, 0);
        assert_eq!((0..100).filter(|_| budget.withdraw()).count(), 10);
    }

    #[test]
    fn only_safe_failures_are_retried_without_codes() {
        let p = RetryPolicy {
            codes: Vec::new(),
            attempts: 1,
            backoff: Duration::ZERO,
            non_idempotent: false,
        };
        let refused: Result<HttpResponse, _> = Err(ProxyError::ConnectFailed {
            addr: ([127, 0, 0, 1], 1).into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        });
        assert_eq!(retry_reason(&refused, &p, false), Some("connect-failed"));
        let reset: Result<HttpResponse, _> = Err(ProxyError::upstream("reset"));
        assert_eq!(retry_reason(&reset, &p, true), None);
        let mut rsp = HttpResponse::new(body::empty());
        *rsp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        let unavailable = Ok(rsp);
        assert_eq!(retry_reason(&unavailable, &p, true), None);
        let route = RetryPolicy {
            codes: vec![503],
            ..p.clone()
        };
        assert_eq!(retry_reason(&unavailable, &route, true), Some("status"));
        assert_eq!(retry_reason(&unavailable, &route, false), None, "POST");
        assert_eq!(retry_reason(&reset, &route, true), Some("upstream-failed"));
    }

    #[test]
    fn backoff_is_jittered_below_the_doubling_ceiling() {
        let base = Duration::from_millis(10);
        for retry in 1..6 {
            let ceiling = (base * (1 << (retry - 1))).min(MAX_RETRY_BACKOFF);
            for _ in 0..50 {
                assert!(backoff(base, retry) <= ceiling);
            }
        }
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
    }
}
