//! Active health checks (DestinationPolicy `healthCheck`): alongside passive ejection, every
//! endpoint of a destination that asks for them gets `GET <path>` every `interval` (through
//! its proxy, over the mesh, so the check reaches the app). `unhealthyThreshold` failures in a
//! row take the endpoint out of rotation; one success brings it back. Checks only run for
//! destinations this proxy is using, so their cost follows what the app calls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Uri};
use tokio::time::Instant;
use trellis_core::policy::ActiveHealthCheck;
use trellis_core::{Endpoint, ServiceName};

use crate::body;
use crate::http::balance::EndpointLoad;
use crate::http::client::Clients;
use crate::http::destinations::Destinations;
use crate::http::outbound::prepare_for_mesh;
use crate::metrics::{EndpointLabels, Label, Metrics};

/// Header on check requests, so apps and access logs can tell them apart.
pub const HEALTH_CHECK_HEADER: &str = "x-trellis-health-check";

/// How often the checker looks for checks that are due.
const TICK: Duration = Duration::from_millis(250);

/// Runs forever (spawned once per proxy).
pub async fn run(destinations: Arc<Destinations>, clients: Clients, metrics: Metrics) {
    let mut last: HashMap<(ServiceName, SocketAddr), Instant> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let mut seen = Vec::new();
        for state in destinations.all() {
            let snap = state.snapshot();
            let Some(check) = snap.policy.health_check.clone() else {
                continue;
            };
            for (endpoint, load) in snap.endpoints.iter().zip(snap.loads.iter()) {
                let key = (state.name.clone(), endpoint.address);
                seen.push(key.clone());
                if last
                    .get(&key)
                    .is_some_and(|t| now.saturating_duration_since(*t) < check.interval)
                {
                    continue;
                }
                last.insert(key, now);
                tokio::spawn(probe(
                    clients.clone(),
                    state.name.clone(),
                    endpoint.clone(),
                    load.clone(),
                    check.clone(),
                    metrics.clone(),
                ));
            }
        }
        last.retain(|k, _| seen.contains(k));
    }
}

async fn probe(
    clients: Clients,
    service: ServiceName,
    endpoint: Endpoint,
    load: Arc<EndpointLoad>,
    check: ActiveHealthCheck,
    metrics: Metrics,
) {
    let ok = tokio::time::timeout(
        check.interval.min(Duration::from_secs(5)),
        send(&clients, &service, &endpoint, &check.path),
    )
    .await
    .is_ok_and(|healthy| healthy);
    if load.health.record_check(ok, check.unhealthy_threshold) {
        let gauge = metrics.circuit_open.get_or_create(&EndpointLabels {
            dst: Label::from(service.as_str()),
            endpoint: Label::from(endpoint.address.to_string()),
        });
        if ok {
            tracing::info!(dst = %service, endpoint = %endpoint.address, "endpoint passes its health checks again");
            gauge.set(0);
        } else {
            tracing::warn!(dst = %service, endpoint = %endpoint.address, path = %check.path, "endpoint failed its health checks; out of rotation");
            gauge.set(1);
        }
    }
}

async fn send(clients: &Clients, service: &ServiceName, endpoint: &Endpoint, path: &str) -> bool {
    let Ok(uri) = format!("http://{service}{path}").parse::<Uri>() else {
        return false;
    };
    let Ok(mut req) = Request::get(uri)
        .header(HEALTH_CHECK_HEADER, "1")
        .body(body::empty())
    else {
        return false;
    };
    let result = if endpoint.meshed {
        if prepare_for_mesh(&mut req).is_err() {
            return false;
        }
        let peer = endpoint.namespace.as_ref().map(|ns| (ns, service));
        clients.h2.send(endpoint.address, peer, req).await
    } else {
        clients.send_http1(endpoint.address, req).await
    };
    result.is_ok_and(|rsp| rsp.status().is_success())
}
