//! The feed units this replica reads: their leases, their checkpoints, and the fair share it
//! takes of a group's units (see `tollgate_store::lease` for the protocol).
//!
//! A unit is held from a successful `acquire` until its lease is lost, handed over on request,
//! or released at shutdown. The checkpoint of a held unit is only ever saved with a renewal of
//! its lease, so a replica that lost a unit cannot move that unit's position.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use tollgate_store::lease::{self, Lease};
use tollgate_store::{ChangeFeed, Checkpoint, StoreError};

/// A unit this replica holds.
pub(crate) struct Held {
    pub(crate) lease: Lease,
    /// The unit's checkpoint as last saved.
    pub(crate) checkpoint: Checkpoint,
    /// The requests pending at the checkpoint have been looked at since the unit was taken
    /// (they may have ended while nobody held it).
    pub(crate) pending_checked: bool,
}

pub(crate) struct Units {
    group: String,
    owner: String,
    ttl: chrono::Duration,
    every: Duration,
    held: BTreeMap<String, Held>,
    last_maintained: Option<Instant>,
}

impl Units {
    pub(crate) fn new(group: String, owner: String, ttl_ms: u64) -> Units {
        Units {
            group,
            owner,
            ttl: chrono::Duration::milliseconds(i64::try_from(ttl_ms).unwrap_or(i64::MAX)),
            // Renewed at a third of the lease: two renewals can fail before it expires.
            every: Duration::from_millis(ttl_ms / 3),
            held: BTreeMap::new(),
            last_maintained: None,
        }
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.held.keys().cloned().collect()
    }

    pub(crate) fn get_mut(&mut self, unit: &str) -> Option<&mut Held> {
        self.held.get_mut(unit)
    }

    pub(crate) fn count(&self) -> usize {
        self.held.len()
    }

    /// How long this replica may still write what it read from `unit`: until a third of its
    /// lease is left (see `ParserConfig::lease_ttl_ms`); `None` once that is past.
    pub(crate) fn usable_for(&self, unit: &str) -> Option<Duration> {
        let held = self.held.get(unit)?;
        let now = Utc::now();
        if !held.lease.usable(now, self.ttl / 3) {
            return None;
        }
        (held.lease.doc.expires - self.ttl / 3 - now).to_std().ok()
    }

    /// Saves `checkpoint` for `unit` with a renewal of its lease. Returns whether the unit is
    /// still held: a lost lease drops it, and so does a hand-over another replica asked for
    /// (released with the checkpoint just saved).
    pub(crate) async fn checkpoint(
        &mut self,
        feed: &dyn ChangeFeed,
        unit: &str,
        checkpoint: Checkpoint,
    ) -> Result<bool, StoreError> {
        let Some(held) = self.held.get_mut(unit) else {
            return Ok(false);
        };
        match lease::renew(feed, &held.lease, &checkpoint, self.ttl).await {
            Ok(lease) => {
                held.lease = lease;
                held.checkpoint = checkpoint;
            }
            Err(StoreError::LeaseLost { .. }) => {
                tracing::warn!(
                    unit,
                    "Lost the lease on a feed unit; another replica reads it now."
                );
                self.held.remove(unit);
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        if held.lease.requested() {
            let lease = held.lease.clone();
            let cp = held.checkpoint.clone();
            self.held.remove(unit);
            lease::release(feed, &lease, &cp).await?;
            tracing::info!(
                unit,
                "Handed a feed unit over to a replica that asked for it."
            );
            return Ok(false);
        }
        Ok(true)
    }

    /// When due (or `now`): renews every held lease, then takes free units up to this
    /// replica's fair share, or asks a replica holding more than its share for one.
    pub(crate) async fn maintain(
        &mut self,
        feed: &dyn ChangeFeed,
        now: bool,
    ) -> Result<(), StoreError> {
        if !now
            && self
                .last_maintained
                .is_some_and(|at| at.elapsed() < self.every)
        {
            return Ok(());
        }
        for unit in self.names() {
            let cp = match self.held.get(&unit) {
                Some(h) => h.checkpoint.clone(),
                None => continue,
            };
            self.checkpoint(feed, &unit, cp).await?;
        }
        self.balance(feed).await?;
        self.last_maintained = Some(Instant::now());
        Ok(())
    }

    async fn balance(&mut self, feed: &dyn ChangeFeed) -> Result<(), StoreError> {
        let units = feed.units();
        let owners = lease::owners(feed, &self.group).await?;
        let replicas = owners.len() + usize::from(!owners.iter().any(|(o, _)| *o == self.owner));
        let share = lease::fair_share(units.len(), replicas);
        // Start at a place of this replica's own, so replicas starting together do not all
        // race for the same first unit.
        let start = tollgate_store::unit_of(&units, &self.owner);
        let offset = units.iter().position(|u| u == start).unwrap_or(0);
        for unit in units.iter().cycle().skip(offset).take(units.len()) {
            if self.held.len() >= share {
                return Ok(());
            }
            if self.held.contains_key(unit) {
                continue;
            }
            if let Some(lease) =
                lease::acquire(feed, &self.group, unit, &self.owner, self.ttl).await?
            {
                tracing::info!(unit, owner = %self.owner, "Took a feed unit.");
                self.held.insert(
                    unit.clone(),
                    Held {
                        checkpoint: lease.checkpoint().clone(),
                        lease,
                        pending_checked: false,
                    },
                );
            }
        }
        if self.held.len() < share
            && let Some((_, their)) = owners
                .iter()
                .filter(|(o, _)| *o != self.owner)
                .max_by_key(|(_, u)| u.len())
            && their.len() > share
            && let Some(unit) = their.first()
        {
            lease::request(feed, &self.group, unit, &self.owner).await?;
        }
        Ok(())
    }

    /// Gives every held unit up with its checkpoint, for another replica (or the next start)
    /// to go on from at once.
    pub(crate) async fn release_all(&mut self, feed: &dyn ChangeFeed) {
        for (unit, held) in std::mem::take(&mut self.held) {
            match lease::release(feed, &held.lease, &held.checkpoint).await {
                Ok(()) | Err(StoreError::LeaseLost { .. }) => {}
                Err(e) => {
                    tracing::warn!(unit, error = %e, "Could not release a feed unit; it is free once its lease expires.");
                }
            }
        }
        self.last_maintained = None;
    }
}
