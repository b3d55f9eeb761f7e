//! The Trellis control plane: the resource store, the registry and push hub, the gRPC API for
//! proxies and the HTTP API for the CLI.
//!
//! [`start`] binds both listeners and runs everything on the caller's runtime; the `trellis
//! control` command and the in-process tests use it alike.

pub mod ca;
pub mod check;
pub mod grpc;
pub mod http_api;
pub mod hub;
pub mod metrics;
pub mod observe;
pub mod rotation;
pub mod store;
pub mod tls_server;
pub mod tokens;
pub mod traces;

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
    /// An operator-provided root CA (certificate and PKCS#8 key PEM files).
    pub ca: Option<(PathBuf, PathBuf)>,
    /// Lifetime of workload certificates (at least one minute).
    pub workload_cert_ttl: Duration,
}

impl ControlConfig {
    /// Defaults for everything but the addresses and the data dir.
    pub fn new(grpc_addr: SocketAddr, http_addr: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            grpc_addr,
            http_addr,
            data_dir,
            trust_domain: "trellis.local".into(),
            heartbeat_ttl: Duration::from_secs(10),
            ca: None,
            workload_cert_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store in {dir}: {source}")]
    Store {
        dir: String,
        source: store::StoreError,
    },
    #[error("CA: {0}")]
    Ca(#[from] ca::CaError),
    #[error("admin token in {path}: {reason}")]
    AdminToken { path: String, reason: String },
    #[error("TLS: {0}")]
    Tls(#[from] trellis_api::tls::TlsError),
    #[error("trust domain {0:?} must be lowercase letters, digits, '.', '-' or '_'")]
    TrustDomain(String),
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
    pub tokens: Arc<tokens::Tokens>,
    pub ca: Arc<ca::Ca>,
    pub admin_token: String,
    pub trust_domain: String,
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

/// The admin token in `<data-dir>/admin-token`, created (owner-only) on first start.
fn admin_token(data_dir: &std::path::Path) -> Result<String, StartError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("admin-token");
    let fail = |reason: String| StartError::AdminToken {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| fail("could not make randomness".into()))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| fail(e.to_string()))?;
    f.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| fail(e.to_string()))?;
    tracing::info!(path = %path.display(), "created the admin token");
    Ok(token)
}

/// How long the control plane's own serving certificate lives, and how often it is replaced.
const OWN_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const OWN_CERT_RENEW: Duration = Duration::from_secs(24 * 3600);

pub async fn start(config: ControlConfig) -> Result<Running, StartError> {
    if !trellis_core::identity::valid_trust_domain(&config.trust_domain) {
        return Err(StartError::TrustDomain(config.trust_domain.clone()));
    }
    let store: Arc<dyn Store> =
        Arc::new(
            RedbStore::open(&config.data_dir).map_err(|source| StartError::Store {
                dir: config.data_dir.display().to_string(),
                source,
            })?,
        );
    let ca = Arc::new(ca::Ca::load_or_create(
        &config.data_dir.join("ca"),
        config.ca.clone(),
        config.workload_cert_ttl,
    )?);
    let tokens = Arc::new(tokens::Tokens::new(store.clone()));
    let admin_token = admin_token(&config.data_dir)?;
    let mut registry = Registry::default();
    let metrics = ControlMetrics::new(&mut registry);
    let hub = Hub::new(metrics.clone());
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

    // The gRPC API is TLS only, with a certificate from our own CA, replaced well before it
    // expires; proxies without a certificate yet may connect (to present a join token).
    let own_id = trellis_core::identity::SpiffeId::control_plane(&config.trust_domain);
    let (issued, key_pem) = ca.issue_own(&own_id, OWN_CERT_TTL)?;
    let own_cert = trellis_api::tls::CertResolver::new(trellis_api::tls::certified_key(
        issued.chain_pem.as_bytes(),
        key_pem.as_bytes(),
    )?);
    let server_tls: rotation::ServerTls =
        Arc::new(std::sync::RwLock::new(trellis_api::tls::server_config(
            trellis_api::tls::root_store(ca.bundle_pem().as_bytes())?,
            own_cert.clone(),
            trellis_api::tls::ClientAuth::Optional,
        )?));
    let ca_ops = Arc::new(rotation::CaOps {
        ca: ca.clone(),
        hub: hub.clone(),
        server_tls: server_tls.clone(),
        own_cert,
        own_id,
        own_ttl: OWN_CERT_TTL,
        rotation_started: std::sync::Mutex::new(None),
    });
    let (ops, stop) = (ca_ops.clone(), shutdown.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(OWN_CERT_RENEW) => {}
            }
            match ops.issue_own() {
                Ok(key) => ops.own_cert.replace(key),
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the control plane's certificate")
                }
            }
        }
    });
    let observer = Arc::new(observe::Observer::new(hub.clone(), store.clone()));
    let grpc = grpc::ControlService::new(
        hub.clone(),
        config.heartbeat_ttl,
        ca.clone(),
        tokens.clone(),
        config.trust_domain.clone(),
        metrics.certificates_issued.clone(),
        observer.clone(),
    )
    .into_server();
    let stop = shutdown.clone();
    let incoming = tls_server::incoming(grpc_listener, server_tls, shutdown.clone());
    tokio::spawn(async move {
        let incoming = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(incoming);
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
        admin_token: admin_token.clone(),
        tokens: tokens.clone(),
        ca: ca.clone(),
        ca_ops,
        trust_domain: config.trust_domain.clone(),
        observer,
        http_addr,
        traces: Arc::default(),
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
        tokens,
        ca,
        admin_token,
        trust_domain: config.trust_domain,
        shutdown,
    })
}
