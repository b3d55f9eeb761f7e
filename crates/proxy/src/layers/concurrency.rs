//! Per-destination admission limits (DestinationPolicy `limits`): at most
//! `maxConcurrentRequests` requests in flight to a service (from this proxy) and at most
//! `maxPendingRequests` waiting for a slot. Anything beyond fails at once with 503
//! `overloaded`, so a slow destination costs its callers a fast error instead of an unbounded
//! queue. A slot is held until the response body ends.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};
use trellis_core::policy::ConcurrencyLimits;

use super::{HttpRequest, HttpResponse, MaybeBoxed, ResponseFuture};
use crate::body;
use crate::error::ProxyError;
use crate::http::outbound::backend_of;

#[derive(Debug)]
struct Slots {
    /// `None`: unlimited.
    semaphore: Option<Arc<Semaphore>>,
    max_pending: u32,
    waiting: AtomicU32,
}

impl Slots {
    fn new(limits: &ConcurrencyLimits) -> Self {
        Self {
            semaphore: limits
                .max_concurrent
                .map(|n| Arc::new(Semaphore::new(n as usize))),
            max_pending: limits.max_pending,
            waiting: AtomicU32::new(0),
        }
    }
}

/// One destination's limits; lives in its `DestinationState`.
#[derive(Debug)]
pub struct Limiter {
    // Replaced (not resized) on a policy change: requests in flight keep their old slot.
    slots: RwLock<Arc<Slots>>,
    /// Whether any limit is set (read per request without the lock).
    limited: std::sync::atomic::AtomicBool,
}

/// Counts a waiter until dropped (also when the wait is cancelled).
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Limiter {
    pub fn new(limits: &ConcurrencyLimits) -> Self {
        Self {
            slots: RwLock::new(Arc::new(Slots::new(limits))),
            limited: std::sync::atomic::AtomicBool::new(limits.max_concurrent.is_some()),
        }
    }

    /// Whether any limit is set (unlimited destinations skip the layer's work entirely).
    pub fn is_limited(&self) -> bool {
        self.limited.load(Ordering::Acquire)
    }

    pub fn reconfigure(&self, limits: &ConcurrencyLimits) {
        self.limited
            .store(limits.max_concurrent.is_some(), Ordering::Release);
        let fresh = Arc::new(Slots::new(limits));
        match self.slots.write() {
            Ok(mut g) => *g = fresh,
            Err(p) => *p.into_inner() = fresh,
        }
    }

    /// A slot (or `None` when unlimited), waiting only if the pending queue has room.
    pub async fn acquire(&self, service: &str) -> Result<Option<OwnedSemaphorePermit>, ProxyError> {
        let slots = self
            .slots
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        let Some(semaphore) = &slots.semaphore else {
            return Ok(None);
        };
        if let Ok(permit) = semaphore.clone().try_acquire_owned() {
            return Ok(Some(permit));
        }
        let overloaded = || ProxyError::Overloaded {
            service: service.to_owned(),
        };
        if slots.waiting.fetch_add(1, Ordering::Relaxed) >= slots.max_pending {
            slots.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(overloaded());
        }
        let _waiting = Waiting(&slots.waiting);
        semaphore
            .clone()
            .acquire_owned()
            .await
            .map(Some)
            .map_err(|_| overloaded())
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ConcurrencyLimitLayer;

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;
    fn layer(&self, inner: S) -> ConcurrencyLimit<S> {
        ConcurrencyLimit { inner }
    }
}

#[derive(Debug, Clone)]
pub struct ConcurrencyLimit<S> {
    inner: S,
}

impl<S> Service<HttpRequest> for ConcurrencyLimit<S>
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
        let Some(dest) = backend_of(&req).filter(|d| d.limiter.is_limited()).cloned() else {
            return MaybeBoxed::direct(self.inner.call(req));
        };
        let mut inner = self.inner.clone();
        MaybeBoxed::boxed(async move {
            let permit = dest.limiter.acquire(dest.name.as_str()).await?;
            let call: ResponseFuture = Box::pin(inner.call(req));
            let rsp = call.await?;
            let Some(permit) = permit else {
                return Ok(rsp);
            };
            // The slot is free when the response body ends or is dropped.
            Ok(rsp.map(|b| {
                body::boxed(b.map_frame(move |frame| {
                    let _held = &permit;
                    frame
                }))
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn full_limit_fails_fast_or_waits_within_the_queue() {
        let limiter = Limiter::new(&ConcurrencyLimits {
            max_concurrent: Some(2),
            max_pending: 1,
        });
        let a = limiter
            .acquire("orders")
            .await
            .expect("slot")
            .expect("limited");
        let _b = limiter.acquire("orders").await.expect("slot");
        // The third waits (the queue holds one) ...
        let limiter = Arc::new(limiter);
        let waiter = tokio::spawn({
            let l = limiter.clone();
            async move { l.acquire("orders").await.map(|p| p.is_some()) }
        });
        tokio::task::yield_now().await;
        // ... the fourth is refused at once.
        let err = limiter.acquire("orders").await.expect_err("overloaded");
        assert_eq!(err.reason(), "overloaded");
        drop(a);
        assert!(waiter.await.expect("join").expect("slot after release"));
    }

    #[tokio::test]
    async fn unlimited_by_default_and_reconfigurable() {
        let limiter = Limiter::new(&ConcurrencyLimits::default());
        assert!(limiter.acquire("x").await.expect("ok").is_none());
        limiter.reconfigure(&ConcurrencyLimits {
            max_concurrent: Some(1),
            max_pending: 0,
        });
        let _held = limiter.acquire("x").await.expect("ok");
        assert!(limiter.acquire("x").await.is_err());
    }
}
