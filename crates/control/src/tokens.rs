//! Join tokens: a proxy proves which service it may claim by presenting one when it asks for
//! its first certificate. Only a SHA-256 of the secret is stored; the token string is shown
//! once, at creation.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use trellis_core::names::{Namespace, ServiceName};

use crate::store::{Store, StoreError};

const PREFIX: &str = "trellis-";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub id: String,
    pub service: String,
    pub namespace: String,
    pub created_unix: i64,
    pub expires_unix: i64,
    pub revoked: bool,
    /// `None`: any number of proxies (replicas) may use it until it expires.
    pub max_uses: Option<u32>,
    pub uses: u32,
    /// Hex SHA-256 of the secret part.
    #[serde(rename = "secretSha256")]
    pub secret_sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("malformed join token (expected trellis-<id>.<secret>)")]
    Malformed,
    #[error("unknown join token {0}")]
    Unknown(String),
    #[error("join token {id} expired at {at}")]
    Expired { id: String, at: String },
    #[error("join token {0} was revoked")]
    Revoked(String),
    #[error("join token {id} was already used {uses} time(s), its limit")]
    UsedUp { id: String, uses: u32 },
    #[error("could not make randomness")]
    Random,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TokenError {
    /// Whether the caller is at fault (a bad or stale token) rather than the control plane.
    pub fn is_callers_fault(&self) -> bool {
        !matches!(self, TokenError::Random | TokenError::Store(_))
    }
}

pub struct Tokens {
    store: Arc<dyn Store>,
    rng: SystemRandom,
    /// Serializes redemptions so a limited token cannot be used twice concurrently.
    redeem: Mutex<()>,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(s: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref())
}

impl Tokens {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            rng: SystemRandom::new(),
            redeem: Mutex::new(()),
        }
    }

    fn random_hex(&self, len: usize) -> Result<String, TokenError> {
        let mut buf = vec![0u8; len];
        self.rng.fill(&mut buf).map_err(|_| TokenError::Random)?;
        Ok(hex(&buf))
    }

    /// Creates a token for `service` in `namespace`; returns the token string (shown once).
    pub fn create(
        &self,
        service: &ServiceName,
        namespace: &Namespace,
        ttl: Duration,
        max_uses: Option<u32>,
    ) -> Result<(String, JoinToken), TokenError> {
        let id = self.random_hex(8)?;
        let secret = self.random_hex(32)?;
        let created = now_unix();
        let record = JoinToken {
            id: id.clone(),
            service: service.as_str().to_owned(),
            namespace: namespace.as_str().to_owned(),
            created_unix: created,
            expires_unix: created.saturating_add(ttl.as_secs() as i64),
            revoked: false,
            max_uses,
            uses: 0,
            secret_sha256: sha256_hex(&secret),
        };
        self.store.put_token(&record)?;
        Ok((format!("{PREFIX}{id}.{secret}"), record))
    }

    /// Checks a presented token and counts the use; returns the identity it grants.
    pub fn redeem(&self, token: &str) -> Result<(Namespace, ServiceName), TokenError> {
        let (id, secret) = token
            .trim()
            .strip_prefix(PREFIX)
            .and_then(|t| t.split_once('.'))
            .ok_or(TokenError::Malformed)?;
        let _one_at_a_time = self.redeem.lock().unwrap_or_else(|p| p.into_inner());
        let mut record = self
            .store
            .token(id)?
            .ok_or_else(|| TokenError::Unknown(id.to_owned()))?;
        // Comparing digests: a timing difference reveals nothing about the secret.
        if record.secret_sha256 != sha256_hex(secret) {
            return Err(TokenError::Unknown(id.to_owned()));
        }
        if record.revoked {
            return Err(TokenError::Revoked(record.id));
        }
        if now_unix() >= record.expires_unix {
            return Err(TokenError::Expired {
                at: trellis_core::time::rfc3339(
                    UNIX_EPOCH + Duration::from_secs(record.expires_unix.max(0) as u64),
                ),
                id: record.id,
            });
        }
        if let Some(max) = record.max_uses
            && record.uses >= max
        {
            return Err(TokenError::UsedUp {
                id: record.id,
                uses: record.uses,
            });
        }
        let namespace = Namespace::new(record.namespace.as_str())
            .map_err(|_| TokenError::Unknown(id.to_owned()))?;
        let service = ServiceName::new(record.service.as_str())
            .map_err(|_| TokenError::Unknown(id.to_owned()))?;
        record.uses += 1;
        self.store.put_token(&record)?;
        Ok((namespace, service))
    }

    /// Revokes a token; `Ok(false)` if there is no such token.
    pub fn revoke(&self, id: &str) -> Result<bool, TokenError> {
        let Some(mut record) = self.store.token(id)? else {
            return Ok(false);
        };
        record.revoked = true;
        self.store.put_token(&record)?;
        Ok(true)
    }

    pub fn list(&self) -> Result<Vec<JoinToken>, TokenError> {
        Ok(self.store.tokens()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn tokens(name: &str) -> Tokens {
        let dir =
            std::env::temp_dir().join(format!("trellis-tokens-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Tokens::new(Arc::new(RedbStore::open(&dir).unwrap()))
    }

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    #[test]
    fn a_token_grants_its_service_only_and_is_stored_hashed() {
        let t = tokens("grant");
        let (token, record) = t
            .create(
                &svc("orders"),
                &Namespace::default(),
                Duration::from_secs(60),
                None,
            )
            .unwrap();
        assert!(!record.secret_sha256.is_empty());
        let secret = token.split_once('.').unwrap().1;
        assert!(!format!("{:?}", t.list().unwrap()).contains(secret));
        let (ns, service) = t.redeem(&token).unwrap();
        assert_eq!((ns.as_str(), service.as_str()), ("default", "orders"));
        // Unlimited tokens serve every replica.
        t.redeem(&token).unwrap();
    }

    #[test]
    fn bad_expired_revoked_and_used_up_tokens_fail_precisely() {
        let t = tokens("fail");
        let (token, record) = t
            .create(
                &svc("orders"),
                &Namespace::default(),
                Duration::from_secs(60),
                Some(1),
            )
            .unwrap();
        assert!(matches!(t.redeem("nonsense"), Err(TokenError::Malformed)));
        let forged = format!("trellis-{}.{}", record.id, "00".repeat(32));
        assert!(matches!(t.redeem(&forged), Err(TokenError::Unknown(_))));
        t.redeem(&token).unwrap();
        assert!(matches!(t.redeem(&token), Err(TokenError::UsedUp { .. })));

        let (expired, _) = t
            .create(&svc("orders"), &Namespace::default(), Duration::ZERO, None)
            .unwrap();
        let e = t.redeem(&expired).unwrap_err();
        assert!(matches!(e, TokenError::Expired { .. }), "{e}");

        let (revoked, r) = t
            .create(
                &svc("orders"),
                &Namespace::default(),
                Duration::from_secs(60),
                None,
            )
            .unwrap();
        assert!(t.revoke(&r.id).unwrap());
        assert!(matches!(t.redeem(&revoked), Err(TokenError::Revoked(_))));
    }
}
