//! `GET /explain` on the admin port: what this proxy would do with a request to a destination,
//! computed by the code that serves requests — [`Destinations::resolve`], the core route
//! selection, and the balancer's endpoint state — not a re-implementation. `trellis explain`
//! asks a proxy of the calling service through the control plane.

use std::time::Duration;

pub use trellis_core::explain::ExplainQuery;
use trellis_core::explain::backend_shares;

use crate::http::destinations::{Destinations, Target};

/// How long explain waits for a destination this proxy had not used yet.
const DISCOVERY_WAIT: Duration = Duration::from_secs(3);

pub async fn explain(destinations: &Destinations, q: &ExplainQuery) -> serde_json::Value {
    let dest = match destinations.resolve(Some(&q.destination)) {
        Target::Known(d) => d,
        Target::Unknown(a) => {
            return serde_json::json!({"destination": q.destination, "error": format!("no service is known for {a:?}")});
        }
        Target::Missing => {
            return serde_json::json!({"destination": q.destination, "error": "no destination"});
        }
    };
    let snap = dest.known(DISCOVERY_WAIT).await;
    let rule = q.select(&snap.routes).cloned();
    let mut backends = Vec::new();
    for (name, weight, share) in backend_shares(rule.as_ref(), &dest.name) {
        let state = if name == dest.name {
            Some(dest.clone())
        } else {
            destinations.get_or_discover(name.as_str())
        };
        let mut view = match state {
            Some(s) => {
                s.known(DISCOVERY_WAIT).await;
                s.describe()
            }
            None => serde_json::json!({"error": "not tracked"}),
        };
        if let Some(obj) = view.as_object_mut() {
            obj.insert("service".into(), name.as_str().into());
            obj.insert("weight".into(), weight.into());
            obj.insert("sharePercent".into(), share.into());
            // Routes belong to the destination, not to each backend.
            obj.remove("routes");
        }
        backends.push(view);
    }
    serde_json::json!({
        "destination": dest.name.as_str(),
        "known": snap.known,
        "exists": snap.exists,
        "request": {"method": q.method, "path": q.path, "headers": q.headers},
        "route": rule,
        "faults": snap.policy.fault,
        "backends": backends,
    })
}
