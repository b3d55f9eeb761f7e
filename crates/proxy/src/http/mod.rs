//! The HTTP data path: per-direction stacks, the upstream clients and the header rules that
//! carry HTTP/1 across the mesh's HTTP/2 transport.

pub mod balance;
pub mod client;
pub mod destinations;
pub mod external;
pub mod headers;
pub mod health_check;
pub mod inbound;
pub mod outbound;
pub mod outlier;
pub mod replay;
pub mod stack;
pub mod tunnel;

use std::net::SocketAddr;

use crate::metrics::Label;

/// Which side of the proxy a request is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the local app toward another service.
    Outbound,
    /// From another proxy (or outside) toward the local app.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Per-request facts set when the request enters the proxy, read by observing layers.
/// Lives in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub direction: Direction,
    pub client: SocketAddr,
    /// Calling service (outbound: ourselves; inbound: the peer's identity once mTLS exists).
    pub src: Label,
    /// Destination service, or [`crate::metrics::UNKNOWN`].
    pub dst: Label,
    /// Route name; `default` until routes exist.
    pub route: Label,
    /// Inbound: the caller connected over mTLS. Outbound: this proxy has a workload identity
    /// (calls to meshed endpoints are mTLS). The `tls` metric label.
    pub tls: bool,
}
