//! Classified proxy errors: one place answers "whose fault, which status, which
//! `x-trellis-error`", so every layer reports failures the same way and users can tell a proxy
//! error from an app error.

use http::StatusCode;

use crate::BoxError;

/// Header on every response the proxy generates itself.
pub const ERROR_HEADER: &str = "x-trellis-error";

/// Who caused a failure; drives logging level and (later) retry decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The caller sent something we cannot serve.
    Client,
    /// The destination failed or is unreachable.
    Upstream,
    /// Our own configuration or state (e.g. no endpoints known).
    Proxy,
}

/// A failure the proxy answers for itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no service is known for {authority:?}")]
    UnknownService { authority: String },
    #[error("service {service} has no endpoints")]
    NoEndpoints { service: String },
    #[error("request has no authority (absolute URI or Host header) to route by")]
    MissingAuthority,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("connect to {addr} failed: {source}")]
    ConnectFailed {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out")]
    ConnectTimeout { addr: std::net::SocketAddr },
    #[error("request timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("upstream failed: {0}")]
    Upstream(#[source] BoxError),
    #[error("proxy is draining")]
    Draining,
    /// Authorization refused the caller; `detail` is the `x-trellis-error` value
    /// (`denied policy=<ns>/<name>`, `denied no-matching-allow`, `denied unauthenticated`).
    #[error("{detail}")]
    Denied { detail: String },
    /// Every endpoint is ejected (outlier detection) or failing its health checks.
    #[error("every endpoint of {service} is ejected after failures")]
    CircuitOpen { service: String },
    /// The destination's concurrency limit and pending queue are full.
    #[error("{service} is at its concurrency limit")]
    Overloaded { service: String },
    /// An inbound RateLimitPolicy refused the request.
    #[error("rate limited by {policy}; retry after {retry_after_secs}s")]
    RateLimited {
        policy: String,
        retry_after_secs: u64,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownService { .. }
            | Self::NoEndpoints { .. }
            | Self::Draining
            | Self::CircuitOpen { .. }
            | Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::MissingAuthority | Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::ConnectFailed { .. } | Self::ConnectTimeout { .. } | Self::Upstream(_) => {
                StatusCode::BAD_GATEWAY
            }
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Denied { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// The stable, documented value of `x-trellis-error`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownService { .. } => "unknown-service",
            Self::NoEndpoints { .. } => "no-endpoints",
            Self::MissingAuthority | Self::Malformed(_) => "malformed-request",
            Self::ConnectFailed { .. } | Self::ConnectTimeout { .. } => "connect-failed",
            Self::Timeout(_) => "timeout",
            Self::Upstream(_) => "upstream-failed",
            Self::Draining => "draining",
            Self::Denied { .. } => "denied",
            Self::CircuitOpen { .. } => "circuit-open",
            Self::Overloaded { .. } => "overloaded",
            Self::RateLimited { .. } => "rate-limited",
        }
    }

    /// Seconds a refused caller should wait (`retry-after`).
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }

    /// Whether the request certainly never reached an app: another endpoint may be tried
    /// whatever the method.
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            Self::ConnectFailed { .. } | Self::ConnectTimeout { .. }
        )
    }

    pub fn fault(&self) -> Fault {
        match self {
            Self::MissingAuthority
            | Self::Malformed(_)
            | Self::Denied { .. }
            | Self::RateLimited { .. } => Fault::Client,
            Self::UnknownService { .. }
            | Self::NoEndpoints { .. }
            | Self::Draining
            | Self::CircuitOpen { .. }
            | Self::Overloaded { .. } => Fault::Proxy,
            Self::ConnectFailed { .. }
            | Self::ConnectTimeout { .. }
            | Self::Timeout(_)
            | Self::Upstream(_) => Fault::Upstream,
        }
    }

    /// gRPC status code for gRPC callers (they read `grpc-status`, not the HTTP status).
    pub fn grpc_status(&self) -> u8 {
        match self.status() {
            StatusCode::GATEWAY_TIMEOUT => 4,   // DEADLINE_EXCEEDED
            StatusCode::FORBIDDEN => 7,         // PERMISSION_DENIED
            StatusCode::BAD_REQUEST => 3,       // INVALID_ARGUMENT
            StatusCode::TOO_MANY_REQUESTS => 8, // RESOURCE_EXHAUSTED
            _ => 14,                            // UNAVAILABLE
        }
    }

    /// The `x-trellis-error` value: the reason, with details where the contract has them.
    pub fn header_value(&self) -> http::HeaderValue {
        match self {
            Self::Denied { detail } => http::HeaderValue::from_str(detail)
                .unwrap_or_else(|_| http::HeaderValue::from_static("denied")),
            other => http::HeaderValue::from_static(other.reason()),
        }
    }

    /// Wraps an error from hyper/h2 while talking to an upstream.
    pub fn upstream(e: impl Into<BoxError>) -> Self {
        Self::Upstream(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_reasons_match_the_contract() {
        let addr = "127.0.0.1:1".parse().expect("addr");
        let cases: Vec<(ProxyError, u16, &str)> = vec![
            (
                ProxyError::NoEndpoints {
                    service: "a".into(),
                },
                503,
                "no-endpoints",
            ),
            (
                ProxyError::ConnectFailed {
                    addr,
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                },
                502,
                "connect-failed",
            ),
            (
                ProxyError::Timeout(std::time::Duration::from_secs(1)),
                504,
                "timeout",
            ),
            (ProxyError::MissingAuthority, 400, "malformed-request"),
        ];
        for (err, status, reason) in cases {
            assert_eq!(err.status().as_u16(), status, "{err}");
            assert_eq!(err.reason(), reason, "{err}");
        }
    }

    #[test]
    fn grpc_codes() {
        let denied = ProxyError::Denied {
            detail: "denied policy=default/no-admin".into(),
        };
        assert_eq!(denied.grpc_status(), 7, "PERMISSION_DENIED");
        assert_eq!(denied.status().as_u16(), 403);
        assert_eq!(denied.header_value(), "denied policy=default/no-admin");
        assert_eq!(
            ProxyError::Timeout(std::time::Duration::ZERO).grpc_status(),
            4
        );
        assert_eq!(
            ProxyError::NoEndpoints {
                service: "a".into()
            }
            .grpc_status(),
            14
        );
    }
}
