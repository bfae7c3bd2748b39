//! The consumer registry: consumers created, changed, rotated and revoked at run time, kept in
//! the store ([`ConsumerRegistry`]) so every proxy replica reads the same ones. The one place
//! these operations are written: `tollgate consumers` / `tollgate keys` and the admin API both
//! call it.
//!
//! - A consumer's document holds its own history ([`Change`]: who, what, when), so a change
//!   and its audit entry are one conditional write: neither can be stored without the other.
//!   A deleted consumer keeps its document (marked deleted, without keys) and its history.
//! - Writes are conditional on the version read; two administrators changing one consumer at
//!   once are applied one after the other, never one over the other.
//! - Keys are 256 random bits behind the `tg-` prefix (a secret scanner's rule can find a
//!   leaked one), returned once by the call that issues them and stored only as SHA-256.
//! - Expired keys are dropped at the next change; their history stays.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tollgate_store::{ConsumerRegistry, StoreError};

use super::{ACTIVE_KEYS, ConsumerConfig, Directory, KeyConfig};
use crate::quota::ConsumerLimits;

/// A registered consumer as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConsumerDoc {
    pub consumer: ConsumerConfig,
    #[serde(default)]
    pub deleted: bool,
    /// Every change made to it, oldest first.
    #[serde(default)]
    pub changes: Vec<Change>,
}

/// One change to a consumer: the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub at: DateTime<Utc>,
    /// Who: `cli:{user}@{host}`, `admin-key:{key id}`, `entra:{object id}`.
    pub actor: String,
    /// `consumer.create`, `consumer.update`, `consumer.delete`, `key.create`, `key.rotate`,
    /// `key.revoke`.
    pub action: String,
    /// The key a key action concerns (its public id, never the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A change with the consumer it was made to, for the audit listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub consumer: String,
    #[serde(flatten)]
    pub change: Change,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("consumer `{0}` does not exist")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("the store could not be used: {0}")]
    Store(#[from] StoreError),
}

/// What a create or an update sets; absent fields are left as they are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerFields {
    pub display_name: Option<String>,
    pub owner: Option<String>,
    pub deployments: Option<Vec<String>>,
    pub limits: Option<ConsumerLimits>,
    pub deployment_limits: Option<BTreeMap<String, ConsumerLimits>>,
}

impl ConsumerFields {
    fn apply(self, c: &mut ConsumerConfig) {
        if let Some(v) = self.display_name {
            c.display_name = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = self.owner {
            c.owner = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = self.deployments {
            c.deployments = v;
        }
        if let Some(v) = self.limits {
            c.limits = v;
        }
        if let Some(v) = self.deployment_limits {
            c.deployment_limits = v;
        }
    }
}

/// A registered consumer as `show` gives it: its listing and its history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shown {
    pub consumer: ConsumerView,
    pub changes: Vec<Change>,
}

/// A new key, shown once.
#[derive(Debug, Clone, Serialize)]
pub struct Issued {
    pub key: String,
    pub key_id: String,
}

/// A consumer as listed: where it is declared, its keys without digests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConsumerView {
    pub id: String,
    /// `registry` (changeable here) or `file` (change it in the configuration).
    pub source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub deployments: Vec<String>,
    #[serde(skip_serializing_if = "ConsumerLimits::is_empty")]
    pub limits: ConsumerLimits,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub deployment_limits: BTreeMap<String, ConsumerLimits>,
    pub keys: Vec<KeyView>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyView {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<DateTime<Utc>>,
    pub active: bool,
}

impl ConsumerView {
    pub fn of(c: &ConsumerConfig, source: &'static str, deleted: bool) -> ConsumerView {
        let now = Utc::now();
        let bare = c.key_sha256.iter().map(|d| KeyConfig {
            sha256: d.clone(),
            ..KeyConfig::default()
        });
        ConsumerView {
            id: c.id.clone(),
            source,
            display_name: c.display_name.clone(),
            owner: c.owner.clone(),
            deployments: c.deployments.clone(),
            limits: c.limits.clone(),
            deployment_limits: c.deployment_limits.clone(),
            keys: bare
                .chain(c.keys.iter().cloned())
                .map(|k| KeyView {
                    id: k.id(),
                    active: k.active(now),
                    name: k.name,
                    created: k.created,
                    expires: k.expires,
                })
                .collect(),
            deleted,
        }
    }
}

/// A new random key: `tg-` and 64 hex characters (256 bits).
pub fn new_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("tg-{}", hex::encode(bytes))
}

