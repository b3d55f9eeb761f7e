//! Workload identity: `spiffe://<trust-domain>/ns/<namespace>/svc/<service>`.

use std::fmt;

use crate::names::{Namespace, ServiceName};

/// The SPIFFE ID of one service in one namespace of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: Namespace,
    pub service: ServiceName,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not a spiffe:// URI")]
    NotSpiffe(String),
    #[error("{0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/svc/<service>")]
    Shape(String),
    #[error("{id:?}: {reason}")]
    Part { id: String, reason: String },
}

/// The namespace and service name of the control plane's own identity.
pub const SYSTEM_NAMESPACE: &str = "trellis-system";
pub const CONTROL_PLANE_SERVICE: &str = "trellis-control";

impl SpiffeId {
    /// `spiffe://<td>/ns/trellis-system/svc/trellis-control`: what proxies expect the control
    /// plane's gRPC API to present.
    pub fn control_plane(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: Namespace::new(SYSTEM_NAMESPACE).unwrap_or_default(),
            service: ServiceName::new(CONTROL_PLANE_SERVICE)
                .unwrap_or_else(|_| unreachable!("a valid constant name")),
        }
    }

    pub fn new(trust_domain: &str, namespace: Namespace, service: ServiceName) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace,
            service,
        }
    }

    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(uri.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, "ns", ns, "svc", svc] = parts.as_slice() else {
            return Err(IdentityError::Shape(uri.to_owned()));
        };
        if !valid_trust_domain(td) {
            return Err(IdentityError::Part {
                id: uri.to_owned(),
                reason: format!(
                    "trust domain {td:?} must be lowercase letters, digits, '.', '-' or '_'"
                ),
            });
        }
        let part = |reason: String| IdentityError::Part {
            id: uri.to_owned(),
            reason,
        };
        Ok(Self {
            trust_domain: (*td).to_owned(),
            namespace: Namespace::new(*ns).map_err(|e| part(format!("namespace: {e}")))?,
            service: ServiceName::new(*svc).map_err(|e| part(format!("service: {e}")))?,
        })
    }
}

/// SPIFFE trust domains: lowercase letters, digits, dots, dashes and underscores.
pub fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/svc/{}",
            self.trust_domain,
            self.namespace.as_str(),
            self.service.as_str()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_other_shapes() {
        let id = SpiffeId::parse("spiffe://trellis.local/ns/default/svc/orders").unwrap();
        assert_eq!(id.service.as_str(), "orders");
        assert_eq!(id.namespace.as_str(), "default");
        assert_eq!(
            id.to_string(),
            "spiffe://trellis.local/ns/default/svc/orders"
        );
        for bad in [
            "https://trellis.local/ns/default/svc/orders",
            "spiffe://trellis.local/ns/default/sa/orders",
            "spiffe://trellis.local/ns/default/svc/orders/extra",
            "spiffe://Trellis/ns/default/svc/orders",
            "spiffe://trellis.local/ns/default/svc/Orders",
            "spiffe:///ns/default/svc/orders",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
