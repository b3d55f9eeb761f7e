//! Authorization: which callers may reach a service, down to route, path, method and port.
//!
//! One function, [`authorize`], decides for the proxy's inbound side and for `trellis explain`,
//! so what an operator is told is what the proxy does.
//!
//! Order: a matching `DENY` wins; matching `AUDIT` policies are recorded (they never block);
//! then, if any `ALLOW` policy applies to the request's route, one of them must match;
//! with none, `MeshConfig.spec.defaultPolicy` decides.

use crate::identity::SpiffeId;
use crate::resources::{AuthzAction, AuthzRule, AuthzSource, AuthzTarget, DefaultPolicy};

/// An `AuthorizationPolicy` as the proxy of its target service holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundPolicy {
    pub name: String,
    pub namespace: String,
    pub action: AuthzAction,
    /// Only requests on this route (an HTTPRoute name, or `<route>.<rule>`).
    pub route: Option<String>,
    pub rules: Vec<AuthzRule>,
}

impl InboundPolicy {
    /// The `policy` metric label and the `x-trellis-error` detail: `<namespace>/<name>`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What is known about one inbound request (or TCP connection: no method, no path).
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    /// The caller's verified identity; `None` for plaintext (permissive mode).
    pub caller: Option<&'a SpiffeId>,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub port: u16,
    /// The route of the target service the request matched, if any.
    pub route: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

/// Why a request was allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// `<ns>/<name>` of the deciding policy, `no-matching-allow`, `unauthenticated`, or
    /// `default` (the mesh's default policy allowed it).
    pub reason: String,
    /// `AUDIT` policies that matched (each would have denied).
    pub audited: Vec<String>,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    /// The `x-trellis-error` value of a denial.
    pub fn denial_header(&self) -> String {
        if self.reason.contains('/') {
            format!("denied policy={}", self.reason)
        } else {
            format!("denied {}", self.reason)
        }
    }
}

pub fn authorize(
    policies: &[InboundPolicy],
    default: DefaultPolicy,
    req: &AuthzRequest<'_>,
) -> Decision {
    let applies = |p: &&InboundPolicy| match (&p.route, req.route) {
        (None, _) => true,
        (Some(want), Some(got)) => {
            got == want
                || got
                    .strip_prefix(want.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        }
        (Some(_), None) => false,
    };
    let mut audited = Vec::new();
    let mut allow_policies = 0;
    let mut allowed_by = None;
    for p in policies.iter().filter(applies) {
        match p.action {
            AuthzAction::Deny if matches(p, req, true) => {
                return Decision {
                    verdict: Verdict::Deny,
                    reason: p.label(),
                    audited,
                };
            }
            AuthzAction::Audit if matches(p, req, true) => audited.push(p.label()),
            AuthzAction::Allow => {
                allow_policies += 1;
                if allowed_by.is_none() && matches(p, req, false) {
                    allowed_by = Some(p.label());
                }
            }
            _ => {}
        }
    }
    let (verdict, reason) = match (allowed_by, allow_policies, default) {
        (Some(label), _, _) => (Verdict::Allow, label),
        (None, n, _) if n > 0 => (Verdict::Deny, "no-matching-allow".to_owned()),
        (None, _, DefaultPolicy::Allow) => (Verdict::Allow, "default".to_owned()),
        (None, _, DefaultPolicy::Deny) => (Verdict::Deny, "no-matching-allow".to_owned()),
        (None, _, DefaultPolicy::AllowAuthenticated) if req.caller.is_some() => {
            (Verdict::Allow, "default".to_owned())
        }
        (None, _, DefaultPolicy::AllowAuthenticated) => {
            (Verdict::Deny, "unauthenticated".to_owned())
        }
    };
    Decision {
        verdict,
        reason,
        audited,
    }
}

/// Whether any rule of `p` matches. A policy with no rules matches every request.
/// `broad`: for DENY/AUDIT, HTTP-only conditions are ignored on TCP connections (deny more);
/// for ALLOW they make the rule not match (allow less). Either way a TCP connection cannot slip
/// past a rule written for HTTP.
fn matches(p: &InboundPolicy, req: &AuthzRequest<'_>, broad: bool) -> bool {
    p.rules.is_empty()
        || p.rules.iter().any(|rule| {
            (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, p, req)))
                && (rule.to.is_empty() || rule.to.iter().any(|t| target_matches(t, req, broad)))
        })
}

