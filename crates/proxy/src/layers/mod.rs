//! One concern per layer. Each file holds a tower `Layer`, its `Service`, and its tests.
//! The stacks that assemble them live in [`crate::http::stack`].

pub mod access_log;
pub mod authz;
pub mod concurrency;
pub mod error_response;
pub mod fault;
pub mod header_modifier;
pub mod metrics;
pub mod mirror;
pub mod rate_limit;
pub mod retry;
pub mod strip_header;
pub mod tap;
pub mod timeout;
pub mod trace;

use http::{Request, Response};

use crate::body::Body;

/// The request/response types every HTTP layer speaks.
pub type HttpRequest = Request<Body>;
pub type HttpResponse = Response<Body>;

/// A boxed response future. Layers that await their inner service inside an `async` block
/// box its future first: holding the concrete future across an await trips rustc's
/// higher-ranked `Send` check (rust-lang/rust#110338).
pub type ResponseFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<HttpResponse, crate::error::ProxyError>> + Send>,
>;

pin_project_lite::pin_project! {
    /// A layer's future: the inner service's own future when the layer has nothing to do for
    /// a request (no allocation on that path), or a boxed one when it does.
    #[project = MaybeBoxedProj]
    pub enum MaybeBoxed<F> {
        Direct { #[pin] inner: F },
        Boxed { inner: ResponseFuture },
    }
}

impl<F> MaybeBoxed<F> {
    pub fn direct(inner: F) -> Self {
        Self::Direct { inner }
    }

    pub fn boxed(
        inner: impl std::future::Future<Output = Result<HttpResponse, crate::error::ProxyError>>
        + Send
        + 'static,
    ) -> Self {
        Self::Boxed {
            inner: Box::pin(inner),
        }
    }
}

impl<F> std::future::Future for MaybeBoxed<F>
where
    F: std::future::Future<Output = Result<HttpResponse, crate::error::ProxyError>>,
{
    type Output = Result<HttpResponse, crate::error::ProxyError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.project() {
            MaybeBoxedProj::Direct { inner } => inner.poll(cx),
            MaybeBoxedProj::Boxed { inner } => inner.as_mut().poll(cx),
        }
    }
}
