//! Static proxy configuration (`trellis-proxy --config proxy.yaml`).
//!
//! Static mode lets one proxy run with no control plane: the file names this instance's service
//! and, for every destination the app calls, its endpoints and an optional protocol hint. The file
//! is parsed in two steps: serde reads the raw shape (unknown fields are errors, so typos are not
//! silently ignored), then [`StaticConfig::from_raw`] validates values and reports the exact field
//! path and reason, e.g. `destinations.payments.endpoints[0].address: invalid socket address`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::parse_duration;
use crate::names::{Namespace, ServiceName};

/// A rejected config: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ConfigError {
    /// Dotted field path, e.g. `destinations.payments.timeout`; `<document>` for parse errors.
    pub path: String,
    pub reason: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

/// How the proxy should treat traffic to a destination or port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolHint {
    /// Peek at the first bytes (TLS, HTTP/2 preface, HTTP/1) with a short deadline.
    #[default]
    Detect,
    /// HTTP/1.1 (detection still runs; HTTP/2 clients keep working).
    Http,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// gRPC: HTTP/2 with prior knowledge.
    Grpc,
    /// Opaque TCP: no detection at all, so server-speaks-first protocols never wait.
    Tcp,
}

impl ProtocolHint {
    /// Whether the proxy should skip protocol detection entirely.
    pub fn is_opaque(self) -> bool {
        self == ProtocolHint::Tcp
    }
}

/// One address of a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// `true`: a Trellis proxy's inbound listener (traffic goes over the mesh's HTTP/2 transport).
    /// `false`: a plain server outside the mesh, spoken to in the app's own protocol.
    pub meshed: bool,
    /// The instance's namespace, for endpoints the control plane reported: with the service
    /// name, the identity its proxy must present (mTLS). `None`: plaintext (static mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<crate::names::Namespace>,
    /// For an ExternalService endpoint: the `host:port` it was configured as (the `Host` the
    /// external server expects, and the TLS server name when the proxy originates TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_host: Option<String>,
}

/// Where calls to one service go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Destination {
    pub protocol: ProtocolHint,
    /// Whole-request deadline (response headers); `None` means no proxy-imposed limit.
    #[serde(serialize_with = "serialize_opt_duration")]
    pub timeout: Option<Duration>,
    pub endpoints: Vec<Endpoint>,
}

/// Validated static configuration of one proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaticConfig {
    pub service: ServiceName,
    pub namespace: Namespace,
    /// Local ports that forward everything to one service (same as `--upstream NAME=ADDR`).
    pub upstreams: BTreeMap<ServiceName, SocketAddr>,
    /// Protocol of the local app's port, for traffic arriving at the inbound listener.
    pub inbound_protocol: ProtocolHint,
    pub destinations: BTreeMap<ServiceName, Destination>,
}

fn serialize_opt_duration<S: serde::Serializer>(
    d: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&crate::duration::format_duration(*d)),
        None => s.serialize_none(),
    }
}

// === raw file shape ===

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStaticConfig {
    pub service: Option<String>,
    pub namespace: Option<String>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, String>,
    #[serde(default)]
    pub inbound: RawInbound,
    #[serde(default)]
    pub destinations: BTreeMap<String, RawDestination>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInbound {
    #[serde(default)]
    pub protocol: ProtocolHint,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDestination {
    #[serde(default)]
    pub protocol: ProtocolHint,
    pub timeout: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<RawEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    pub address: String,
    #[serde(default = "default_true")]
    pub meshed: bool,
    /// The instance's namespace, for endpoints the control plane reported: with the service
    /// name, the identity its proxy must present (mTLS). `None`: plaintext (static mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<crate::names::Namespace>,
}

fn default_true() -> bool {
    true
}

/// Documents larger than this are refused before parsing: a config is never megabytes.
pub const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;

impl StaticConfig {
    /// Parses and validates YAML (JSON is valid YAML).
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::new(
                "<document>",
                format!("larger than {MAX_CONFIG_BYTES} bytes"),
            ));
        }
        let raw = if text.trim().is_empty() {
            RawStaticConfig::default()
        } else {
            Self::parse_raw(text)?
        };
        Self::from_raw(raw)
    }

    /// The first step alone: the file's shape, before value validation. Lets a caller apply
    /// overrides (flags) before [`StaticConfig::from_raw`].
    pub fn parse_raw(text: &str) -> Result<RawStaticConfig, ConfigError> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::new(
                "<document>",
                format!("larger than {MAX_CONFIG_BYTES} bytes"),
            ));
        }
        serde_saphyr::from_str(text).map_err(|e| ConfigError::new("<document>", e))
    }

    pub fn from_raw(raw: RawStaticConfig) -> Result<Self, ConfigError> {
        let service = raw
            .service
            .ok_or_else(|| ConfigError::new("service", "is required"))
            .and_then(|s| ServiceName::new(s).map_err(|e| ConfigError::new("service", e)))?;
        let namespace = match raw.namespace {
            Some(ns) => Namespace::new(ns).map_err(|e| ConfigError::new("namespace", e))?,
            None => Namespace::default(),
        };
        let mut upstreams = BTreeMap::new();
        for (name, addr) in raw.upstreams {
            let path = format!("upstreams.{name}");
            let name = ServiceName::new(name).map_err(|e| ConfigError::new(&path, e))?;
            let addr = parse_socket_addr(&addr).map_err(|e| ConfigError::new(&path, e))?;
            upstreams.insert(name, addr);
        }
        let mut destinations = BTreeMap::new();
        for (name, raw_dest) in raw.destinations {
            let path = format!("destinations.{name}");
            let name = ServiceName::new(name).map_err(|e| ConfigError::new(&path, e))?;
            let timeout = raw_dest
                .timeout
                .map(|t| parse_duration(&t))
                .transpose()
                .map_err(|e| ConfigError::new(format!("{path}.timeout"), e))?;
            if timeout == Some(Duration::ZERO) {
                return Err(ConfigError::new(
                    format!("{path}.timeout"),
                    "must be greater than zero",
                ));
            }
            let mut endpoints = Vec::with_capacity(raw_dest.endpoints.len());
            for (i, ep) in raw_dest.endpoints.into_iter().enumerate() {
                let address = parse_socket_addr(&ep.address)
                    .map_err(|e| ConfigError::new(format!("{path}.endpoints[{i}].address"), e))?;
                endpoints.push(Endpoint {
                    address,
                    meshed: ep.meshed,
                    namespace: None,
                    external_host: None,
                });
            }
            destinations.insert(
                name,
                Destination {
                    protocol: raw_dest.protocol,
                    timeout,
                    endpoints,
                },
            );
        }
        Ok(Self {
            service,
            namespace,
            upstreams,
            inbound_protocol: raw.inbound.protocol,
            destinations,
        })
    }
}

