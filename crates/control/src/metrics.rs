//! Control-plane metrics (CONTRACT.md), registered once and passed down.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone)]
pub struct ControlMetrics {
    pub proxies_connected: Gauge,
    pub instances: Gauge,
    pub push_duration: Histogram,
    pub certificates_issued: Counter,
}

impl ControlMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            proxies_connected: Gauge::default(),
            instances: Gauge::default(),
            push_duration: Histogram::new([
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            certificates_issued: Counter::default(),
        };
        registry.register(
            "trellis_ca_certificates_issued",
            "Workload certificates signed by the mesh CA",
            m.certificates_issued.clone(),
        );
        let r = registry.sub_registry_with_prefix("trellis_control");
        r.register(
            "proxies_connected",
            "Proxies with an open session",
            m.proxies_connected.clone(),
        );
        r.register(
            "instances",
            "Live instances in the registry",
            m.instances.clone(),
        );
        r.register(
            "push_duration_seconds",
            "Time from a change to its updates being queued to every affected proxy",
            m.push_duration.clone(),
        );
        m
    }
}
