//! `trellis check`: named health checks of the mesh's trust, each with a hint when it fails.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::ca::Ca;
use crate::hub::ProxyReport;

/// CA certificates closer than this to expiry fail the check.
const CA_WARN_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Clocks further apart than this fail the check.
const MAX_SKEW_MS: i64 = 2_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hint: String,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn in_days(at: i64, now: i64) -> String {
    let secs = at - now;
    if secs < 0 {
        format!("expired {}s ago", -secs)
    } else if secs < 2 * 86_400 {
        format!("in {secs}s")
    } else {
        format!("in {} days", secs / 86_400)
    }
}

pub fn run(ca: &Ca, proxies: &[ProxyReport]) -> Vec<Check> {
    let now = now_unix();
    let warn_at = now + CA_WARN_BEFORE.as_secs() as i64;
    let mut checks = Vec::new();

    let roots: Vec<_> = trellis_api::tls::parse_certs(ca.bundle_pem().as_bytes())
        .unwrap_or_default()
        .iter()
        .filter_map(|c| trellis_api::tls::cert_info(c.as_ref()).ok())
        .collect();
    let soonest_root = roots.iter().map(|r| r.not_after).min().unwrap_or(0);
    checks.push(Check {
        name: "trust-bundle",
        ok: !roots.is_empty() && soonest_root > warn_at,
        detail: format!(
            "{} root(s); the first expires {}",
            roots.len(),
            in_days(soonest_root, now)
        ),
        hint: "rotate the root before it expires: `trellis ca rotate`, then `trellis ca rotate --finish`".into(),
    });
    let status = ca.rotation_status();
    checks.push(Check {
        name: "root-rotation",
        ok: status.phase == "done",
        detail: format!("{} ({} roots trusted)", status.phase, status.roots),
        hint: "a rotation is half done: once every proxy has renewed (see proxy-certificates), run `trellis ca rotate --finish`".into(),
    });
    let intermediate = trellis_api::tls::parse_certs(ca.intermediate_pem().as_bytes())
        .ok()
        .and_then(|c| trellis_api::tls::cert_info(c[0].as_ref()).ok())
        .map_or(0, |i| i.not_after);
    checks.push(Check {
        name: "intermediate-ca",
        ok: intermediate > warn_at,
        detail: format!("expires {}", in_days(intermediate, now)),
        hint: "restart the control plane: it replaces an intermediate that expires within 30 days"
            .into(),
    });

    // Each proxy renews at ~70% of the lifetime: one with less than 20% left is not renewing.
    let ttl = ca.workload_ttl().as_secs() as i64;
    let stale: Vec<String> = proxies
        .iter()
        .filter(|p| p.cert_expires_unix - now < ttl / 5)
        .map(|p| {
            format!(
                "{}/{} {} (expires {})",
                p.namespace,
                p.service,
                p.instances.join(","),
                in_days(p.cert_expires_unix, now)
            )
        })
        .collect();
    checks.push(Check {
        name: "proxy-certificates",
        ok: stale.is_empty(),
        detail: if stale.is_empty() {
            format!("{} connected proxies, all certificates current", proxies.len())
        } else {
            format!("not renewing: {}", stale.join("; "))
        },
        hint: "a proxy that cannot renew loses mTLS when its certificate expires: check its log for `certificate renewal failed`".into(),
    });
    let skewed: Vec<String> = proxies
        .iter()
        .filter(|p| p.clock_skew_ms.abs() > MAX_SKEW_MS)
        .map(|p| {
            format!(
                "{}/{} {} ({:+} ms)",
                p.namespace,
                p.service,
                p.instances.join(","),
                p.clock_skew_ms
            )
        })
        .collect();
    checks.push(Check {
        name: "clock-skew",
        ok: skewed.is_empty(),
        detail: if skewed.is_empty() {
            let worst = proxies.iter().map(|p| p.clock_skew_ms.abs()).max().unwrap_or(0);
            format!("largest skew {worst} ms over {} proxies", proxies.len())
        } else {
            format!("skewed: {}", skewed.join("; "))
        },
        hint: "synchronize clocks (NTP): certificates are short-lived and a skewed host sees them as not yet valid or expired".into(),
    });
    for c in &mut checks {
        if c.ok {
            c.hint.clear();
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_certificates_and_skewed_clocks_fail_with_hints() {
        let dir = std::env::temp_dir().join(format!("trellis-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Ca::load_or_create(&dir, None, Duration::from_secs(3600)).unwrap();
        let report = |expires_in: i64, skew: i64| ProxyReport {
            service: "orders".into(),
            namespace: "default".into(),
            instances: vec!["orders-0".into()],
            cert_expires_unix: now_unix() + expires_in,
            clock_skew_ms: skew,
        };
        let healthy = run(&ca, &[report(3000, 15)]);
        assert!(
            healthy.iter().all(|c| c.ok && c.hint.is_empty()),
            "{healthy:?}"
        );
        let sick = run(&ca, &[report(100, 5000)]);
        let failed: Vec<_> = sick.iter().filter(|c| !c.ok).map(|c| c.name).collect();
        assert_eq!(failed, vec!["proxy-certificates", "clock-skew"]);
        assert!(sick.iter().filter(|c| !c.ok).all(|c| !c.hint.is_empty()));
        ca.start_rotation().unwrap();
        let rotating = run(&ca, &[]);
        assert!(rotating.iter().any(|c| c.name == "root-rotation" && !c.ok));
    }
}
