//! The mesh CA: a root and an intermediate in `<data-dir>/ca/` (created on first start, or a
//! root the operator provides), signing short-lived workload certificates from CSRs. Keys of
//! workloads never come here; only their CSRs do.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use std::sync::Arc;

use ring::rand::{SecureRandom, SystemRandom};
use trellis_core::identity::SpiffeId;

/// Shortest workload certificate lifetime (for tests of renewal).
pub const MIN_WORKLOAD_TTL: Duration = Duration::from_secs(60);
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// An intermediate closer than this to expiry is replaced at start.
const INTERMEDIATE_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates start a little in the past, so small clock skew between hosts does no harm.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("CA material: {0}")]
    Material(String),
    #[error("CSR: {0}")]
    BadCsr(String),
    #[error(
        "these proxies still hold certificates from the old root (wait a few seconds for them to renew, or use --force): {0}"
    )]
    NotRenewed(String),
    #[error("CSR asks for identity {asked}, but the caller may only have {allowed}")]
    WrongIdentity { asked: String, allowed: String },
}

impl CaError {
    /// Whether the caller sent something wrong (rather than the CA failing).
    pub fn is_callers_fault(&self) -> bool {
        matches!(self, CaError::BadCsr(_) | CaError::WrongIdentity { .. })
    }
}

/// A signed workload certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf, then intermediate.
    pub chain_pem: String,
    pub not_after_unix: i64,
    pub serial: String,
}

pub struct Ca {
    dir: PathBuf,
    signing: std::sync::RwLock<Arc<Signing>>,
    workload_ttl: Duration,
    rng: SystemRandom,
    /// Whether the root is operator-provided (then `trellis ca rotate` cannot make a new one).
    provided: bool,
}

/// What signs now, and what is trusted.
struct Signing {
    intermediate: Issuer<'static, KeyPair>,
    intermediate_pem: String,
    bundle_pem: String,
}

/// Where a root rotation stands.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationStatus {
    /// `rotating` (old and new root trusted, new one signing) or `done` (one root).
    pub phase: String,
    pub roots: usize,
}

fn material(e: impl std::fmt::Display) -> CaError {
    CaError::Material(e.to_string())
}

