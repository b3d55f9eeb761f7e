//! The Trellis control plane: the resource store, the registry and push hub, the gRPC API for
//! proxies and the HTTP API for the CLI.
//!
//! [`start`] binds both listeners and runs everything on the caller's runtime; the `trellis
//! control` command and the in-process tests use it alike.

pub mod grpc;
pub mod http_api;
pub mod hub;
pub mod metrics;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::metrics::ControlMetrics;
use crate::store::{RedbStore, Store};

/// Settings of `trellis control`.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub trust_domain: String,
    /// An instance that sends nothing for this long is removed from the registry.
    pub heartbeat_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store in {dir}: {source}")]
    Store {
        dir: String,
        source: store::StoreError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running control plane.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub hub: Hub,
    pub store: Arc<dyn Store>,
    shutdown: CancellationToken,
}

impl Running {
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn stopped(&self) {
        self.shutdown.cancelled().await;
    }
}

pub async fn start(config: ControlConfig) -> Result<Running, StartError> {
    let store: Arc<dyn Store> =
        Arc::new(
            RedbStore::open(&config.data_dir).map_err(|source| StartError::Store {
                dir: config.data_dir.display().to_string(),
                source,
            })?,
        );
    let mut registry = Registry::default();
    let metrics = ControlMetrics::new(&mut registry);
    let hub = Hub::new(metrics);
    let shutdown = CancellationToken::new();

    // Resources → hub, now and after every committed change.
    let mut changes = store.subscribe();
    let (s, h) = (store.clone(), hub.clone());
    let load = move || match s.list(None) {
        Ok(items) => {
            h.resources_changed(&items.into_iter().map(|i| i.resource).collect::<Vec<_>>())
        }
        Err(e) => tracing::error!(error = %e, "cannot read resources"),
    };
    load();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            load();
        }
    });

    // The registry survives restarts: load it, and persist it shortly after every change
    // (changes within 100 ms are written together).
    match store.load_registry() {
        Ok(instances) if !instances.is_empty() => {
            tracing::info!(
                instances = instances.len(),
                "restored registry; waiting for proxies to reconnect"
            );
            hub.preload(instances);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot load the saved registry"),
    }
    let (h, s, stop) = (hub.clone(), store.clone(), shutdown.clone());
    tokio::spawn(async move {
        let mut saved = u64::MAX;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = h.registry_changed() => {}
            }
            // Batch a burst of registrations into one write.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (version, instances) = h.registry();
            if version == saved {
                continue;
            }
            let s = s.clone();
            match tokio::task::spawn_blocking(move || s.save_registry(&instances)).await {
                Ok(Ok(())) => saved = version,
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot save the registry"),
                Err(_) => {}
            }
        }
    });

    // Heartbeat expiry.
    let (h, ttl, stop) = (hub.clone(), config.heartbeat_ttl, shutdown.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1).min(ttl));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => { h.expire(ttl); }
            }
        }
    });

    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let grpc_listener = bind(config.grpc_addr).await?;
    let http_listener = bind(config.http_addr).await?;
    let grpc_addr = grpc_listener.local_addr().unwrap_or(config.grpc_addr);
    let http_addr = http_listener.local_addr().unwrap_or(config.http_addr);

    let grpc = grpc::ControlService::new(hub.clone(), config.heartbeat_ttl).into_server();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let incoming =
            tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
        if let Err(e) = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(grpc)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });

    let api = http_api::router(Arc::new(http_api::ApiState {
        store: store.clone(),
        hub: hub.clone(),
        registry,
    }));
    let stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(http_listener, api)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "HTTP API failed");
        }
    });
    tracing::info!(grpc = %grpc_addr, http = %http_addr, data_dir = %config.data_dir.display(), trust_domain = %config.trust_domain, "control plane listening");
    Ok(Running {
        grpc_addr,
        http_addr,
        hub,
        store,
        shutdown,
    })
}
