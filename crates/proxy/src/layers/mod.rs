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
pub mod timeout;

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