/// The hex SHA-256 of a key, as configured and stored.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// How many times a change is tried again when another writer changed the consumer between
/// the read and the write.
const ATTEMPTS: usize = 8;

/// The registry's operations, made by `actor`, next to the consumers the file declares (whose
/// ids the registry may not take).
pub struct Registry<'a> {
    store: &'a dyn ConsumerRegistry,
    file: &'a [ConsumerConfig],
    actor: String,
}

/// What a change did, for its audit entry.
struct Done {
    action: &'static str,
    key_id: Option<String>,
    detail: Option<String>,
}

impl<'a> Registry<'a> {
    pub fn new(
        store: &'a dyn ConsumerRegistry,
        file: &'a [ConsumerConfig],
        actor: impl Into<String>,
    ) -> Registry<'a> {
        Registry {
            store,
            file,
            actor: actor.into(),
        }
    }

    /// Every consumer: the file's, then the registry's (deleted ones only with `deleted`).
    pub async fn list(&self, deleted: bool) -> Result<Vec<ConsumerView>, RegistryError> {
        let mut out: Vec<ConsumerView> = self
            .file
            .iter()
            .map(|c| ConsumerView::of(c, "file", false))
            .collect();
        for (_, doc) in readable(self.store.consumers().await?) {
            if deleted || !doc.deleted {
                out.push(ConsumerView::of(&doc.consumer, "registry", doc.deleted));
            }
        }
        Ok(out)
    }

    /// One registered consumer, as listed, with its history.
    pub async fn show(&self, id: &str) -> Result<Shown, RegistryError> {
        if !tollgate_store::valid_consumer_id(id) {
            return Err(RegistryError::NotFound(id.to_owned()));
        }
        let stored = self
            .store
            .consumer(id)
            .await?
            .ok_or_else(|| RegistryError::NotFound(id.to_owned()))?;
        let doc = read(&stored.document)?;
        Ok(Shown {
            consumer: ConsumerView::of(&doc.consumer, "registry", doc.deleted),
            changes: doc.changes,
        })
    }

    /// Every change, newest first, at most `limit`.
    pub async fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, RegistryError> {
        let mut out = Vec::new();
        for (id, doc) in readable(self.store.consumers().await?) {
            out.extend(doc.changes.into_iter().map(|change| AuditEntry {
                consumer: id.clone(),
                change,
            }));
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.change.at));
        out.truncate(limit);
        Ok(out)
    }

    /// Creates consumer `id` with one key (`primary`), returned once.
    pub async fn create(
        &self,
        id: &str,
        fields: ConsumerFields,
        key_expires: Option<DateTime<Utc>>,
    ) -> Result<(ConsumerDoc, Issued), RegistryError> {
        if !tollgate_store::valid_consumer_id(id) {
            return Err(RegistryError::Invalid(vec![format!(
                "`{id}` cannot name a consumer: letters, digits, `.`, `_`, `-`, at most 64"
            )]));
        }
        self.existing(id)?;
        future(key_expires)?;
        self.change(id, true, |doc, now| {
            doc.consumer = ConsumerConfig {
                id: id.to_owned(),
                ..ConsumerConfig::default()
            };
            fields.clone().apply(&mut doc.consumer);
            let issued = add_key(doc, "primary", key_expires, now);
            Ok((
                Done {
                    action: "consumer.create",
                    key_id: Some(issued.key_id.clone()),
                    detail: None,
                },
                issued,
            ))
        })
        .await
    }

    pub async fn update(
        &self,
        id: &str,
        fields: ConsumerFields,
    ) -> Result<ConsumerDoc, RegistryError> {
        self.existing(id)?;
        let (doc, _) = self
            .change(id, false, |doc, _| {
                let before = doc.consumer.clone();
                fields.clone().apply(&mut doc.consumer);
                Ok((
                    Done {
                        action: "consumer.update",
                        key_id: None,
                        detail: Some(changed_fields(&before, &doc.consumer)),
                    },
                    (),
                ))
            })
            .await?;
        Ok(doc)
    }

    /// Deletes consumer `id`: its keys stop working at every replica's next poll; its
    /// document and history stay.
    pub async fn delete(&self, id: &str) -> Result<ConsumerDoc, RegistryError> {
        self.existing(id)?;
        let (doc, _) = self
            .change(id, false, |doc, _| {
                doc.deleted = true;
                doc.consumer.keys.clear();
                doc.consumer.key_sha256.clear();
                Ok((
                    Done {
                        action: "consumer.delete",
                        key_id: None,
                        detail: None,
                    },
                    (),
                ))
            })
            .await?;
        Ok(doc)
    }

    /// A second key for a consumer that has one active key.
    pub async fn add_key(
        &self,
        id: &str,
        name: Option<String>,
        expires: Option<DateTime<Utc>>,
    ) -> Result<(ConsumerDoc, Issued), RegistryError> {
        self.existing(id)?;
        future(expires)?;
        self.change(id, false, |doc, now| {
            let active = doc.consumer.keys.iter().filter(|k| k.active(now)).count();
            if active >= ACTIVE_KEYS {
                return Err(RegistryError::Conflict(format!(
                    "consumer `{id}` already has {ACTIVE_KEYS} active keys; rotate or revoke one first"
                )));
            }
            let name = name.clone().unwrap_or_else(|| "secondary".to_owned());
            let issued = add_key(doc, &name, expires, now);
            Ok((Done {
                action: "key.create",
                key_id: Some(issued.key_id.clone()),
                detail: None,
            }, issued))
        })
        .await
    }

    /// A new primary key; the newest key in use becomes the secondary and stops working after
    /// `grace` (the time callers have to switch); any older key stops now.
    pub async fn rotate(
        &self,
        id: &str,
        grace: Duration,
        expires: Option<DateTime<Utc>>,
    ) -> Result<(ConsumerDoc, Issued), RegistryError> {
        self.existing(id)?;
        future(expires)?;
        if grace < Duration::zero() || grace > max_grace() {
            return Err(RegistryError::Invalid(vec![format!(
                "the grace must be between 0 and {} days",
                max_grace().num_days()
            )]));
        }
        self.change(id, false, |doc, now| {
            let mut active: Vec<KeyConfig> = doc
                .consumer
                .keys
                .drain(..)
                .filter(|k| k.active(now))
                .collect();
            // Newest first; a key without a creation time is older than any with one.
            active.sort_by_key(|k| std::cmp::Reverse(k.created));
            let mut revoked: Vec<String> = active.iter().skip(1).map(KeyConfig::id).collect();
            if let Some(mut kept) = active.into_iter().next() {
                let until = now + grace;
                kept.expires = Some(kept.expires.map_or(until, |e| e.min(until)));
                kept.name = Some("secondary".to_owned());
                if grace <= Duration::zero() {
                    revoked.push(kept.id());
                } else {
                    doc.consumer.keys.push(kept);
                }
            }
            let issued = add_key(doc, "primary", expires, now);
            let detail = format!(
                "grace {}s{}",
                grace.num_seconds(),
                if revoked.is_empty() {
                    String::new()
                } else {
                    format!("; revoked {}", revoked.join(", "))
                }
            );
            Ok((
                Done {
                    action: "key.rotate",
                    key_id: Some(issued.key_id.clone()),
                    detail: Some(detail),
                },
                issued,
            ))
        })
        .await
    }

    /// Revokes key `key_id` (its public id) now.
    pub async fn revoke(&self, id: &str, key_id: &str) -> Result<ConsumerDoc, RegistryError> {
        self.existing(id)?;
        let (doc, _) = self
            .change(id, false, |doc, now| {
                let before = doc.consumer.keys.len();
                doc.consumer.keys.retain(|k| k.id() != key_id);
                if doc.consumer.keys.len() == before {
                    return Err(RegistryError::NotFound(format!("{id} key {key_id}")));
                }
                if !doc.consumer.keys.iter().any(|k| k.active(now)) {
                    return Err(RegistryError::Conflict(format!(
                        "key {key_id} is the last active key of `{id}`; create another first, or delete the consumer"
                    )));
                }
                Ok((Done {
                    action: "key.revoke",
                    key_id: Some(key_id.to_owned()),
                    detail: None,
                }, ()))
            })
            .await?;
        Ok(doc)
    }

    /// Refuses a change to a consumer the file declares, or to an id no consumer can have.
    fn existing(&self, id: &str) -> Result<(), RegistryError> {
        if !tollgate_store::valid_consumer_id(id) {
            return Err(RegistryError::NotFound(id.to_owned()));
        }
        if self.file.iter().any(|c| c.id == id) {
            return Err(RegistryError::Conflict(format!(
                "consumer `{id}` is declared in the configuration file; change it there"
            )));
        }
        Ok(())
    }

    /// Reads consumer `id`, applies `f`, checks the result as the proxy will, records the
    /// change in the document, and writes it over the version read; read again and retried
    /// when another writer came first. `create`: the consumer must not exist (or be deleted);
    /// otherwise it must exist.
    async fn change<T>(
        &self,
        id: &str,
        create: bool,
        mut f: impl FnMut(&mut ConsumerDoc, DateTime<Utc>) -> Result<(Done, T), RegistryError>,
    ) -> Result<(ConsumerDoc, T), RegistryError> {
        for _ in 0..ATTEMPTS {
            let now = Utc::now();
            let stored = self.store.consumer(id).await?;
            let (mut doc, version) = match stored {
                Some(s) => (read(&s.document)?, Some(s.version)),
                None => (ConsumerDoc::default(), None),
            };
            let exists = version.is_some() && !doc.deleted;
            if create && exists {
                return Err(RegistryError::Conflict(format!(
                    "consumer `{id}` already exists"
                )));
            }
            if !create && !exists {
                return Err(RegistryError::NotFound(id.to_owned()));
            }
            doc.deleted = false;
            doc.consumer.keys.retain(|k| k.active(now));
            let (done, made) = f(&mut doc, now)?;
            if !doc.deleted {
                Directory::default()
                    .add(&doc.consumer, now)
                    .map_err(RegistryError::Invalid)?;
            }
            doc.changes.push(Change {
                at: now,
                actor: self.actor.clone(),
                action: done.action.to_owned(),
                key_id: done.key_id,
                detail: done.detail,
            });
            let value = serde_json::to_value(&doc)
                .map_err(|e| StoreError::Corrupt(format!("consumer document: {e}")))?;
            if self
                .store
                .put_consumer(id, &value, version.as_deref())
                .await?
                .is_some()
            {
                tracing::info!(consumer = %id, action = done.action, actor = %self.actor, "Consumer registry changed.");
                return Ok((doc, made));
            }
        }
        Err(RegistryError::Conflict(format!(
            "consumer `{id}` kept changing under this change; try again"
        )))
    }
}

