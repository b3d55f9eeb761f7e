//! One concern per layer. Each file holds a tower `Layer`, its `Service`, and its tests.
//! The stacks that assemble them live in [`crate::http::stack`].

pub mod access_log;
pub mod authz;
pub mod error_response;
pub mod metrics;
pub mod strip_header;
pub mod timeout;

use http::{Request, Response};

use crate::body::Body;

/// The request/response types every HTTP layer speaks.
pub type HttpRequest = Request<Body>;
pub type HttpResponse = Response<Body>;
