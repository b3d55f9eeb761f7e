//! This proxy's workload identity and what it enforces on inbound traffic.
//!
//! [`MeshIdentity`] holds the current certificate and trust bundle; the control client fills
//! it (first certificate from a join token, renewals at ~70% of the lifetime) and the data path
//! reads it per new connection. Open connections keep the certificate they started with, so a
//! renewal drops nothing. [`InboundPolicy`] is the pushed authorization state plus the mesh's
//! mTLS mode, swapped as a whole on every update so a request sees one consistent version.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use rcgen::string::Ia5String;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::RootCertStore;
use trellis_api::tls::{self, CertResolver, ClientAuth, TlsError};
use trellis_core::discovery::RouteTable;
use trellis_core::identity::SpiffeId;
use trellis_core::resources::{DefaultPolicy, MtlsMode};

/// A new key pair and a CSR for `id`; the key stays in this process.
pub fn new_key_and_csr(id: &SpiffeId) -> Result<(String, String), TlsError> {
    let fail = |e: rcgen::Error| TlsError::Certificate(e.to_string());
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        Ia5String::try_from(id.to_string()).map_err(fail)?,
    )];
    let csr = params.serialize_request(&key).map_err(fail)?;
    Ok((key.serialize_pem(), csr.pem().map_err(fail)?))
}

/// TLS material in force: swapped whole when the trust bundle changes.
pub struct TlsState {
    pub roots: Arc<RootCertStore>,
    pub bundle_pem: String,
    pub cert: Arc<CertResolver>,
    pub server: Arc<rustls::ServerConfig>,
    clients: Mutex<HashMap<SpiffeId, Arc<rustls::ClientConfig>>>,
}

pub struct MeshIdentity {
    pub id: SpiffeId,
    tls: RwLock<Option<Arc<TlsState>>>,
    expires_unix: std::sync::atomic::AtomicI64,
    /// Set when the trust bundle changed: renew under the new root.
    renewal_requested: std::sync::atomic::AtomicBool,
}

impl MeshIdentity {
    pub fn new(id: SpiffeId) -> Self {
        Self {
            id,
            tls: RwLock::new(None),
            expires_unix: std::sync::atomic::AtomicI64::new(0),
            renewal_requested: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Trusts a new bundle (a root rotation) with the current certificate, and asks for a
    /// renewal under the new root.
    pub fn set_bundle(&self, bundle_pem: &str) -> Result<(), TlsError> {
        let mut slot = self.tls.write().unwrap_or_else(|p| p.into_inner());
        let Some(state) = slot.as_ref() else {
            return Ok(());
        };
        if state.bundle_pem == bundle_pem {
            return Ok(());
        }
        let roots = tls::root_store(bundle_pem.as_bytes())?;
        let server = tls::server_config(roots.clone(), state.cert.clone(), ClientAuth::Required)?;
        *slot = Some(Arc::new(TlsState {
            roots,
            bundle_pem: bundle_pem.to_owned(),
            cert: state.cert.clone(),
            server,
            clients: Mutex::default(),
        }));
        self.renewal_requested
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Whether a renewal was asked for since the last call.
    pub fn take_renewal_request(&self) -> bool {
        self.renewal_requested
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    pub fn tls(&self) -> Option<Arc<TlsState>> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn expires_unix(&self) -> i64 {
        self.expires_unix.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Installs a new certificate (and bundle). New handshakes use it at once.
    pub fn install(
        &self,
        chain_pem: &str,
        key_pem: &str,
        bundle_pem: &str,
        expires_unix: i64,
    ) -> Result<(), TlsError> {
        let key = tls::certified_key(chain_pem.as_bytes(), key_pem.as_bytes())?;
        let mut slot = self.tls.write().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(state) if state.bundle_pem == bundle_pem => state.cert.replace(key),
            _ => {
                let roots = tls::root_store(bundle_pem.as_bytes())?;
                let cert = CertResolver::new(key);
                let server = tls::server_config(roots.clone(), cert.clone(), ClientAuth::Required)?;
                *slot = Some(Arc::new(TlsState {
                    roots,
                    bundle_pem: bundle_pem.to_owned(),
                    cert,
                    server,
                    clients: Mutex::default(),
                }));
            }
        }
        self.expires_unix
            .store(expires_unix, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl TlsState {
    /// A client config that accepts only `expected` (cached: one per peer identity).
    pub fn client_config(
        &self,
        expected: &SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut cache = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(expected) {
            return Ok(c.clone());
        }
        let config = tls::client_config(
            self.roots.clone(),
            expected.clone(),
            Some(self.cert.clone()),
        )?;
        cache.insert(expected.clone(), config.clone());
        Ok(config)
    }
}

/// Authorization state for this proxy's inbound side.
#[derive(Debug, Clone, Default)]
pub struct InboundPolicy {
    pub policies: Vec<trellis_core::authz::InboundPolicy>,
    pub routes: RouteTable,
    pub mtls: MtlsMode,
    pub default_policy: DefaultPolicy,
    pub rate_limits: Vec<trellis_core::policy::InboundRateLimit>,
}

impl InboundPolicy {
    /// The route (rule name) of this service a request matches, for route-scoped policies.
    pub fn route_of<B>(&self, req: &http::Request<B>) -> Option<&str> {
        let facts = trellis_core::discovery::RequestFacts {
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: &crate::http::headers::RequestHeaders(req.headers()),
        };
        self.routes.select(&facts).map(|r| r.name.as_str())
    }
}

/// The current [`InboundPolicy`], replaced whole on every update.
#[derive(Default)]
pub struct InboundPolicyCell(RwLock<Arc<InboundPolicy>>);

impl InboundPolicyCell {
    pub fn current(&self) -> Arc<InboundPolicy> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut InboundPolicy)) {
        let mut slot = self.0.write().unwrap_or_else(|p| p.into_inner());
        let mut next = (**slot).clone();
        f(&mut next);
        *slot = Arc::new(next);
    }

    pub fn set_policies(
        &self,
        policies: Vec<trellis_core::authz::InboundPolicy>,
        routes: RouteTable,
        rate_limits: Vec<trellis_core::policy::InboundRateLimit>,
    ) {
        self.update(|p| {
            p.policies = policies;
            p.routes = routes;
            p.rate_limits = rate_limits;
        });
    }
}
