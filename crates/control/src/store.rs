//! The resource store: validated resources, a global version, and an audit log.
//!
//! [`Store`] is the interface the rest of the control plane uses; [`RedbStore`] is the embedded,
//! crash-safe implementation (one file in `--data-dir`). An etcd implementation (several
//! replicas) will fill the same trait. Every mutation is one transaction: an apply of several
//! resources is all or nothing, and a change is acknowledged only after it is durable on disk.

use std::path::Path;
use std::time::SystemTime;

use redb::ReadableTableMetadata;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use trellis_core::discovery::DiscoveredEndpoint;
use trellis_core::names::ServiceName;
use trellis_core::resources::{Kind, Resource, ResourceKey, check_conflicts};
use trellis_core::time::rfc3339;

/// A resource as stored: with the global version of its last change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResource {
    pub resource: Resource,
    pub version: u64,
    pub updated: String,
}

/// One audited change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub version: u64,
    pub time: String,
    pub actor: String,
    /// `created`, `configured` or `deleted`.
    pub action: String,
    pub resource: String,
    pub old: Option<serde_json::Value>,
    pub new: Option<serde_json::Value>,
}

/// What an apply did to each resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub resource: String,
    /// `created`, `configured` or `unchanged`.
    pub action: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApplyOutcome {
    pub version: u64,
    pub results: Vec<Applied>,
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The resulting state would be inconsistent (conflicting routes…): nothing was written.
    #[error("{0}")]
    Conflict(trellis_core::resources::ResourceError),
    #[error("storage failure: {0}")]
    Storage(String),
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError::Storage(e.into().to_string())
    }
}

/// The control plane's view of storage.
pub trait Store: Send + Sync + 'static {
    /// Applies resources atomically. Unchanged resources keep their version.
    fn apply(
        &self,
        resources: &[Resource],
        actor: &str,
        dry_run: bool,
    ) -> Result<ApplyOutcome, StoreError>;
    /// Deletes one resource; `Ok(None)` if it did not exist.
    fn delete(&self, key: &ResourceKey, actor: &str) -> Result<Option<u64>, StoreError>;
    fn get(&self, key: &ResourceKey) -> Result<Option<StoredResource>, StoreError>;
    /// All resources, or those of one kind, ordered by kind, namespace, name.
    fn list(&self, kind: Option<Kind>) -> Result<Vec<StoredResource>, StoreError>;
    /// The newest `limit` audit records at or after `since` (an RFC 3339 time, as records
    /// carry) and with `action` when given, newest first: configuration changes and recorded
    /// events together.
    fn audit(
        &self,
        since: Option<&str>,
        action: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError>;
    /// Records an event that is not a configuration change (a certificate issued, denials a
    /// proxy reported). The oldest events are dropped beyond [`MAX_EVENTS`].
    fn record_event(
        &self,
        actor: &str,
        action: &str,
        resource: &str,
        detail: serde_json::Value,
    ) -> Result<(), StoreError>;
    /// The version of the last change (0 for an empty store).
    fn version(&self) -> u64;
    /// Notified with the new version after every committed change.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// Persists the registry, so a restarted control plane serves the same endpoints while
    /// proxies reconnect.
    fn save_registry(
        &self,
        instances: &[(ServiceName, DiscoveredEndpoint)],
    ) -> Result<(), StoreError>;
    fn load_registry(&self) -> Result<Vec<(ServiceName, DiscoveredEndpoint)>, StoreError>;
    /// Creates or replaces a join token record (never the secret itself, only its hash).
    fn put_token(&self, token: &crate::tokens::JoinToken) -> Result<(), StoreError>;
    fn token(&self, id: &str) -> Result<Option<crate::tokens::JoinToken>, StoreError>;
    fn tokens(&self) -> Result<Vec<crate::tokens::JoinToken>, StoreError>;
}

const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REGISTRY: TableDefinition<&str, &[u8]> = TableDefinition::new("registry");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// Audit events that are not configuration changes, by sequence number.
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