fn read(path: &Path) -> Result<Option<String>, CaError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CaError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Writes a file atomically; private keys readable by the owner only.
fn write(path: &Path, contents: &str, private: bool) -> Result<(), CaError> {
    let file_err = |e: std::io::Error| CaError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(&tmp).map_err(file_err)?;
    f.write_all(contents.as_bytes()).map_err(file_err)?;
    f.sync_all().map_err(file_err)?;
    std::fs::rename(&tmp, path).map_err(file_err)
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Ca {
    /// Loads the CA from `dir` (`<data-dir>/ca`), creating what is missing. With `provided`
    /// (cert and key PEM files), that certificate is the root the mesh trusts.
    pub fn load_or_create(
        dir: &Path,
        provided: Option<(PathBuf, PathBuf)>,
        workload_ttl: Duration,
    ) -> Result<Self, CaError> {
        std::fs::create_dir_all(dir).map_err(|e| CaError::File {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let rng = SystemRandom::new();
        let provided_root = provided.is_some();
        let (root_pem, root_key_pem) = match provided {
            Some((cert, key)) => {
                let missing = |p: &Path| CaError::File {
                    path: p.display().to_string(),
                    reason: "not found".into(),
                };
                (
                    read(&cert)?.ok_or_else(|| missing(&cert))?,
                    read(&key)?.ok_or_else(|| missing(&key))?,
                )
            }
            None => match (read(&dir.join("root.pem"))?, read(&dir.join("root.key"))?) {
                (Some(c), Some(k)) => (c, k),
                _ => new_root(dir, &rng)?,
            },
        };
        let signing = signing_from(dir, &root_pem, &root_key_pem, &rng)?;
        Ok(Self {
            dir: dir.to_owned(),
            signing: std::sync::RwLock::new(Arc::new(signing)),
            workload_ttl: workload_ttl.max(MIN_WORKLOAD_TTL),
            rng,
            provided: provided_root,
        })
    }
}

fn new_root(dir: &Path, rng: &SystemRandom) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(material)?;
    let params = ca_params(
        &format!(
            "Trellis root CA {}",
            trellis_core::time::rfc3339(SystemTime::now())
        ),
        BasicConstraints::Unconstrained,
        ROOT_TTL,
        serial(rng)?,
    );
    let root = CertifiedIssuer::self_signed(params, key).map_err(material)?;
    let (c, k) = (root.pem(), root.key().serialize_pem());
    write(&dir.join("root.key"), &k, true)?;
    write(&dir.join("root.pem"), &c, false)?;
    tracing::info!(dir = %dir.display(), "created a new root CA");
    Ok((c, k))
}

/// The intermediate under `root` (reused from `dir` when it is this root's and not close to
/// expiry) and the bundle (`bundle.pem`, which must contain the root).
fn signing_from(
    dir: &Path,
    root_pem: &str,
    root_key_pem: &str,
    rng: &SystemRandom,
) -> Result<Signing, CaError> {
    {
        let root_key = KeyPair::from_pem(root_key_pem)
            .map_err(|e| material(format!("root key (PKCS#8 ECDSA P-256 PEM expected): {e}")))?;
        let root = Issuer::from_ca_cert_pem(root_pem, root_key)
            .map_err(|e| material(format!("root certificate: {e}")))?;
        let root_der = trellis_api::tls::parse_certs(root_pem.as_bytes()).map_err(material)?;
        let root_der = root_der[0].clone();

        let existing = match (
            read(&dir.join("intermediate.pem"))?,
            read(&dir.join("intermediate.key"))?,
        ) {
            (Some(c), Some(k)) if intermediate_usable(&c, root_der.as_ref())? => Some((c, k)),
            _ => None,
        };
        let (int_pem, int_key_pem) = match existing {
            Some(pair) => pair,
            None => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(material)?;
                let params = ca_params(
                    "Trellis intermediate CA",
                    BasicConstraints::Constrained(0),
                    INTERMEDIATE_TTL,
                    serial(rng)?,
                );
                let int = CertifiedIssuer::signed_by(params, key, &root).map_err(material)?;
                let (c, k) = (int.pem(), int.key().serialize_pem());
                write(&dir.join("intermediate.key"), &k, true)?;
                write(&dir.join("intermediate.pem"), &c, false)?;
                tracing::info!("created a new intermediate CA");
                (c, k)
            }
        };
        let int_key = KeyPair::from_pem(&int_key_pem).map_err(material)?;
        let intermediate = Issuer::from_ca_cert_pem(&int_pem, int_key).map_err(material)?;
        // Every root the mesh trusts. More than one during a root rotation.
        let bundle_pem = match read(&dir.join("bundle.pem"))? {
            Some(b) if b.contains(root_pem.trim()) => b,
            _ => {
                write(&dir.join("bundle.pem"), root_pem, false)?;
                root_pem.to_owned()
            }
        };
        Ok(Signing {
            intermediate,
            intermediate_pem: int_pem,
            bundle_pem,
        })
    }
}

impl Ca {
    fn signing(&self) -> Arc<Signing> {
        self.signing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Root rotation, step one: a new root and intermediate sign from now on; the bundle
    /// trusts both the old and the new root until [`Ca::finish_rotation`].
    pub fn start_rotation(&self) -> Result<RotationStatus, CaError> {
        if self.provided {
            return Err(material(
                "the root was provided with --ca-cert; rotate it by restarting with a new one",
            ));
        }
        let mut slot = self.signing.write().unwrap_or_else(|p| p.into_inner());
        let old_root = read(&self.dir.join("root.pem"))?.unwrap_or_default();
        // A new intermediate is made because the old one is not this root's.
        let (root_pem, root_key_pem) = new_root(&self.dir, &self.rng)?;
        write(
            &self.dir.join("bundle.pem"),
            &format!("{}\n{}", root_pem.trim(), old_root.trim()),
            false,
        )?;
        let signing = signing_from(&self.dir, &root_pem, &root_key_pem, &self.rng)?;
        *slot = Arc::new(signing);
        tracing::info!("root rotation started: new root signs; old and new roots are trusted");
        Ok(self.status_of(&slot))
    }

    /// Root rotation, step two: only the current root stays in the bundle.
    pub fn finish_rotation(&self) -> Result<RotationStatus, CaError> {
        let mut slot = self.signing.write().unwrap_or_else(|p| p.into_inner());
        let root_pem = read(&self.dir.join("root.pem"))?.unwrap_or_default();
        write(&self.dir.join("bundle.pem"), &root_pem, false)?;
        *slot = Arc::new(Signing {
            intermediate: Issuer::from_ca_cert_pem(
                &slot.intermediate_pem,
                KeyPair::from_pem(&read(&self.dir.join("intermediate.key"))?.unwrap_or_default())
                    .map_err(material)?,
            )
            .map_err(material)?,
            intermediate_pem: slot.intermediate_pem.clone(),
            bundle_pem: root_pem,
        });
        tracing::info!("root rotation finished: the old root is no longer trusted");
        Ok(self.status_of(&slot))
    }

    pub fn rotation_status(&self) -> RotationStatus {
        self.status_of(&self.signing())
    }

    fn status_of(&self, signing: &Signing) -> RotationStatus {
        let roots =
            trellis_api::tls::parse_certs(signing.bundle_pem.as_bytes()).map_or(0, |c| c.len());
        RotationStatus {
            phase: if roots > 1 { "rotating" } else { "done" }.into(),
            roots,
        }
    }

    pub fn bundle_pem(&self) -> String {
        self.signing().bundle_pem.clone()
    }

    pub fn intermediate_pem(&self) -> String {
        self.signing().intermediate_pem.clone()
    }

    pub fn workload_ttl(&self) -> Duration {
        self.workload_ttl
    }

    /// The identity a CSR asks for (its URI SAN).
    pub fn requested_identity(csr_pem: &str) -> Result<SpiffeId, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        requested(&csr)
    }

    /// Signs the CSR's key for `allowed`, which the caller proved it may have. The CSR must
    /// ask for exactly that identity, with an ECDSA P-256 key.
    pub fn sign(&self, csr_pem: &str, allowed: &SpiffeId) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::BadCsr("the key must be ECDSA P-256".into()));
        }
        let asked = requested(&csr)?;
        if &asked != allowed {
            return Err(CaError::WrongIdentity {
                asked: asked.to_string(),
                allowed: allowed.to_string(),
            });
        }
        self.issue(&csr.public_key, allowed, self.workload_ttl)
    }

    /// A certificate for a key made here: the control plane's own serving certificate.
    pub fn issue_own(&self, id: &SpiffeId, ttl: Duration) -> Result<(Issued, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(material)?;
        let issued = self.issue(&key, id, ttl)?;
        Ok((issued, key.serialize_pem()))
    }

    fn issue(
        &self,
        key: &impl rcgen::PublicKeyData,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<Issued, CaError> {
        let now = SystemTime::now();
        let not_after = now + ttl;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(id.to_string()).map_err(material)?,
        )];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = (now - BACKDATE).into();
        p.not_after = not_after.into();
        let serial = serial(&self.rng)?;
        p.serial_number = Some(serial.clone());
        p.use_authority_key_identifier_extension = true;
        let signing = self.signing();
        let leaf = p.signed_by(key, &signing.intermediate).map_err(material)?;
        Ok(Issued {
            chain_pem: format!("{}{}", leaf.pem(), signing.intermediate_pem),
            not_after_unix: unix(not_after),
            serial: serial.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

fn requested(csr: &CertificateSigningRequestParams) -> Result<SpiffeId, CaError> {
    let uris: Vec<&str> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|s| match s {
            SanType::URI(u) => Some(u.as_str()),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(CaError::BadCsr(format!(
            "exactly one URI SAN (the SPIFFE ID) expected, found {}",
            uris.len()
        )));
    };
    SpiffeId::parse(uri).map_err(|e| CaError::BadCsr(e.to_string()))
}

fn ca_params(
    cn: &str,
    constraints: BasicConstraints,
    ttl: Duration,
    serial: SerialNumber,
) -> CertificateParams {
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "Trellis");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(constraints);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = (now - BACKDATE).into();
    p.not_after = (now + ttl).into();
    p.serial_number = Some(serial);
    p.use_authority_key_identifier_extension = true;
    p
}

fn serial(rng: &SystemRandom) -> Result<SerialNumber, CaError> {
    let mut b = [0u8; 16];
    rng.fill(&mut b)
        .map_err(|_| material("could not make randomness"))?;
    b[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&b))
}

