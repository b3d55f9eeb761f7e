//! Root rotation with no downtime, in two steps the operator runs (`trellis ca rotate`, then
//! `trellis ca rotate --finish`):
//!
//! 1. A new root and intermediate sign from now on; the trust bundle holds old and new roots
//!    and is pushed to every proxy. Proxies install the bundle, wait a short grace so every
//!    peer has it, then renew their certificate under the new root. The control plane's own
//!    serving certificate follows after the same grace.
//! 2. Once every proxy has renewed, the old root leaves the bundle (pushed again).
//!
//! Connections already open are never re-verified, so none drops.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use trellis_api::tls::{self, CertResolver, ClientAuth};
use trellis_core::identity::SpiffeId;

use crate::ca::{Ca, CaError, RotationStatus};
use crate::hub::Hub;

/// How long after a bundle change before anyone presents a certificate from the new root.
pub const BUNDLE_GRACE: Duration = Duration::from_secs(3);

/// The gRPC server's TLS config: replaced when the trust bundle changes.
pub type ServerTls = Arc<RwLock<Arc<rustls::ServerConfig>>>;

pub struct CaOps {
    pub ca: Arc<Ca>,
    pub hub: Hub,
    pub server_tls: ServerTls,
    pub own_cert: Arc<CertResolver>,
    pub own_id: SpiffeId,
    pub own_ttl: Duration,
    /// When the current rotation started (Unix s); `None` after a restart mid-rotation.
    pub rotation_started: std::sync::Mutex<Option<i64>>,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl CaOps {
    /// A serving certificate for the control plane from the current intermediate.
    pub fn issue_own(&self) -> Result<Arc<rustls::sign::CertifiedKey>, CaError> {
        let (issued, key_pem) = self.ca.issue_own(&self.own_id, self.own_ttl)?;
        tls::certified_key(issued.chain_pem.as_bytes(), key_pem.as_bytes())
            .map_err(|e| CaError::Material(e.to_string()))
    }

    fn bundle_changed(&self) -> Result<(), CaError> {
        let bundle = self.ca.bundle_pem();
        let roots =
            tls::root_store(bundle.as_bytes()).map_err(|e| CaError::Material(e.to_string()))?;
        let config = tls::server_config(roots, self.own_cert.clone(), ClientAuth::Optional)
            .map_err(|e| CaError::Material(e.to_string()))?;
        *self.server_tls.write().unwrap_or_else(|p| p.into_inner()) = config;
        self.hub.broadcast_trust_bundle(bundle);
        Ok(())
    }

    pub fn start(self: &Arc<Self>) -> Result<RotationStatus, CaError> {
        let status = self.ca.start_rotation()?;
        *self
            .rotation_started
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(now_unix());
        self.bundle_changed()?;
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(BUNDLE_GRACE).await;
            match this.issue_own() {
                Ok(key) => this.own_cert.replace(key),
                Err(e) => {
                    tracing::error!(error = %e, "cannot reissue the control plane's certificate under the new root")
                }
            }
        });
        Ok(status)
    }

    /// Retires the old root. Refused while a connected proxy still reports a certificate
    /// issued before the rotation started (it would lose mTLS), unless `force`.
    pub fn finish(&self, force: bool) -> Result<RotationStatus, CaError> {
        let started = *self
            .rotation_started
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let (Some(started), false) = (started, force) {
            let ttl = self.ca.workload_ttl().as_secs() as i64;
            // Leaves are valid from issue - 5 min to issue + ttl: issued = expiry - ttl.
            let stale: Vec<String> = self
                .hub
                .proxy_reports()
                .into_iter()
                .filter(|p| p.cert_expires_unix > 0 && p.cert_expires_unix - ttl < started)
                .map(|p| format!("{}/{} {}", p.namespace, p.service, p.instances.join(",")))
                .collect();
            if !stale.is_empty() {
                return Err(CaError::NotRenewed(stale.join("; ")));
            }
        }
        let status = self.ca.finish_rotation()?;
        *self
            .rotation_started
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        self.own_cert.replace(self.issue_own()?);
        self.bundle_changed()?;
        Ok(status)
    }
}