/// Audit events kept (configuration changes are all kept).
pub const MAX_EVENTS: u64 = 100_000;

fn storage_key(key: &ResourceKey) -> String {
    format!("{}/{}/{}", key.kind, key.namespace, key.name)
}

/// The embedded store (redb): crash-safe, one file, one writer at a time.
pub struct RedbStore {
    db: Database,
    changes: watch::Sender<u64>,
}

impl RedbStore {
    /// Opens or creates `dir/store.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Storage(format!("{}: {e}", dir.display())))?;
        let db = Database::create(dir.join("store.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(RESOURCES)?;
        txn.open_table(AUDIT)?;
        txn.open_table(TOKENS)?;
        txn.open_table(EVENTS)?;
        let version = txn
            .open_table(META)?
            .get("version")?
            .map(|v| v.value())
            .unwrap_or(0);
        txn.commit()?;
        Ok(Self {
            db,
            changes: watch::Sender::new(version),
        })
    }

    fn read_all(&self) -> Result<Vec<StoredResource>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RESOURCES)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Storage(format!("corrupt record: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Storage(e.to_string()))
}

impl Store for RedbStore {
    fn apply(
        &self,
        resources: &[Resource],
        actor: &str,
        dry_run: bool,
    ) -> Result<ApplyOutcome, StoreError> {
        let txn = self.db.begin_write()?;
        let outcome = {
            let mut table = txn.open_table(RESOURCES)?;
            let mut audit = txn.open_table(AUDIT)?;
            let mut meta = txn.open_table(META)?;
            let mut version = meta.get("version")?.map(|v| v.value()).unwrap_or(0);

            // The state after this apply must be conflict-free as a whole.
            let mut state: std::collections::BTreeMap<ResourceKey, Resource> =
                std::collections::BTreeMap::new();
            for entry in table.iter()? {
                let (_, v) = entry?;
                let stored: StoredResource = decode(v.value())?;
                state.insert(stored.resource.key(), stored.resource);
            }
            for r in resources {
                state.insert(r.key(), r.clone());
            }
            let all: Vec<Resource> = state.into_values().collect();
            check_conflicts(&all).map_err(StoreError::Conflict)?;

            let now = rfc3339(SystemTime::now());
            let mut results = Vec::new();
            for r in resources {
                let key = storage_key(&r.key());
                let old: Option<StoredResource> = match table.get(key.as_str())? {
                    Some(v) => Some(decode(v.value())?),
                    None => None,
                };
                let action = match &old {
                    Some(o) if o.resource == *r => "unchanged",
                    Some(_) => "configured",
                    None => "created",
                };
                results.push(Applied {
                    resource: key.clone(),
                    action,
                });
                if action == "unchanged" || dry_run {
                    continue;
                }
                version += 1;
                let stored = StoredResource {
                    resource: r.clone(),
                    version,
                    updated: now.clone(),
                };
                table.insert(key.as_str(), encode(&stored)?.as_slice())?;
                let record = AuditRecord {
                    version,
                    time: now.clone(),
                    actor: actor.to_owned(),
                    action: action.to_owned(),
                    resource: key,
                    old: old.map(|o| serde_json::to_value(o.resource).unwrap_or_default()),
                    new: Some(serde_json::to_value(r).unwrap_or_default()),
                };
                audit.insert(version, encode(&record)?.as_slice())?;
            }
            meta.insert("version", version)?;
            ApplyOutcome {
                version,
                results,
                dry_run,
            }
        };
        if dry_run {
            txn.abort()?;
        } else {
            txn.commit()?;
            self.changes.send_replace(outcome.version);
        }
        Ok(outcome)
    }

    fn delete(&self, key: &ResourceKey, actor: &str) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_write()?;
        let version = {
            let mut table = txn.open_table(RESOURCES)?;
            let skey = storage_key(key);
            let old: Option<StoredResource> = match table.remove(skey.as_str())? {
                Some(v) => Some(decode(v.value())?),
                None => None,
            };
            let Some(old) = old else {
                return Ok(None);
            };
            let mut meta = txn.open_table(META)?;
            let version = meta.get("version")?.map(|v| v.value()).unwrap_or(0) + 1;
            meta.insert("version", version)?;
            let record = AuditRecord {
                version,
                time: rfc3339(SystemTime::now()),
                actor: actor.to_owned(),
                action: "deleted".into(),
                resource: skey,
                old: Some(serde_json::to_value(old.resource).unwrap_or_default()),
                new: None,
            };
            txn.open_table(AUDIT)?
                .insert(version, encode(&record)?.as_slice())?;
            version
        };
        txn.commit()?;
        self.changes.send_replace(version);
        Ok(Some(version))
    }

    fn get(&self, key: &ResourceKey) -> Result<Option<StoredResource>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RESOURCES)?;
        match table.get(storage_key(key).as_str())? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    fn list(&self, kind: Option<Kind>) -> Result<Vec<StoredResource>, StoreError> {
        let mut all = self.read_all()?;
        all.retain(|r| kind.is_none_or(|k| r.resource.kind == k));
        all.sort_by_key(|r| r.resource.key());
        Ok(all)
    }