/// An intermediate signed by this root (its signature checks out with the root's key) and not
/// close to expiry.
fn intermediate_usable(pem: &str, root_der: &[u8]) -> Result<bool, CaError> {
    use x509_parser::prelude::FromDer;
    let der = trellis_api::tls::parse_certs(pem.as_bytes()).map_err(material)?;
    let (_, cert) =
        x509_parser::certificate::X509Certificate::from_der(der[0].as_ref()).map_err(material)?;
    let (_, root) =
        x509_parser::certificate::X509Certificate::from_der(root_der).map_err(material)?;
    let renew_at = unix(SystemTime::now() + INTERMEDIATE_RENEW_BEFORE);
    Ok(cert.verify_signature(Some(root.public_key())).is_ok()
        && cert.validity().not_after.timestamp() > renew_at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::names::{Namespace, ServiceName};

    fn id(svc: &str) -> SpiffeId {
        SpiffeId::new(
            "trellis.local",
            Namespace::default(),
            ServiceName::new(svc).unwrap(),
        )
    }

    fn csr_for(uri: &str) -> String {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(Ia5String::try_from(uri).unwrap())];
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("trellis-ca-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn signs_the_identity_asked_for_and_survives_restart() {
        let d = dir("sign");
        let ca = Ca::load_or_create(&d, None, Duration::from_secs(3600)).unwrap();
        let issued = ca
            .sign(
                &csr_for("spiffe://trellis.local/ns/default/svc/orders"),
                &id("orders"),
            )
            .unwrap();
        let chain = trellis_api::tls::parse_certs(issued.chain_pem.as_bytes()).unwrap();
        assert_eq!(chain.len(), 2);
        let info = trellis_api::tls::cert_info(chain[0].as_ref()).unwrap();
        assert_eq!(info.identity, Some(id("orders")));
        assert!((info.not_after - info.not_before - 3600 - 300).abs() <= 1);
        // The chain verifies against the bundle (as a TLS client certificate would).
        let roots = trellis_api::tls::root_store(ca.bundle_pem().as_bytes()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots,
            trellis_api::tls::provider(),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&chain[0], &chain[1..], rustls::pki_types::UnixTime::now())
            .unwrap();
        // Key files are private; a restart keeps the same root.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join("root.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
        let bundle = ca.bundle_pem().to_owned();
        let again = Ca::load_or_create(&d, None, Duration::from_secs(3600)).unwrap();
        assert_eq!(again.bundle_pem(), bundle);
    }

    #[test]
    fn refuses_other_identities_and_garbage() {
        let ca = Ca::load_or_create(&dir("refuse"), None, Duration::from_secs(60)).unwrap();
        let e = ca
            .sign(
                &csr_for("spiffe://trellis.local/ns/default/svc/payments"),
                &id("orders"),
            )
            .unwrap_err();
        assert!(matches!(e, CaError::WrongIdentity { .. }), "{e}");
        assert!(e.to_string().contains("svc/payments"));
        let e = ca
            .sign(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                &id("orders"),
            )
            .unwrap_err();
        assert!(e.is_callers_fault());
        let e = ca
            .sign(&csr_for("https://example.com"), &id("orders"))
            .unwrap_err();
        assert!(matches!(e, CaError::BadCsr(_)), "{e}");
    }

    #[test]
    fn an_operator_root_is_used_as_given() {
        let d = dir("provided");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let params = ca_params(
            "Corp root",
            BasicConstraints::Unconstrained,
            ROOT_TTL,
            serial(&SystemRandom::new()).unwrap(),
        );
        let root = CertifiedIssuer::self_signed(params, key).unwrap();
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("corp.pem"), root.pem()).unwrap();
        std::fs::write(d.join("corp.key"), root.key().serialize_pem()).unwrap();
        let ca = Ca::load_or_create(
            &d.join("ca"),
            Some((d.join("corp.pem"), d.join("corp.key"))),
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(ca.bundle_pem().trim(), root.pem().trim());
        assert!(!d.join("ca/root.key").exists());
    }
}