fn source_matches(s: &AuthzSource, p: &InboundPolicy, req: &AuthzRequest<'_>) -> bool {
    let Some(caller) = req.caller else {
        return false;
    };
    if s.services.is_empty() && s.namespaces.is_empty() && s.identities.is_empty() {
        // `from: [{}]`: any authenticated caller.
        return true;
    }
    s.services.iter().any(|svc| {
        // `name` means that service in the policy's namespace; `ns/name` names another.
        let (ns, name) = svc.split_once('/').unwrap_or((&p.namespace, svc));
        caller.service.as_str() == name && caller.namespace.as_str() == ns
    }) || s
        .namespaces
        .iter()
        .any(|ns| caller.namespace.as_str() == ns)
        || s.identities
            .iter()
            .any(|id| glob_matches(id, &caller.to_string()))
}

fn target_matches(t: &AuthzTarget, req: &AuthzRequest<'_>, broad: bool) -> bool {
    let ports = t.ports.is_empty() || t.ports.contains(&req.port);
    let http_only = !t.paths.is_empty() || !t.methods.is_empty();
    if req.method.is_none() && http_only {
        return broad && ports;
    }
    let methods = t.methods.is_empty()
        || req
            .method
            .is_some_and(|m| t.methods.iter().any(|want| want.eq_ignore_ascii_case(m)));
    let paths = t.paths.is_empty()
        || req
            .path
            .is_some_and(|path| t.paths.iter().any(|want| glob_matches(want, path)));
    ports && methods && paths
}