    fn audit(
        &self,
        since: Option<&str>,
        action: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for table in [txn.open_table(AUDIT)?, txn.open_table(EVENTS)?] {
            let mut kept = 0;
            for entry in table.iter()?.rev() {
                let (_, v) = entry?;
                let record: AuditRecord = decode(v.value())?;
                // Both tables grow in time order, so the first older record ends this one.
                if since.is_some_and(|s| record.time.as_str() < s) {
                    break;
                }
                if action.is_some_and(|a| a != record.action) {
                    continue;
                }
                out.push(record);
                kept += 1;
                if kept == limit {
                    break;
                }
            }
        }
        // RFC 3339 UTC times with a fixed format sort as strings.
        out.sort_by(|a, b| b.time.cmp(&a.time));
        out.truncate(limit);
        Ok(out)
    }

    fn record_event(
        &self,
        actor: &str,
        action: &str,
        resource: &str,
        detail: serde_json::Value,
    ) -> Result<(), StoreError> {
        let record = AuditRecord {
            version: self.version(),
            time: rfc3339(SystemTime::now()),
            actor: actor.to_owned(),
            action: action.to_owned(),
            resource: resource.to_owned(),
            old: None,
            new: Some(detail),
        };
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(EVENTS)?;
            let next = table.last()?.map_or(0, |(k, _)| k.value() + 1);
            table.insert(next, encode(&record)?.as_slice())?;
            if table.len()? > MAX_EVENTS {
                table.pop_first()?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn version(&self) -> u64 {
        *self.changes.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn save_registry(
        &self,
        instances: &[(ServiceName, DiscoveredEndpoint)],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(REGISTRY)?
            .insert("instances", encode(&instances)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    fn put_token(&self, token: &crate::tokens::JoinToken) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(TOKENS)?
            .insert(token.id.as_str(), encode(token)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    fn token(&self, id: &str) -> Result<Option<crate::tokens::JoinToken>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TOKENS)?;
        let value = table.get(id)?;
        value.map(|v| decode(v.value())).transpose()
    }

    fn tokens(&self) -> Result<Vec<crate::tokens::JoinToken>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TOKENS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    fn load_registry(&self) -> Result<Vec<(ServiceName, DiscoveredEndpoint)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(REGISTRY) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        match table.get("instances")? {
            Some(v) => decode(v.value()),
            None => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::resources::parse_documents;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("trellis-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn route(name: &str, v1: i64, v2: i64) -> Resource {
        parse_documents(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{name: web}}]\n  rules:\n    - matches: [{{path: {{value: /{name}}}}}]\n      backendRefs: [{{name: a, weight: {v1}}}, {{name: b, weight: {v2}}}]\n"
        ))
        .expect("valid")
        .remove(0)
    }

    #[test]
    fn apply_versions_audits_and_is_idempotent() {
        let store = RedbStore::open(&temp_dir("apply")).expect("open");
        let out = store
            .apply(&[route("r1", 80, 20)], "alice", false)
            .expect("apply");
        assert_eq!(out.version, 1);
        assert_eq!(out.results[0].action, "created");
        let again = store
            .apply(&[route("r1", 80, 20)], "alice", false)
            .expect("apply");
        assert_eq!(again.results[0].action, "unchanged");
        assert_eq!(again.version, 1);
        let changed = store
            .apply(&[route("r1", 0, 100)], "bob", false)
            .expect("apply");
        assert_eq!(changed.results[0].action, "configured");
        assert_eq!(changed.version, 2);
        let audit = store.audit(None, None, 10).expect("audit");
        assert_eq!(audit.len(), 2);
        assert_eq!(audit[0].actor, "bob");
        assert!(audit[0].old.is_some() && audit[0].new.is_some());
        assert_eq!(*store.subscribe().borrow(), 2);
    }

    #[test]
    fn dry_run_writes_nothing() {
        let store = RedbStore::open(&temp_dir("dry")).expect("open");
        let out = store
            .apply(&[route("r1", 1, 1)], "alice", true)
            .expect("apply");
        assert!(out.dry_run);
        assert!(store.list(None).expect("list").is_empty());
        assert_eq!(store.version(), 0);
    }

    #[test]
    fn conflicts_with_stored_resources_reject_the_whole_apply() {
        let store = RedbStore::open(&temp_dir("conflict")).expect("open");
        store
            .apply(&[route("r1", 1, 1)], "alice", false)
            .expect("apply");
        let mut clash = route("r1", 1, 1);
        clash.metadata.name = "r2".into();
        let err = store
            .apply(&[route("r3", 1, 1), clash], "bob", false)
            .expect_err("conflict");
        assert!(matches!(err, StoreError::Conflict(_)), "{err}");
        assert_eq!(
            store.list(None).expect("list").len(),
            1,
            "r3 must not be written either"
        );
    }

    #[test]
    fn survives_reopen_and_delete_is_audited() {
        let dir = temp_dir("reopen");
        {
            let store = RedbStore::open(&dir).expect("open");
            store
                .apply(&[route("r1", 1, 1), route("r2", 1, 1)], "alice", false)
                .expect("apply");
        }
        let store = RedbStore::open(&dir).expect("reopen");
        assert_eq!(store.version(), 2);
        let key = route("r1", 1, 1).key();
        assert!(store.get(&key).expect("get").is_some());
        assert_eq!(store.delete(&key, "carol").expect("delete"), Some(3));
        assert_eq!(store.delete(&key, "carol").expect("delete"), None);
        assert_eq!(
            store.audit(None, None, 1).expect("audit")[0].action,
            "deleted"
        );
        assert_eq!(store.list(Some(Kind::HTTPRoute)).expect("list").len(), 1);

        // Records carry millisecond times; the event must be strictly newer.
        std::thread::sleep(std::time::Duration::from_millis(5));
        store
            .record_event(
                "ca",
                "certificate-issued",
                "spiffe://t/ns/default/svc/web",
                serde_json::json!({"serial": "01"}),
            )
            .expect("event");
        let audit = store.audit(None, None, 10).expect("audit");
        assert_eq!(
            audit[0].action, "certificate-issued",
            "newest first across tables"
        );
        assert_eq!(audit[1].action, "deleted");
        assert!(
            store
                .audit(Some("9999"), None, 10)
                .expect("audit")
                .is_empty()
        );
        assert_eq!(store.audit(Some("2000"), None, 10).expect("audit").len(), 4);
        let issued = store
            .audit(None, Some("certificate-issued"), 10)
            .expect("audit");
        assert_eq!(issued.len(), 1);
        assert_eq!(issued[0].resource, "spiffe://t/ns/default/svc/web");
    }
}
