//! Leases on feed units, so several parser replicas share one change feed and each unit is
//! read by one replica at a time.
//!
//! A lease is one document per (group, unit) holding its owner, an expiry and the unit's
//! checkpoint; the checkpoint lives in the lease so that moving the position and proving
//! ownership are one conditional write. Backends provide only a compare-and-swap on that
//! document ([`ChangeFeed::lease_doc`], [`ChangeFeed::put_lease_doc`]); the protocol is here,
//! once, and the conformance suite runs it on every backend.
//!
//! - **Taking**: a unit whose lease is missing, expired, released or already ours is taken by a
//!   conditional write; of two replicas racing, one write fails and that one backs off.
//! - **Keeping**: the owner renews before expiry, saving its checkpoint in the same write; a
//!   renewal that fails the condition means the lease was taken (it had expired): the owner
//!   stops reading that unit at once and throws away what it had not checkpointed.
//! - **Balancing**: a replica holding fewer than its fair share asks an owner with more than
//!   its share to hand one over (`requested_by`); the owner releases it at its next checkpoint,
//!   so a unit never has two readers at once. Only a lease whose owner stopped renewing (a
//!   dead replica) is taken without asking, once it has expired.
//! - **Clocks**: expiry is wall-clock time written by the owner and read by the others, so
//!   replicas' clocks must agree to well within the lease's lifetime; an owner stops writing
//!   to its sinks once less than a safety margin of its lease is left ([`Lease::usable`]).

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::{ChangeFeed, Checkpoint, StoreError};

/// The stored form of a lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseDoc {
    pub group: String,
    pub unit: String,
    /// The replica that took it last; it holds the unit until `expires`.
    #[serde(default)]
    pub owner: Option<String>,
    pub expires: DateTime<Utc>,
    /// A replica that asked for this unit; the owner releases it at its next checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    #[serde(default)]
    pub checkpoint: Checkpoint,
}

/// A lease document with the backend's version of it (a row version, an etag).
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub doc: LeaseDoc,
    pub version: String,
}

/// A lease this replica holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub doc: LeaseDoc,
    version: String,
}

impl Lease {
    pub fn unit(&self) -> &str {
        &self.doc.unit
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.doc.checkpoint
    }

    /// Whether another replica asked for this unit.
    pub fn requested(&self) -> bool {
        self.doc.requested_by.is_some()
    }

    /// Whether the owner may still act on the lease: more than `margin` of it is left, so it
    /// cannot have been taken over by a replica whose clock is up to `margin` ahead.
    pub fn usable(&self, now: DateTime<Utc>, margin: Duration) -> bool {
        self.doc.expires - margin > now
    }
}

/// Whether `owner` may take the lease: nobody holds it, `owner` does, or it expired. A lease
/// handed over on request stays reserved for the replica that asked, for one lease period,
/// so the replica that let it go does not take it straight back.
fn free_for(doc: &LeaseDoc, owner: &str, now: DateTime<Utc>, ttl: Duration) -> bool {
    if doc.owner.as_deref() == Some(owner) && doc.expires > now {
        return true;
    }
    if let Some(r) = &doc.requested_by
        && r != owner
        && now < doc.expires + ttl
    {
        return false;
    }
    match &doc.owner {
        None => true,
        Some(o) if o == owner => true,
        Some(_) => doc.expires <= now,
    }
}

/// Takes `unit` for `owner` if nobody holds it, its lease expired, or `owner` already holds
/// it; `None` if another replica holds it or won a race for it.
pub async fn acquire(
    feed: &dyn ChangeFeed,
    group: &str,
    unit: &str,
    owner: &str,
    ttl: Duration,
) -> Result<Option<Lease>, StoreError> {
    let now = Utc::now();
    let current = feed.lease_doc(group, unit).await?;
    let (checkpoint, expected) = match current {
        Some(v) if !free_for(&v.doc, owner, now, ttl) => return Ok(None),
        Some(v) => (v.doc.checkpoint, Some(v.version)),
        None => (Checkpoint::default(), None),
    };
    let doc = LeaseDoc {
        group: group.to_owned(),
        unit: unit.to_owned(),
        owner: Some(owner.to_owned()),
        expires: now + ttl,
        requested_by: None,
        checkpoint,
    };
    Ok(feed
        .put_lease_doc(&doc, expected.as_deref())
        .await?
        .map(|version| Lease { doc, version }))
}

