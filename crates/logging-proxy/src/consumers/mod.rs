//! Consumers: who may call, with which keys, on which deployments, within which limits.
//!
//! One model serves both sources: the configuration file (`[[proxy.consumers]]`, GitOps,
//! validated at start and on reload) and the registry in the store (`registry.rs`: created,
//! rotated and revoked at run time by `tollgate consumers` / `tollgate keys` and the admin
//! API). Both are compiled into a [`Directory`], the form authentication and the limits phase
//! read; `poll.rs` rebuilds it when the registry changes, so every replica sees a change
//! within one poll interval. Where both declare an id, the file wins.

pub(crate) mod poll;
pub mod registry;

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A consumer: who may call, identified by the SHA-256 of its key. Keys themselves are never in
/// the configuration; `tollgate keys new` prints a key and the hash to put here.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    pub id: String,
    /// For people: a team or app name, and who answers for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Deployments it may call; any when empty. Others get 403 `PermissionDenied`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deployments: Vec<String>,
    /// Hex SHA-256 digests of the consumer's keys, without expiry (`keys` can say more).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_sha256: Vec<String>,
    /// Keys with an expiry and a name (`primary`, `secondary`): at most two unexpired at once,
    /// so a rotation overlaps without downtime.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyConfig>,
    /// Requests and tokens per minute, token quotas per day and month, a cost budget per
    /// month (`quota.rs`).
    #[serde(
        default,
        skip_serializing_if = "crate::quota::ConsumerLimits::is_empty"
    )]
    pub limits: crate::quota::ConsumerLimits,
    /// The same, for one deployment: both the consumer's and these apply.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deployment_limits: BTreeMap<String, crate::quota::ConsumerLimits>,
}

/// One consumer key, by its digest.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub sha256: String,
    /// After this instant (RFC 3339) the key gets 401.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When it was issued (the registry sets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<DateTime<Utc>>,
}

impl KeyConfig {
    /// The key's public id, as records name it: the first 4 bytes of its digest in hex (the
    /// digest of a 256-bit random key reveals nothing of it).
    pub fn id(&self) -> String {
        key_id(&self.sha256)
    }

    pub fn active(&self, now: DateTime<Utc>) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

/// A key's public id from its hex digest.
pub(crate) fn key_id(sha256_hex: &str) -> String {
    sha256_hex
        .trim()
        .chars()
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Unexpired keys a consumer may have at once: a primary and a secondary.
pub const ACTIVE_KEYS: usize = 2;

/// Consumers compiled for the request path: every key with its consumer, who may call what,
/// and whose limits count.
#[derive(Debug, Clone, Default)]
pub(crate) struct Directory {
    pub keys: crate::auth::Keys,
    /// Consumer id → the deployments it may call (consumers that may call any are absent).
    pub allowed: HashMap<String, Vec<String>>,
    /// Consumer id → its limits (consumers without any are absent).
    pub limits: HashMap<String, crate::quota::Limits>,
    pub ids: HashSet<String>,
}

impl Directory {
    /// Adds `c`, or nothing of it when something is wrong (every problem listed).
    pub(crate) fn add(
        &mut self,
        c: &ConsumerConfig,
        now: DateTime<Utc>,
    ) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        // Ids name limit counters (`{consumer}|…`) and Redis hash tags (`{consumer}`).
        if c.id.is_empty() || c.id.contains(['|', '{', '}']) {
            problems.push(format!(
                "proxy.consumers: the id `{}` must be non-empty, without `|`, `{{` or `}}`",
                c.id
            ));
        }
        if self.ids.contains(&c.id) {
            problems.push(format!("proxy.consumers: the id `{}` is used twice", c.id));
        }
        for (scope, l) in std::iter::once((String::new(), &c.limits)).chain(
            c.deployment_limits
                .iter()
                .map(|(d, l)| (format!(".deployment_limits.{d}"), l)),
        ) {
            for zero in l.zeros() {
                problems.push(format!(
                    "proxy.consumers `{}`{scope}: {zero} must be greater than 0 (leave it out for no limit)",
                    c.id
                ));
            }
        }
        for (d, l) in &c.deployment_limits {
            if l.cost_per_month.is_some() {
                problems.push(format!(
                    "proxy.consumers `{}`.deployment_limits.{d}: cost_per_month is a limit of the whole consumer (set it in limits)",
                    c.id
                ));
            }
        }
        if c.key_sha256.is_empty() && c.keys.is_empty() {
            problems.push(format!("proxy.consumers `{}` has no key", c.id));
        }
        let keys = c
            .key_sha256
            .iter()
            .map(|k| ("key_sha256", k, None))
            .chain(c.keys.iter().map(|k| ("keys.sha256", &k.sha256, k.expires)));
        let mut entries: Vec<crate::auth::KeyEntry> = Vec::new();
        let mut active = 0;
        for (field, k, expires) in keys {
            active += usize::from(expires.is_none_or(|e| e > now));
            match crate::config::parse_digest(k) {
                // One key must name one consumer: with a duplicate, whichever matched last
                // would be charged.
                Some(d)
                    if self.keys.contains_key(&crate::auth::Digest32(d))
                        || entries.iter().any(|e| e.digest == d) =>
                {
                    problems.push(format!(
                        "proxy.consumers `{}`: {field} `{k}` is already used",
                        c.id
                    ))
                }
                Some(digest) => entries.push(crate::auth::KeyEntry {
                    consumer: c.id.clone(),
                    digest,
                    expires,
                }),
                None => problems.push(format!(
                    "proxy.consumers `{}`: {field} `{k}` is not 64 hex characters",
                    c.id
                )),
            }
        }
        if active > ACTIVE_KEYS {
            problems.push(format!(
                "proxy.consumers `{}`: {active} unexpired keys; at most {ACTIVE_KEYS} (primary and secondary)",
                c.id
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        self.keys.extend(
            entries
                .into_iter()
                .map(|e| (crate::auth::Digest32(e.digest), e)),
        );
        self.ids.insert(c.id.clone());
        let none = crate::quota::ConsumerLimits::default();
        if c.limits != none || c.deployment_limits.values().any(|l| *l != none) {
            self.limits.insert(
                c.id.clone(),
                crate::quota::Limits {
                    all: c.limits.clone(),
                    per_deployment: c.deployment_limits.clone(),
                },
            );
        }
        if !c.deployments.is_empty() {
            self.allowed.insert(c.id.clone(), c.deployments.clone());
        }
        Ok(())
    }

    /// The file's consumers joined by the registry's: a registered consumer whose id the file
    /// declares, or that cannot be added (a key another consumer has), is left out with a
    /// warning; the others are unaffected.
    pub(crate) fn with_registered(&self, registered: &[ConsumerConfig]) -> Directory {
        let mut out = self.clone();
        let now = Utc::now();
        for c in registered {
            if self.ids.contains(&c.id) {
                tracing::warn!(consumer = %c.id, "A registered consumer has the id of one the configuration file declares; the file's is used.");
                continue;
            }
            if let Err(problems) = out.add(c, now) {
                tracing::warn!(consumer = %c.id, ?problems, "A registered consumer was left out.");
            }
        }
        out
    }
}