/// Exact, or a prefix when the pattern ends in `*`.
fn glob_matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{Namespace, ServiceName};

    fn id(ns: &str, svc: &str) -> SpiffeId {
        SpiffeId::new(
            "trellis.local",
            Namespace::new(ns).unwrap(),
            ServiceName::new(svc).unwrap(),
        )
    }

    fn policy(name: &str, action: AuthzAction, rules: Vec<AuthzRule>) -> InboundPolicy {
        InboundPolicy {
            name: name.into(),
            namespace: "default".into(),
            action,
            route: None,
            rules,
        }
    }

    fn from_services(services: &[&str]) -> AuthzSource {
        AuthzSource {
            services: services.iter().map(|s| s.to_string()).collect(),
            namespaces: vec![],
            identities: vec![],
        }
    }

    fn to(paths: &[&str], methods: &[&str], ports: &[u16]) -> AuthzTarget {
        AuthzTarget {
            paths: paths.iter().map(|s| s.to_string()).collect(),
            methods: methods.iter().map(|s| s.to_string()).collect(),
            ports: ports.to_vec(),
        }
    }

    fn http<'a>(caller: Option<&'a SpiffeId>, method: &'a str, path: &'a str) -> AuthzRequest<'a> {
        AuthzRequest {
            caller,
            method: Some(method),
            path: Some(path),
            port: 8080,
            route: None,
        }
    }

    #[test]
    fn default_policies_decide_when_nothing_applies() {
        let web = id("default", "web");
        let req = http(Some(&web), "GET", "/");
        assert!(authorize(&[], DefaultPolicy::Allow, &req).allowed());
        let denied = authorize(&[], DefaultPolicy::Deny, &req);
        assert_eq!(denied.denial_header(), "denied no-matching-allow");
        assert!(authorize(&[], DefaultPolicy::AllowAuthenticated, &req).allowed());
        let anonymous = http(None, "GET", "/");
        let d = authorize(&[], DefaultPolicy::AllowAuthenticated, &anonymous);
        assert_eq!(d.reason, "unauthenticated");
    }

    #[test]
    fn allow_lists_callers_paths_and_methods() {
        let allow = policy(
            "orders-from-web",
            AuthzAction::Allow,
            vec![AuthzRule {
                from: vec![from_services(&["web"])],
                to: vec![to(&["/orders/*"], &["GET", "POST"], &[])],
            }],
        );
        let (web, batch) = (id("default", "web"), id("default", "batch"));
        let ok = authorize(
            std::slice::from_ref(&allow),
            DefaultPolicy::Allow,
            &http(Some(&web), "GET", "/orders/1"),
        );
        assert!(ok.allowed());
        assert_eq!(ok.reason, "default/orders-from-web");
        for req in [
            http(Some(&batch), "GET", "/orders/1"),
            http(Some(&web), "DELETE", "/orders/1"),
            http(Some(&web), "GET", "/admin"),
            http(None, "GET", "/orders/1"),
        ] {
            let d = authorize(std::slice::from_ref(&allow), DefaultPolicy::Allow, &req);
            assert_eq!(d.denial_header(), "denied no-matching-allow", "{req:?}");
        }
        // The same service name in another namespace is another caller.
        let other = id("staging", "web");
        assert!(
            !authorize(
                &[allow],
                DefaultPolicy::Allow,
                &http(Some(&other), "GET", "/orders/1")
            )
            .allowed()
        );
    }

    #[test]
    fn deny_wins_over_allow_and_audit_never_blocks() {
        let web = id("default", "web");
        let allow_all = policy(
            "allow-web",
            AuthzAction::Allow,
            vec![AuthzRule {
                from: vec![from_services(&["web"])],
                to: vec![],
            }],
        );
        let deny_admin = policy(
            "no-admin",
            AuthzAction::Deny,
            vec![AuthzRule {
                from: vec![],
                to: vec![to(&["/admin*"], &[], &[])],
            }],
        );
        let audit_post = policy(
            "watch-posts",
            AuthzAction::Audit,
            vec![AuthzRule {
                from: vec![],
                to: vec![to(&[], &["POST"], &[])],
            }],
        );
        let all = [allow_all, deny_admin, audit_post];
        let d = authorize(
            &all,
            DefaultPolicy::Allow,
            &http(Some(&web), "GET", "/admin/users"),
        );
        assert_eq!(d.denial_header(), "denied policy=default/no-admin");
        let d = authorize(
            &all,
            DefaultPolicy::Allow,
            &http(Some(&web), "POST", "/orders"),
        );
        assert!(d.allowed());
        assert_eq!(d.audited, vec!["default/watch-posts".to_owned()]);
    }

    #[test]
    fn identities_namespaces_and_ports() {
        let web = id("shop", "web");
        let by_id = policy(
            "by-id",
            AuthzAction::Allow,
            vec![AuthzRule {
                from: vec![AuthzSource {
                    services: vec![],
                    namespaces: vec![],
                    identities: vec!["spiffe://trellis.local/ns/shop/*".into()],
                }],
                to: vec![to(&[], &[], &[8080])],
            }],
        );
        assert!(
            authorize(
                std::slice::from_ref(&by_id),
                DefaultPolicy::Deny,
                &http(Some(&web), "GET", "/")
            )
            .allowed()
        );
        let mut other_port = http(Some(&web), "GET", "/");
        other_port.port = 9090;
        assert!(!authorize(&[by_id], DefaultPolicy::Deny, &other_port).allowed());
        let by_ns = policy(
            "by-ns",
            AuthzAction::Allow,
            vec![AuthzRule {
                from: vec![AuthzSource {
                    services: vec![],
                    namespaces: vec!["shop".into()],
                    identities: vec![],
                }],
                to: vec![],
            }],
        );
        assert!(authorize(&[by_ns], DefaultPolicy::Deny, &http(Some(&web), "GET", "/")).allowed());
    }

    #[test]
    fn tcp_cannot_slip_past_http_rules() {
        let web = id("default", "web");
        let tcp = AuthzRequest {
            caller: Some(&web),
            method: None,
            path: None,
            port: 8080,
            route: None,
        };
        let deny_admin = policy(
            "no-admin",
            AuthzAction::Deny,
            vec![AuthzRule {
                from: vec![from_services(&["web"])],
                to: vec![to(&["/admin"], &[], &[])],
            }],
        );
        assert!(!authorize(&[deny_admin], DefaultPolicy::Allow, &tcp).allowed());
        let allow_get = policy(
            "get-only",
            AuthzAction::Allow,
            vec![AuthzRule {
                from: vec![from_services(&["web"])],
                to: vec![to(&[], &["GET"], &[])],
            }],
        );
        assert!(!authorize(&[allow_get], DefaultPolicy::Allow, &tcp).allowed());
    }

    #[test]
    fn route_scoped_policies_apply_to_their_route_only() {
        let web = id("default", "web");
        let mut deny = policy("no-checkout", AuthzAction::Deny, vec![]);
        deny.route = Some("checkout".into());
        let mut req = http(Some(&web), "GET", "/checkout");
        assert!(authorize(std::slice::from_ref(&deny), DefaultPolicy::Allow, &req).allowed());
        req.route = Some("checkout.rule-1");
        assert!(!authorize(std::slice::from_ref(&deny), DefaultPolicy::Allow, &req).allowed());
        req.route = Some("checkout-v2");
        assert!(authorize(&[deny], DefaultPolicy::Allow, &req).allowed());
    }
}