/// The longest a rotated-out key may keep working.
pub fn max_grace() -> Duration {
    Duration::days(90)
}

/// Refuses an expiry that has already passed: the key would never work (and a rotation to it
/// would lock the consumer out once the grace ends).
fn future(expires: Option<DateTime<Utc>>) -> Result<(), RegistryError> {
    match expires {
        Some(e) if e <= Utc::now() => Err(RegistryError::Invalid(vec![format!(
            "the expiry {e} has already passed"
        )])),
        _ => Ok(()),
    }
}

fn add_key(
    doc: &mut ConsumerDoc,
    name: &str,
    expires: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Issued {
    let key = new_key();
    let k = KeyConfig {
        sha256: hash_key(&key),
        expires,
        name: Some(name.to_owned()),
        created: Some(now),
    };
    let key_id = k.id();
    doc.consumer.keys.push(k);
    Issued { key, key_id }
}

fn read(document: &serde_json::Value) -> Result<ConsumerDoc, RegistryError> {
    serde_json::from_value(document.clone())
        .map_err(|e| RegistryError::Store(StoreError::Corrupt(format!("consumer document: {e}"))))
}

/// The names of the fields an update changed, for its audit entry.
fn changed_fields(before: &ConsumerConfig, after: &ConsumerConfig) -> String {
    let mut names = Vec::new();
    if before.display_name != after.display_name {
        names.push("display_name");
    }
    if before.owner != after.owner {
        names.push("owner");
    }
    if before.deployments != after.deployments {
        names.push("deployments");
    }
    if before.limits != after.limits {
        names.push("limits");
    }
    if before.deployment_limits != after.deployment_limits {
        names.push("deployment_limits");
    }
    if names.is_empty() {
        "nothing".to_owned()
    } else {
        names.join(", ")
    }
}

/// The registered consumers that are not deleted, for the directory. A document this version
/// cannot read (one a newer replica wrote with a field this one does not know, during a rolling
/// upgrade) keeps the consumer as `previous` had it, so its keys go on working; one cannot stop
/// the others.
pub(crate) fn active_consumers(
    stored: &[tollgate_store::StoredConsumer],
    previous: &[ConsumerConfig],
) -> Vec<ConsumerConfig> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for s in stored {
        match read(&s.document) {
            Ok(doc) if !doc.deleted && seen.insert(doc.consumer.id.clone()) => {
                out.push(doc.consumer)
            }
            Ok(_) => {}
            Err(e) => {
                let kept = previous.iter().find(|c| c.id == s.id);
                tracing::warn!(consumer = %s.id, error = %e, kept = kept.is_some(), "A registered consumer's document is unreadable; the version read before stays in force.");
                if let Some(c) = kept
                    && seen.insert(c.id.clone())
                {
                    out.push(c.clone());
                }
            }
        }
    }
    out
}

