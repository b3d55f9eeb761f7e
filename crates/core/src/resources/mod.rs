//! Declarative resources: Kubernetes-style objects (`apiVersion`, `kind`, `metadata`, `spec`)
//! that users apply with `trellis apply -f`.
//!
//! Parsing is two-step, like the static proxy config: every YAML/JSON document is read into a
//! generic value, then into the typed spec of its kind (unknown fields are errors), then
//! [`validate`]d. Every error names the document (its index and `kind/name` when known), the
//! field path and the reason. A whole file is accepted or rejected as one unit.

mod spec;
mod validate;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use spec::*;
pub use validate::{check_conflicts, referenced_services, validate};

pub const GATEWAY_API: &str = "gateway.networking.k8s.io/v1";
pub const TRELLIS_API: &str = "trellis.dev/v1alpha1";

/// Largest document set accepted in one apply.
pub const MAX_APPLY_BYTES: usize = 4 * 1024 * 1024;

/// Every kind Trellis accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Service,
    HTTPRoute,
    GRPCRoute,
    DestinationPolicy,
    AuthorizationPolicy,
    RateLimitPolicy,
    FaultInjection,
    ExternalService,
    MeshConfig,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Service,
        Kind::HTTPRoute,
        Kind::GRPCRoute,
        Kind::DestinationPolicy,
        Kind::AuthorizationPolicy,
        Kind::RateLimitPolicy,
        Kind::FaultInjection,
        Kind::ExternalService,
        Kind::MeshConfig,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::HTTPRoute => "HTTPRoute",
            Kind::GRPCRoute => "GRPCRoute",
            Kind::DestinationPolicy => "DestinationPolicy",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RateLimitPolicy => "RateLimitPolicy",
            Kind::FaultInjection => "FaultInjection",
            Kind::ExternalService => "ExternalService",
            Kind::MeshConfig => "MeshConfig",
        }
    }

    /// The `apiVersion` this kind is served under.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::HTTPRoute | Kind::GRPCRoute => GATEWAY_API,
            _ => TRELLIS_API,
        }
    }

    /// Parses a kind as users type it: exact (`HTTPRoute`), or case-insensitive singular or
    /// plural (`httproute`, `routes` for HTTPRoute, `services`, `meshconfig`).
    pub fn parse_loose(s: &str) -> Option<Kind> {
        let lower = s.to_ascii_lowercase();
        let singular = lower.strip_suffix('s').unwrap_or(&lower);
        Kind::ALL
            .into_iter()
            .find(|k| {
                k.as_str().eq_ignore_ascii_case(&lower) || k.as_str().eq_ignore_ascii_case(singular)
            })
            .or(match singular {
                "route" | "httproute" => Some(Kind::HTTPRoute),
                "svc" => Some(Kind::Service),
                _ => None,
            })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `metadata` of every resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".into()
}

/// The identity of a resource in the store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// A validated resource. Deserializing one runs the same parsing and validation as an apply.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    pub api_version: String,
    pub kind: Kind,
    pub metadata: Metadata,
    pub spec: Spec,
}

impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        parse_one(0, value).map_err(serde::de::Error::custom)
    }
}

impl Resource {
    pub fn key(&self) -> ResourceKey {
        ResourceKey {
            kind: self.kind,
            namespace: self.metadata.namespace.clone(),
            name: self.metadata.name.clone(),
        }
    }
}

/// Why a document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("document {document}{}: {path}: {reason}", self.describe())]
pub struct ResourceError {
    /// 0-based index of the document in the file.
    pub document: usize,
    /// `Kind/name` when it could be read.
    pub resource: Option<String>,
    /// Dotted field path, e.g. `spec.rules[0].backendRefs[1].weight`.
    pub path: String,
    pub reason: String,
}

impl ResourceError {
    fn describe(&self) -> String {
        self.resource
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    }
}

/// A warning: accepted, but probably not what the user meant (e.g. a reference to an unknown
/// service, which may be applied later).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourceWarning {
    pub resource: String,
    pub path: String,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Envelope {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: serde_json::Value,
    #[serde(default)]
    #[allow(dead_code)]
    status: serde_json::Value,
}

/// Parses YAML or JSON with one or more documents (`---` separated, or a JSON array / a
/// `kind: List` with `items`) into validated resources. All or nothing.
pub fn parse_documents(text: &str) -> Result<Vec<Resource>, Vec<ResourceError>> {
    let whole = |reason: String| {
        vec![ResourceError {
            document: 0,
            resource: None,
            path: "<document>".into(),
            reason,
        }]
    };
    if text.len() > MAX_APPLY_BYTES {
        return Err(whole(format!("larger than {MAX_APPLY_BYTES} bytes")));
    }
    let docs: Vec<serde_json::Value> = match serde_saphyr::from_multiple(text) {
        Ok(d) => d,
        Err(e) => return Err(whole(e.to_string())),
    };
    let mut flat = Vec::new();
    for doc in docs {
        match doc {
            serde_json::Value::Array(items) => flat.extend(items),
            serde_json::Value::Object(ref o)
                if o.get("kind").and_then(|k| k.as_str()) == Some("List") =>
            {
                if let Some(serde_json::Value::Array(items)) = o.get("items") {
                    flat.extend(items.iter().cloned());
                }
            }
            other => flat.push(other),
        }
    }
    if flat.is_empty() {
        return Err(whole("no documents".into()));
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in flat.into_iter().enumerate() {
        match parse_one(i, doc) {
            Ok(r) => out.push(r),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        if let Err(e) = check_conflicts(&out) {
            return Err(vec![e]);
        }
        Ok(out)
    } else {
        Err(errors)
    }
}

fn parse_one(document: usize, doc: serde_json::Value) -> Result<Resource, ResourceError> {
    let name_hint = doc
        .get("kind")
        .and_then(|k| k.as_str())
        .zip(doc.pointer("/metadata/name").and_then(|n| n.as_str()))
        .map(|(k, n)| format!("{k}/{n}"));
    let err = |path: &str, reason: String| ResourceError {
        document,
        resource: name_hint.clone(),
        path: path.into(),
        reason,
    };
    let env: Envelope =
        serde_json::from_value(doc.clone()).map_err(|e| err("<root>", e.to_string()))?;
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.as_str() == env.kind)
        .ok_or_else(|| {
            err(
                "kind",
                format!(
                    "unknown kind {:?}; known kinds: {}",
                    env.kind,
                    Kind::ALL.map(|k| k.as_str()).join(", ")
                ),
            )
        })?;
    if env.api_version != kind.api_version() {
        return Err(err(
            "apiVersion",
            format!(
                "{kind} is served as {:?}, not {:?}",
                kind.api_version(),
                env.api_version
            ),
        ));
    }
    let spec = Spec::from_value(kind, env.spec).map_err(|e| err(&format!("spec{}", e.0), e.1))?;
    let resource = Resource {
        api_version: env.api_version,
        kind,
        metadata: env.metadata,
        spec,
    };
    validate(&resource).map_err(|(path, reason)| err(&path, reason))?;
    Ok(resource)
}

#[cfg(test)]
mod tests;
