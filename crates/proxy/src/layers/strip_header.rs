//! Removes a header from every request before it goes further. Used for
//! `x-trellis-client-id`: only the inbound proxy may assert a caller's identity, so the header is
//! dropped from anything the app sends and from anything arriving from outside the mesh.

use std::task::{Context, Poll};

use http::HeaderName;
use tower::{Layer, Service};

use super::HttpRequest;

#[derive(Debug, Clone)]
pub struct StripHeaderLayer {
    name: HeaderName,
}

impl StripHeaderLayer {
    pub fn new(name: HeaderName) -> Self {
        Self { name }
    }
}

impl<S> Layer<S> for StripHeaderLayer {
    type Service = StripHeader<S>;
    fn layer(&self, inner: S) -> StripHeader<S> {
        StripHeader {
            inner,
            name: self.name.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StripHeader<S> {
    inner: S,
    name: HeaderName,
}

impl<S: Service<HttpRequest>> Service<HttpRequest> for StripHeader<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: HttpRequest) -> S::Future {
        req.headers_mut().remove(&self.name);
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use tower::ServiceExt;

    #[tokio::test]
    async fn removes_every_copy_of_the_header() {
        let svc = StripHeaderLayer::new(HeaderName::from_static("x-trellis-client-id")).layer(
            tower::service_fn(|req: HttpRequest| async move {
                Ok::<_, std::convert::Infallible>(
                    req.headers().get_all("x-trellis-client-id").iter().count(),
                )
            }),
        );
        let req = http::Request::get("/")
            .header("x-trellis-client-id", "spiffe://evil")
            .header("x-trellis-client-id", "spiffe://evil2")
            .body(body::empty())
            .expect("req");
        assert_eq!(svc.oneshot(req).await.expect("ok"), 0);
    }
}
