//! TLS building blocks shared by the proxy (between proxies, and to the control plane) and the
//! control plane (its gRPC API): TLS 1.3 only, the `ring` provider, SPIFFE identities in URI
//! SANs, certificates that can be swapped without touching open connections.

use std::sync::{Arc, LazyLock, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use trellis_core::identity::SpiffeId;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// ALPN between proxies and to the control plane: both speak HTTP/2 only.
pub const ALPN_H2: &[u8] = b"h2";

// The provider is immutable configuration (which algorithms), not state; one per process.
static PROVIDER: LazyLock<Arc<CryptoProvider>> =
    LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));

pub fn provider() -> Arc<CryptoProvider> {
    PROVIDER.clone()
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate in PEM")]
    NoCertificate,
    #[error("PEM: {0}")]
    Pem(String),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Certificates from PEM (a chain or a bundle), in order.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// A trust bundle: every root in it is trusted (several during a root rotation).
pub fn root_store(bundle_pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(bundle_pem)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// A certificate chain (leaf first) and its private key, checked to belong together.
pub fn certified_key(chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = parse_certs(chain_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &PROVIDER)?))
}

/// What a certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The first `spiffe://` URI SAN that parses as a Trellis identity.
    pub identity: Option<SpiffeId>,
    /// Every URI SAN, as written.
    pub uris: Vec<String>,
    pub not_before: i64,
    pub not_after: i64,
    pub serial: String,
}

pub fn cert_info(der: &[u8]) -> Result<CertInfo, TlsError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| TlsError::Certificate(e.to_string()))?;
    let uris: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let identity = uris.iter().find_map(|u| SpiffeId::parse(u).ok());
    Ok(CertInfo {
        identity,
        uris,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial: cert.raw_serial_as_string(),
    })
}

/// The verified peer's identity, from the certificates a finished handshake recorded.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    cert_info(leaf.as_ref()).ok()?.identity
}

/// This process's current certificate; new handshakes use whatever was stored last, open
/// connections keep the one they started with.
#[derive(Debug)]
pub struct CertResolver(RwLock<Arc<CertifiedKey>>);

impl CertResolver {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self(RwLock::new(key)))
    }

    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl rustls::server::ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hints: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Whether the server asks for a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Between proxies: no certificate, no connection.
    Required,
    /// The control plane: a proxy bootstrapping with a join token has no certificate yet.
    Optional,
}

/// A TLS 1.3 server config: our certificate, client certificates checked against `roots`.
pub fn server_config(
    roots: Arc<RootCertStore>,
    cert: Arc<CertResolver>,
    client_auth: ClientAuth,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = WebPkiClientVerifier::builder_with_provider(roots, PROVIDER.clone());
    let verifier = match client_auth {
        ClientAuth::Required => builder.build(),
        ClientAuth::Optional => builder.allow_unauthenticated().build(),
    }
    .map_err(|e| TlsError::Certificate(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(PROVIDER.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A TLS 1.3 client config that accepts only a server presenting `expected` (chained to
/// `roots`), and presents `cert` if given.
pub fn client_config(
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    cert: Option<Arc<CertResolver>>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let verifier = Arc::new(SpiffeServerVerifier { roots, expected });
    let builder = rustls::ClientConfig::builder_with_provider(PROVIDER.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match cert {
        Some(cert) => builder.with_client_cert_resolver(cert),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // A resumed session would skip the identity check; handshakes are rare anyway (one
    // HTTP/2 connection per peer).
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// The name handed to rustls when connecting; identities are checked by URI SAN instead.
pub fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}

/// Verifies the chain against the trust bundle, then that the leaf's SPIFFE ID is the one
/// expected (webpki's name check knows only DNS names and IPs).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            PROVIDER.signature_verification_algorithms.all,
        )?;
        let info = cert_info(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if info.identity.as_ref() == Some(&self.expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &PROVIDER.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &PROVIDER.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        PROVIDER
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A failed handshake's `result` label (`trellis_tls_handshakes_total`) and log reason.
pub fn classify_handshake_error(e: &std::io::Error) -> &'static str {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io_error",
        };
    };
    match tls {
        E::NoCertificatesPresented => "no_client_cert",
        E::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "cert_expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "cert_not_yet_valid",
            C::UnknownIssuer => "unknown_ca",
            C::NotValidForName | C::NotValidForNameContext { .. } => "wrong_identity",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => "bad_key_usage",
            C::BadSignature => "bad_signature",
            _ => "invalid_cert",
        },
        E::AlertReceived(A::CertificateExpired) => "peer_says_cert_expired",
        E::AlertReceived(A::UnknownCA) => "peer_says_unknown_ca",
        E::AlertReceived(A::CertificateRequired) => "peer_requires_client_cert",
        E::AlertReceived(A::BadCertificate | A::CertificateUnknown | A::AccessDenied) => {
            "peer_rejected_cert"
        }
        E::AlertReceived(_) => "alert",
        E::NoApplicationProtocol => "no_alpn",
        E::PeerIncompatible(_) => "incompatible",
        E::PeerMisbehaved(_) | E::InvalidMessage(_) => "not_tls",
        _ => "other",
    }
}

/// A human hint for a handshake failure class (logged next to it).
pub fn handshake_hint(class: &str) -> &'static str {
    match class {
        "cert_expired" | "peer_says_cert_expired" => {
            "a certificate has expired: is the proxy renewing (control plane reachable) and are clocks in sync?"
        }
        "cert_not_yet_valid" => "a certificate is not valid yet: clock skew between hosts?",
        "unknown_ca" | "peer_says_unknown_ca" => {
            "the peer's certificate is not from this mesh's CA (or the trust bundle is stale)"
        }
        "wrong_identity" => "the peer presented another service's identity",
        "no_client_cert" | "peer_requires_client_cert" => {
            "mTLS requires a client certificate; the caller is not a mesh proxy with an identity"
        }
        "not_tls" => "the peer did not speak TLS 1.3",
        _ => "",
    }
}

/// A gRPC channel to `addr` over TLS with `config` (TLS is done here, so the URI scheme is
/// `http://` on purpose; tonic's own TLS cannot take a custom verifier or a certificate that
/// changes).
pub async fn grpc_channel(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    connect_timeout: std::time::Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(std::time::Duration::from_secs(5))
        .keep_alive_timeout(std::time::Duration::from_secs(5));
    let connector = tower::service_fn(move |uri: tonic::transport::Uri| {
        let config = config.clone();
        async move {
            let host = uri.host().unwrap_or("127.0.0.1").to_owned();
            let port = uri.port_u16().unwrap_or(7440);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name(), tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    endpoint.connect_with_connector(connector).await
}