/// Extends `lease` and saves `checkpoint` in it; [`StoreError::LeaseLost`] if another replica
/// took it. The renewed lease keeps a hand-over request another replica made since.
pub async fn renew(
    feed: &dyn ChangeFeed,
    lease: &Lease,
    checkpoint: &Checkpoint,
    ttl: Duration,
) -> Result<Lease, StoreError> {
    let lost = || StoreError::LeaseLost {
        unit: lease.doc.unit.clone(),
    };
    let mut doc = lease.doc.clone();
    let mut expected = lease.version.clone();
    // A hand-over request changes the version without taking the lease: read it and retry
    // once on top of it; any other change means the lease is gone.
    for _ in 0..2 {
        doc.expires = Utc::now() + ttl;
        doc.checkpoint = checkpoint.clone();
        if let Some(version) = feed.put_lease_doc(&doc, Some(&expected)).await? {
            return Ok(Lease { doc, version });
        }
        match feed.lease_doc(&doc.group, &doc.unit).await? {
            // Only a request changed it: the stored lease is the one this replica last wrote
            // in everything else. Anything more (a renewal that landed although its answer was
            // lost, another process under the same name) means this replica's view is stale,
            // and writing over it could move the checkpoint back.
            Some(v)
                if v.doc.requested_by.is_some()
                    && LeaseDoc {
                        requested_by: None,
                        ..v.doc.clone()
                    } == LeaseDoc {
                        requested_by: None,
                        ..lease.doc.clone()
                    } =>
            {
                doc.requested_by = v.doc.requested_by;
                expected = v.version;
            }
            _ => return Err(lost()),
        }
    }
    Err(lost())
}

/// Gives the unit up with `checkpoint` saved, for the next owner to go on from: the lease
/// expires now, which makes it free to take.
pub async fn release(
    feed: &dyn ChangeFeed,
    lease: &Lease,
    checkpoint: &Checkpoint,
) -> Result<(), StoreError> {
    renew(feed, lease, checkpoint, Duration::zero())
        .await
        .map(|_| ())
}

/// Asks the owner of `unit` to hand it over to `by`; false if the lease changed meanwhile.
pub async fn request(
    feed: &dyn ChangeFeed,
    group: &str,
    unit: &str,
    by: &str,
) -> Result<bool, StoreError> {
    let Some(current) = feed.lease_doc(group, unit).await? else {
        return Ok(false);
    };
    if current.doc.requested_by.is_some() {
        return Ok(true);
    }
    let mut doc = current.doc;
    doc.requested_by = Some(by.to_owned());
    Ok(feed
        .put_lease_doc(&doc, Some(&current.version))
        .await?
        .is_some())
}

/// The live replicas of a group with the units each holds: the owners of unexpired leases, and
/// the replicas that asked for one (they hold nothing yet, but share the work, so an owner
/// that counted only owners would think itself alone and take every unit back).
pub async fn owners(
    feed: &dyn ChangeFeed,
    group: &str,
) -> Result<Vec<(String, Vec<String>)>, StoreError> {
    let now = Utc::now();
    let mut owners: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for v in feed.lease_docs(group).await? {
        if v.doc.expires <= now {
            continue;
        }
        if let Some(r) = v.doc.requested_by {
            owners.entry(r).or_default();
        }
        if let Some(o) = v.doc.owner {
            owners.entry(o).or_default().push(v.doc.unit);
        }
    }
    Ok(owners.into_iter().collect())
}

/// How many of `units` a replica should hold when `replicas` share them: the ceiling, so the
/// units are all held even when they do not divide evenly.
pub fn fair_share(units: usize, replicas: usize) -> usize {
    units.div_ceil(replicas.max(1))
}
