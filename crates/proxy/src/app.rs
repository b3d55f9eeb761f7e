//! Wiring: builds metrics, clients and stacks from [`ProxyConfig`], binds every listener and
//! starts serving. Used by the binary and by in-process integration tests alike.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use trellis_core::discovery::InstanceInfo;
use trellis_core::identity::SpiffeId;
use trellis_core::{Destination, ServiceName};

use crate::access_log::AccessLog;
use crate::admin::{self, AdminState, LogLevel};
use crate::config::ProxyConfig;
use crate::control::ControlClient;
use crate::drain::Drain;
use crate::http::client::{ClientSettings, Clients};
use crate::http::destinations::{DestinationState, Destinations};
use crate::http::inbound::ForwardToApp;
use crate::http::outbound::Forward;
use crate::http::stack;
use crate::http::tunnel::TunnelCtx;
use crate::identity::{InboundPolicyCell, MeshIdentity};
use crate::metrics::{Label, Metrics};
use crate::server::{self, ConnLimits, ListenerKind, ServerCtx};
use crate::trace::{TraceResource, Tracer};

/// Addresses actually bound (ports may have been 0).
#[derive(Debug, Clone, Serialize)]
pub struct Bound {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub upstreams: BTreeMap<ServiceName, SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}")]
pub struct BindError {
    what: String,
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// A started proxy.
pub struct Running {
    pub bound: Bound,
    pub drain: Drain,
    pub metrics: Metrics,
    drain_timeout: std::time::Duration,
    /// Time between deregistration and closing listeners (control-plane mode only).
    shutdown_grace: Option<std::time::Duration>,
    admin: admin::AdminHandle,
}

impl Running {
    /// Waits until drain is requested (admin `/shutdown`, or [`Drain::start`] by a signal
    /// handler), then drains. Returns whether all work finished before the deadline.
    pub async fn wait_and_drain(&self) -> bool {
        self.drain.requested().await;
        if let Some(grace) = self.shutdown_grace {
            // The control client deregistered; keep serving while callers learn about it.
            tracing::info!(
                ?grace,
                "deregistered; serving through the shutdown grace period"
            );
            tokio::time::sleep(grace).await;
        }
        tracing::info!(deadline = ?self.drain_timeout, "draining");
        let clean = self.drain.drain(self.drain_timeout).await;
        if clean {
            tracing::info!("drained");
        } else {
            tracing::warn!("drain deadline reached with work in flight");
        }
        self.admin.finish(std::time::Duration::from_secs(1)).await;
        clean
    }
}

async fn bind(what: impl Into<String>, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError {
        what: what.into(),
        addr,
        source,
    })
}

/// Binds all listeners and starts serving on the current (data-path) runtime; the admin server
/// gets its own thread and runtime.
/// Registration label carrying this proxy's admin address.
pub const ADMIN_LABEL: &str = "trellis.dev/admin";

