//! Trellis domain model: the names, addresses and configuration types every other crate shares.
//!
//! This crate does no I/O. It parses and validates; callers decide where bytes come from, so
//! validation is the same whether config arrives from a file, a flag or (later) the control plane.

pub mod authz;
pub mod discovery;
pub mod duration;
pub mod explain;
pub mod identity;
pub mod names;
pub mod policy;
pub mod proxy_config;
pub mod resources;
pub mod signals;
pub mod time;

pub use names::{NameError, Namespace, ServiceName};
pub use proxy_config::{ConfigError, Destination, Endpoint, ProtocolHint, StaticConfig};
