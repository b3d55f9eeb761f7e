//! `trellis explain`: the request to explain, as passed between the CLI, the control plane and
//! a proxy's admin port (`dst=NAME&method=GET&path=/x&header=name:value`). Every party decides
//! with the same core code (route selection, authorization); this module only carries the
//! question.

use crate::discovery::{Headers, RequestFacts, RouteRule, RouteTable};
use crate::names::ServiceName;

/// What to explain: a request as the app would send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainQuery {
    /// The calling service (needed by the control plane, ignored by a proxy).
    pub source: Option<String>,
    pub destination: String,
    pub method: String,
    /// Path with optional `?query`.
    pub path: String,
    /// Header names lower-case.
    pub headers: Vec<(String, String)>,
}

/// Decodes `%XX` and `+` in a query component.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ExplainQuery {
    /// From `[src=NAME&]dst=NAME&method=GET&path=/x&header=name:value` (repeatable
    /// `header`).
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut q = ExplainQuery {
            source: None,
            destination: String::new(),
            method: "GET".into(),
            path: "/".into(),
            headers: Vec::new(),
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v);
            match k {
                "src" => q.source = Some(v),
                "dst" => q.destination = v,
                "method" => q.method = v.to_ascii_uppercase(),
                "path" => q.path = v,
                "header" => {
                    let (name, value) = v
                        .split_once(':')
                        .ok_or_else(|| format!("header {v:?} is not NAME:VALUE"))?;
                    q.headers
                        .push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
                }
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        if q.destination.is_empty() {
            return Err("dst is required".into());
        }
        if !q.path.starts_with('/') {
            return Err(format!("path {:?} must start with '/'", q.path));
        }
        Ok(q)
    }

    /// The query string for a proxy's `/explain` (without `src`).
    pub fn to_proxy_query(&self) -> String {
        let mut out = format!(
            "dst={}&method={}&path={}",
            encode(&self.destination),
            encode(&self.method),
            encode(&self.path)
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("&header={}", encode(&format!("{k}:{v}"))));
        }
        out
    }
}

struct PairHeaders<'a>(&'a [(String, String)]);

impl Headers for PairHeaders<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl ExplainQuery {
    /// The rule of `table` this request matches: the same selection the proxy runs per
    /// request.
    pub fn select<'t>(&self, table: &'t RouteTable) -> Option<&'t RouteRule> {
        let (path, query) = match self.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (self.path.as_str(), None),
        };
        table.select(&RequestFacts {
            method: &self.method,
            path,
            query,
            headers: &PairHeaders(&self.headers),
        })
    }

    /// The request's path without its query string.
    pub fn path_only(&self) -> &str {
        self.path
            .split_once('?')
            .map_or(self.path.as_str(), |(p, _)| p)
    }
}

/// Where a matched rule (or, with none, the destination itself) sends calls: each backend
/// with its weight and its share of traffic in percent.
pub fn backend_shares(
    rule: Option<&RouteRule>,
    destination: &ServiceName,
) -> Vec<(ServiceName, u32, f64)> {
    let weights: Vec<(ServiceName, u32)> = match rule {
        Some(r) if !r.backends.is_empty() => r
            .backends
            .iter()
            .map(|b| (b.service.clone(), b.weight))
            .collect(),
        _ => vec![(destination.clone(), 1)],
    };
    let total: u32 = weights.iter().map(|(_, w)| w).sum();
    weights
        .into_iter()
        .map(|(service, weight)| {
            let share = if total == 0 {
                0.0
            } else {
                f64::from(weight) * 100.0 / f64::from(total)
            };
            (service, weight, share)
        })
        .collect()
}

/// Percent-encodes everything but unreserved characters.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_decodes_the_query() {
        let q = ExplainQuery::parse(Some(
            "src=frontend&dst=web&method=post&path=%2Fapi%2Fx%3Fa%3D1&header=X-Canary%3A%20yes",
        ))
        .expect("valid");
        assert_eq!(q.source.as_deref(), Some("frontend"));
        assert_eq!(q.destination, "web");
        assert_eq!(q.method, "POST");
        assert_eq!(q.path, "/api/x?a=1");
        assert_eq!(q.headers, vec![("x-canary".into(), "yes".into())]);
        assert!(ExplainQuery::parse(Some("method=GET")).is_err());
        assert!(ExplainQuery::parse(Some("dst=web&header=nocolon")).is_err());
        assert!(ExplainQuery::parse(Some("dst=web&path=%")).is_err());
        assert!(ExplainQuery::parse(Some("dst=web&path=%E2%82")).is_err());
    }

    #[test]
    fn proxy_query_round_trips() {
        let q = ExplainQuery::parse(Some("dst=web&path=/a%20b?x=1&header=x-a:1")).expect("valid");
        let back = ExplainQuery::parse(Some(&q.to_proxy_query())).expect("valid");
        assert_eq!(back, q);
    }
}