/// Parses `IP:PORT`; host names are not resolved here (no I/O in core), so they are refused with
/// a hint rather than looked up at some surprising moment later.
pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse::<SocketAddr>().map_err(|_| {
        format!("invalid socket address {s:?} (expected IP:PORT, e.g. 127.0.0.1:8080)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
service: web
namespace: shop
upstreams:
  payments: 127.0.0.1:9001
inbound:
  protocol: detect
destinations:
  payments:
    protocol: http
    timeout: 2s
    endpoints:
      - address: 127.0.0.1:4243
      - address: 10.0.0.7:8080
        meshed: false
  db:
    protocol: tcp
    endpoints:
      - address: "[::1]:5432"
        meshed: false
"#;

    #[test]
    fn parses_the_documented_example() {
        let cfg = StaticConfig::from_yaml(EXAMPLE).expect("valid");
        assert_eq!(cfg.service.as_str(), "web");
        assert_eq!(cfg.namespace.as_str(), "shop");
        let payments = ServiceName::new("payments").expect("name");
        assert_eq!(cfg.upstreams[&payments].port(), 9001);
        let dest = &cfg.destinations[&payments];
        assert_eq!(dest.protocol, ProtocolHint::Http);
        assert_eq!(dest.timeout, Some(Duration::from_secs(2)));
        assert!(dest.endpoints[0].meshed);
        assert!(!dest.endpoints[1].meshed);
        let db = &cfg.destinations[&ServiceName::new("db").expect("name")];
        assert!(db.protocol.is_opaque());
    }

    fn err(yaml: &str) -> ConfigError {
        StaticConfig::from_yaml(yaml).expect_err("should be rejected")
    }

    #[test]
    fn errors_name_the_field_and_reason() {
        let e = err("namespace: x\n");
        assert_eq!(e.path, "service");

        let e = err("service: Web\n");
        assert_eq!(e.path, "service");
        assert!(e.reason.contains("lowercase"), "{e}");

        let e = err("service: web\ndestinations:\n  pay:\n    endpoints:\n      - address: nope\n");
        assert_eq!(e.path, "destinations.pay.endpoints[0].address");

        let e = err("service: web\ndestinations:\n  pay:\n    timeout: 10\n");
        assert_eq!(e.path, "destinations.pay.timeout");

        let e = err("service: web\ndestinations:\n  pay:\n    timeout: 0s\n");
        assert!(e.reason.contains("greater than zero"));

        let e = err("service: web\nupstreams:\n  Bad_Name: 127.0.0.1:1\n");
        assert_eq!(e.path, "upstreams.Bad_Name");
    }

    #[test]
    fn unknown_fields_and_bad_types_are_parse_errors() {
        let e = err("service: web\ndestinatons: {}\n");
        assert_eq!(e.path, "<document>");
        assert!(e.reason.contains("destinatons"), "{e}");

        let e = err("service: web\ndestinations:\n  pay:\n    protocol: smtp\n");
        assert!(e.reason.contains("smtp"), "{e}");

        let e = err("service: [unclosed\n");
        assert_eq!(e.path, "<document>");
    }

    #[test]
    fn json_is_accepted() {
        let cfg = StaticConfig::from_yaml(r#"{"service": "web", "destinations": {}}"#)
            .expect("json is yaml");
        assert_eq!(cfg.service.as_str(), "web");
    }

    #[test]
    fn oversized_documents_are_refused() {
        let big = "#".repeat(MAX_CONFIG_BYTES + 1);
        assert!(err(&big).reason.contains("larger than"));
    }
}

#[cfg(test)]
mod example_file {
    /// The documented example must always be valid.
    #[test]
    fn examples_proxy_yaml_is_valid() {
        let text = include_str!("../../../examples/proxy.yaml");
        let cfg = super::StaticConfig::from_yaml(text).expect("examples/proxy.yaml");
        assert_eq!(cfg.destinations.len(), 2);
        assert_eq!(cfg.upstreams.len(), 2);
    }
}