pub async fn start(
    config: ProxyConfig,
    log_level: Arc<dyn LogLevel>,
) -> Result<Running, BindError> {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    registry.register(
        "trellis_proxy",
        "Proxy version and the service it serves",
        prometheus_client::metrics::info::Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("service", config.service.to_string()),
            ("namespace", config.namespace.to_string()),
        ]),
    );
    let access_log = AccessLog::start(&config.access_log).map_err(|source| BindError {
        what: "access log".into(),
        addr: ([0, 0, 0, 0], 0).into(),
        source,
    })?;
    let (tracer, exporter) = Tracer::new(
        &mut registry,
        TraceResource {
            service: config.service.to_string(),
            namespace: config.namespace.to_string(),
            instance: config.instance.clone(),
        },
    );
    // Static mode's flags; with a control plane, MeshConfig replaces this when it arrives.
    tracer.configure(config.tracing.as_ref());
    exporter.spawn().map_err(|source| BindError {
        what: "trace exporter".into(),
        addr: ([0, 0, 0, 0], 0).into(),
        source,
    })?;
    let drain = Drain::new();
    let dynamic = !config.control.is_empty();
    // With a control plane the proxy has a workload identity and speaks mTLS to its peers;
    // in static mode there is no CA, so peers are plaintext.
    let identity = dynamic.then(|| {
        Arc::new(MeshIdentity::new(SpiffeId::new(
            &config.trust_domain,
            config.namespace.clone(),
            config.service.clone(),
        )))
    });
    let inbound_policy = Arc::new(InboundPolicyCell::default());
    let clients = Clients::new(
        ClientSettings {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
        },
        identity.clone(),
        metrics.clone(),
    );
    let tunnels = TunnelCtx {
        metrics: metrics.clone(),
        access_log: access_log.clone(),
        drain: drain.clone(),
    };
    let (watch_tx, watch_rx) = tokio::sync::mpsc::unbounded_channel();
    let destinations = Arc::new(
        Destinations::with_discovery(
            &config.destinations,
            config.namespace.clone(),
            dynamic.then_some(watch_tx),
        )
        .with_local_zone(config.zone.as_deref().unwrap_or("")),
    );
    let ctx = Arc::new(ServerCtx {
        service: Label::from(config.service.as_str()),
        default_route: Label::from("default"),
        app: config.app,
        inbound_protocol: config.inbound_protocol,
        limits: ConnLimits {
            detect_timeout: config.detect_timeout,
            client_idle_timeout: config.client_idle_timeout,
            header_read_timeout: config.header_read_timeout,
            max_header_bytes: config.max_header_bytes,
        },
        destinations: destinations.clone(),
        clients: clients.clone(),
        outbound: stack::outbound(
            Forward::new(clients.clone(), tunnels.clone(), metrics.clone()),
            destinations.clone(),
            &metrics,
            &access_log,
            &tracer,
        ),
        inbound: stack::inbound(
            ForwardToApp::new(config.app, clients, tunnels),
            &metrics,
            &access_log,
            &tracer,
            inbound_policy.clone(),
        ),
        identity: identity.clone(),
        inbound_policy: inbound_policy.clone(),
        metrics: metrics.clone(),
        access_log: access_log.clone(),
        drain: drain.clone(),
    });

    let outbound = bind("outbound", config.outbound_addr).await?;
    let inbound = bind("inbound", config.inbound_addr).await?;
    let admin_listener =
        std::net::TcpListener::bind(config.admin_addr).map_err(|source| BindError {
            what: "admin".into(),
            addr: config.admin_addr,
            source,
        })?;
    let mut upstream_listeners = Vec::new();
    let mut bound_upstreams = BTreeMap::new();
    for (name, addr) in &config.upstreams {
        let listener = bind(format!("upstream {name}"), *addr).await?;
        let dest = destinations
            .get_or_discover(name.as_str())
            .unwrap_or_else(|| {
                // Declared as an upstream but with no destination entry: every call gets a clear
                // 503 no-endpoints rather than a refused connection.
                Arc::new(DestinationState::new(
                    name.clone(),
                    Destination {
                        protocol: Default::default(),
                        timeout: None,
                        endpoints: Vec::new(),
                    },
                ))
            });
        bound_upstreams.insert(name.clone(), local_addr(&listener, *addr));
        upstream_listeners.push((listener, dest));
    }
    let bound = Bound {
        outbound: local_addr(&outbound, config.outbound_addr),
        inbound: local_addr(&inbound, config.inbound_addr),
        admin: admin_listener.local_addr().unwrap_or(config.admin_addr),
        upstreams: bound_upstreams,
    };

    let ready = Arc::new(AtomicBool::new(false));
    let mesh_config = Arc::new(std::sync::Mutex::new(None));
    let control_connected = prometheus_client::metrics::gauge::Gauge::default();
    registry.register(
        "trellis_control_connected",
        "1 while a control-plane session is open",
        control_connected.clone(),
    );
    let describe = {
        let (destinations, mesh_config) = (destinations.clone(), mesh_config.clone());
        let (identity, policy) = (identity.clone(), inbound_policy.clone());
        let (access_log, tracer) = (access_log.clone(), tracer.clone());
        let (static_config, bound) = (
            serde_json::to_value(&config).unwrap_or_default(),
            bound.clone(),
        );
        Arc::new(move || {
            serde_json::json!({
                "config": static_config,
                "listening": bound,
                "destinations": destinations.describe(),
                "meshConfig": mesh_config.lock().ok().and_then(|m| serde_json::to_value(&*m).ok()),
                "accessLog": access_log.is_enabled(),
                "tracing": tracer.is_enabled(),
                "identity": identity.as_ref().map(|i| serde_json::json!({
                    "spiffeId": i.id.to_string(),
                    "expires": i.expires_unix(),
                })),
                "inboundPolicy": {
                    "mtls": format!("{:?}", policy.current().mtls).to_lowercase(),
                    "policies": policy.current().policies.iter().map(|p| p.label()).collect::<Vec<_>>(),
                },
            })
        })
    };
    let admin = admin::spawn(
        admin_listener,
        AdminState {
            registry,
            ready: ready.clone(),
            drain: drain.clone(),
            config: describe,
            log_level,
            destinations: destinations.clone(),
            tap: metrics.tap.clone(),
        },
    )
    .map_err(|source| BindError {
        what: "admin".into(),
        addr: bound.admin,
        source,
    })?;

    if let Some(identity) = identity.clone() {
        let advertise = config.advertise.unwrap_or_else(|| {
            // A wildcard bind is not dialable: advertise loopback with the bound port. Set
            // --advertise on hosts that other machines must reach.
            let mut a = bound.inbound;
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            a
        });
        let client = ControlClient {
            addresses: config.control.clone(),
            instance: InstanceInfo {
                service: config.service.clone(),
                namespace: config.namespace.clone(),
                instance_id: config.instance.clone(),
                address: advertise,
                zone: config.zone.clone().unwrap_or_default(),
                labels: {
                    // Where `trellis explain` can ask this proxy (reachable from the control
                    // plane only when they share a host, as in `trellis up`).
                    let mut labels = config.labels.clone();
                    labels.insert(ADMIN_LABEL.into(), bound.admin.to_string());
                    labels
                },
            },
            destinations: destinations.clone(),
            env: config.env.clone(),
            watch_requests: watch_rx,
            pinned: config.upstreams.keys().cloned().collect(),
            ready: ready.clone(),
            connected: control_connected,
            mesh_config,
            drain: drain.clone(),
            identity,
            token: config.token.clone().unwrap_or_default(),
            bootstrap_roots: config
                .trust_bundle
                .as_deref()
                .and_then(|b| trellis_api::tls::root_store(b.as_bytes()).ok())
                .unwrap_or_else(|| Arc::new(rustls::RootCertStore::empty())),
            inbound_policy,
            identity_expiry: metrics.identity_expiry.clone(),
            metrics: metrics.clone(),
            tracer,
            access_log,
        };
        client.spawn().map_err(|source| BindError {
            what: "control client".into(),
            addr: bound.admin,
            source,
        })?;
    } else {
        drop(watch_rx);
    }

    tokio::spawn(crate::http::health_check::run(
        destinations.clone(),
        ctx.clients.clone(),
        metrics.clone(),
    ));
    tokio::spawn(server::serve(outbound, ListenerKind::Outbound, ctx.clone()));
    tokio::spawn(server::serve(inbound, ListenerKind::Inbound, ctx.clone()));
    for (listener, dest) in upstream_listeners {
        tokio::spawn(server::serve(
            listener,
            ListenerKind::Upstream(dest),
            ctx.clone(),
        ));
    }
    if !dynamic {
        // Static mode: the config is complete as soon as the listeners are up. With a control
        // plane, the control client sets readiness when the first config arrives.
        ready.store(true, Ordering::Release);
    }
    tracing::info!(
        service = %config.service,
        outbound = %bound.outbound,
        inbound = %bound.inbound,
        admin = %bound.admin,
        upstreams = %bound
            .upstreams
            .iter()
            .map(|(name, addr)| format!("{name}={addr}"))
            .collect::<Vec<_>>()
            .join(","),
        "listening"
    );
    Ok(Running {
        bound,
        drain,
        metrics,
        drain_timeout: config.drain_timeout,
        shutdown_grace: dynamic.then_some(config.shutdown_grace),
        admin,
    })
}

fn local_addr(l: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    l.local_addr().unwrap_or(fallback)
}