/// The documents of `stored` this version can read; the others are skipped with a warning
/// (a listing or the audit trail is not refused for one of them).
fn readable(stored: Vec<tollgate_store::StoredConsumer>) -> Vec<(String, ConsumerDoc)> {
    stored
        .into_iter()
        .filter_map(|s| match read(&s.document) {
            Ok(doc) => Some((s.id, doc)),
            Err(e) => {
                tracing::warn!(consumer = %s.id, error = %e, "A registered consumer's document is unreadable; it is left out.");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, std::sync::Arc<dyn tollgate_store::Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = tollgate_store::open(&tollgate_store::StoreConfig::embedded(dir.path()))
            .await
            .unwrap();
        (dir, store)
    }

    fn active(doc: &ConsumerDoc) -> Vec<String> {
        let now = Utc::now();
        doc.consumer
            .keys
            .iter()
            .filter(|k| k.active(now))
            .map(KeyConfig::id)
            .collect()
    }

    /// Rotation keeps two keys at most: the new primary, and the newest previous key for the
    /// grace; an older one stops at once. The keys issued are stored only as digests.
    #[tokio::test]
    async fn rotation_keeps_the_newest_previous_key_for_the_grace_only() {
        let (_dir, store) = store().await;
        let r = Registry::new(store.as_ref(), &[], "test");
        let (_, k1) = r
            .create("team", ConsumerFields::default(), None)
            .await
            .unwrap();
        let (_, k2) = r.add_key("team", None, None).await.unwrap();
        assert!(matches!(
            r.add_key("team", None, None).await,
            Err(RegistryError::Conflict(_))
        ));
        let (doc, k3) = r.rotate("team", Duration::hours(1), None).await.unwrap();
        let ids = active(&doc);
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(ids.contains(&k3.key_id) && ids.contains(&k2.key_id));
        assert!(!ids.contains(&k1.key_id), "the older key stopped at once");
        let kept = doc
            .consumer
            .keys
            .iter()
            .find(|k| k.id() == k2.key_id)
            .unwrap();
        assert!(kept.expires.unwrap() <= Utc::now() + Duration::hours(1));
        let (doc, k4) = r.rotate("team", Duration::zero(), None).await.unwrap();
        assert_eq!(active(&doc), vec![k4.key_id.clone()]);
        let stored =
            serde_json::to_string(&store.consumer("team").await.unwrap().unwrap().document)
                .unwrap();
        for k in [&k1, &k2, &k3, &k4] {
            assert!(!stored.contains(&k.key), "a key was stored");
        }
        assert!(stored.contains(&hash_key(&k4.key)));
        assert!(
            matches!(
                r.revoke("team", &k4.key_id).await,
                Err(RegistryError::Conflict(_))
            ),
            "the last active key is not revoked"
        );
    }

    /// Changes made at once to one consumer are all applied, one after the other: none is
    /// written over another's read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_changes_are_all_applied() {
        let (_dir, store) = store().await;
        Registry::new(store.as_ref(), &[], "setup")
            .create("team", ConsumerFields::default(), None)
            .await
            .unwrap();
        let tasks = tokio_util::task::TaskTracker::new();
        let mut handles = Vec::new();
        for i in 0..6 {
            let store = store.clone();
            handles.push(tasks.spawn(async move {
                let r = Registry::new(store.as_ref(), &[], format!("admin-{i}"));
                let fields = ConsumerFields {
                    owner: Some(format!("owner-{i}")),
                    ..ConsumerFields::default()
                };
                r.update("team", fields).await
            }));
        }
        let mut applied = 0;
        for t in handles {
            match t.await.unwrap() {
                Ok(_) => applied += 1,
                // Retried ATTEMPTS times against five others: may give up, never lose silently.
                Err(RegistryError::Conflict(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        let doc = Registry::new(store.as_ref(), &[], "x")
            .show("team")
            .await
            .unwrap();
        let updates = doc
            .changes
            .iter()
            .filter(|c| c.action == "consumer.update")
            .count();
        assert_eq!(
            updates, applied,
            "every applied change is in the history, once"
        );
        assert!(applied >= 1);
    }

    /// A document this version cannot read (a newer replica's field) keeps the consumer as it
    /// was read before, and does not fail a listing.
    #[tokio::test]
    async fn an_unreadable_document_keeps_the_last_good_version() {
        let (_dir, store) = store().await;
        let r = Registry::new(store.as_ref(), &[], "test");
        r.create("team", ConsumerFields::default(), None)
            .await
            .unwrap();
        r.create("other", ConsumerFields::default(), None)
            .await
            .unwrap();
        let before = active_consumers(&store.consumers().await.unwrap(), &[]);
        assert_eq!(before.len(), 2);
        let stored = store.consumer("team").await.unwrap().unwrap();
        let mut newer = stored.document.clone();
        newer["consumer"]["a_field_from_the_future"] = serde_json::json!(1);
        store
            .put_consumer("team", &newer, Some(&stored.version))
            .await
            .unwrap()
            .unwrap();
        let after = active_consumers(&store.consumers().await.unwrap(), &before);
        assert_eq!(after, before, "the last good version stays in force");
        let fresh = active_consumers(&store.consumers().await.unwrap(), &[]);
        assert_eq!(
            fresh.len(),
            1,
            "with none read before, only the readable one"
        );
        assert_eq!(r.list(false).await.unwrap().len(), 1);
    }

    /// A consumer the file declares cannot be made or changed in the registry.
    #[tokio::test]
    async fn the_file_s_consumers_are_not_the_registry_s() {
        let (_dir, store) = store().await;
        let file = [ConsumerConfig {
            id: "gitops".into(),
            key_sha256: vec!["ab".repeat(32)],
            ..ConsumerConfig::default()
        }];
        let r = Registry::new(store.as_ref(), &file, "test");
        assert!(matches!(
            r.create("gitops", ConsumerFields::default(), None).await,
            Err(RegistryError::Conflict(_))
        ));
        assert!(matches!(
            r.create("bad/id", ConsumerFields::default(), None).await,
            Err(RegistryError::Invalid(_))
        ));
        let listed = r.list(false).await.unwrap();
        assert_eq!(listed[0].source, "file");
    }
}
