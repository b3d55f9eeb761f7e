//! The route's `RequestHeaderModifier` and `ResponseHeaderModifier` filters: set, add and
//! remove headers on the way to the backend and on the way back. Names and values were checked
//! when the route arrived, so nothing here can fail per request.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue};
use tower::{Layer, Service};
use trellis_core::discovery::RouteRule;
use trellis_core::resources::HeaderModifier;

use super::{HttpRequest, HttpResponse, MaybeBoxed, ResponseFuture};
use crate::error::ProxyError;
use crate::http::outbound::SelectedRoute;

/// Applies `m` to `headers`: remove, then set (replace), then add (append).
pub fn modify(headers: &mut HeaderMap, m: &HeaderModifier) {
    let pair = |name: &str, value: &str| {
        Some((
            HeaderName::from_bytes(name.as_bytes()).ok()?,
            HeaderValue::from_str(value).ok()?,
        ))
    };
    for name in &m.remove {
        headers.remove(name.as_str());
    }
    for p in &m.set {
        if let Some((n, v)) = pair(&p.name, &p.value) {
            headers.insert(n, v);
        }
    }
    for p in &m.add {
        if let Some((n, v)) = pair(&p.name, &p.value) {
            headers.append(n, v);
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct HeaderModifierLayer;

impl<S> Layer<S> for HeaderModifierLayer {
    type Service = HeaderModifiers<S>;
    fn layer(&self, inner: S) -> HeaderModifiers<S> {
        HeaderModifiers { inner }
    }
}

#[derive(Debug, Clone)]
pub struct HeaderModifiers<S> {
    inner: S,
}

impl<S> Service<HttpRequest> for HeaderModifiers<S>
where
    S: Service<HttpRequest, Response = HttpResponse, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = ProxyError;
    type Future = MaybeBoxed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: HttpRequest) -> Self::Future {
        let rule: Option<Arc<RouteRule>> = req
            .extensions()
            .get::<SelectedRoute>()
            .filter(|r| r.0.request_headers.is_some() || r.0.response_headers.is_some())
            .map(|r| r.0.clone());
        let Some(rule) = rule else {
            return MaybeBoxed::direct(self.inner.call(req));
        };
        if let Some(m) = &rule.request_headers {
            modify(req.headers_mut(), m);
        }
        let call: ResponseFuture = Box::pin(self.inner.call(req));
        MaybeBoxed::boxed(async move {
            let mut rsp = call.await?;
            if let Some(m) = &rule.response_headers {
                modify(rsp.headers_mut(), m);
            }
            Ok(rsp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::resources::HeaderValuePair;

    #[test]
    fn removes_sets_and_adds_in_that_order() {
        let mut h = HeaderMap::new();
        h.insert("x-debug", HeaderValue::from_static("1"));
        h.insert("x-env", HeaderValue::from_static("prod"));
        h.insert("x-tag", HeaderValue::from_static("a"));
        let pair = |n: &str, v: &str| HeaderValuePair {
            name: n.into(),
            value: v.into(),
        };
        modify(
            &mut h,
            &HeaderModifier {
                set: vec![pair("x-env", "canary")],
                add: vec![pair("x-tag", "b")],
                remove: vec!["x-debug".into()],
            },
        );
        assert!(h.get("x-debug").is_none());
        assert_eq!(h["x-env"], "canary");
        let tags: Vec<_> = h.get_all("x-tag").iter().collect();
        assert_eq!(tags, vec!["a", "b"]);
    }
}
