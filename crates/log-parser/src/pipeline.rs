//! Source → transforms → sinks: reads the change feed from the checkpoint, assembles each
//! request once its `end` record and all its segments are stored, consolidates it, hands the
//! records to every sink, and only then saves the checkpoint.
//!
//! Invariants:
//! - the feed is read by units, each leased by one replica of the group at a time (`units`);
//! - a unit's checkpoint (feed position + requests seen but not finished) is saved only after
//!   every sink acknowledged the batch; a crash replays the page, and sinks are idempotent;
//! - a request is assembled from the store by request id (`read_request`), so the order in
//!   which its records arrive (spool replays may reorder them) does not matter;
//! - a request without its `end` after `incomplete_after_ms` is recorded as incomplete with
//!   what arrived; if the rest arrives later, the full record replaces it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tollgate_records::{ConsolidatedRecord, RawRecord};
use tollgate_store::{ChangeFeed, Checkpoint, PendingRequest};

use crate::units::Units;
use tollgate_tokens::PriceTable;

use crate::config::ParserConfig;
use crate::error::ParserError;
use crate::sink::RecordSink;
use crate::transform::consolidate::{self, Options, Parts};

struct State {
    units: Units,
}

/// Counters for operators and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ParserStats {
    pub raw_records: u64,
    pub consolidated: u64,
    pub incomplete: u64,
    /// Stored documents that could not be read, set aside so the feed moves on.
    pub dead_letters: u64,
    /// Feed units this replica holds now.
    pub units_held: u64,
}

pub struct Parser {
    feed: Arc<dyn ChangeFeed>,
    sinks: Vec<Arc<dyn RecordSink>>,
    config: ParserConfig,
    prices: PriceTable,
    state: Mutex<State>,
    stats: std::sync::Mutex<ParserStats>,
}

impl Parser {
    pub fn new(
        config: ParserConfig,
        feed: Arc<dyn ChangeFeed>,
        sinks: Vec<Arc<dyn RecordSink>>,
    ) -> Result<Self, ParserError> {
        config.validate().map_err(ParserError::Config)?;
        let prices = match &config.price_table_path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ParserError::PriceTable {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })?;
                PriceTable::parse(&text)
            }
            None => PriceTable::bundled(),
        }
        .map_err(|e| ParserError::PriceTable {
            path: config
                .price_table_path
                .as_ref()
                .map_or_else(|| "(bundled)".to_owned(), |p| p.display().to_string()),
            detail: e.to_string(),
        })?;
        tollgate_tokens::Encoding::warm_up();
        let units = Units::new(
            config.checkpoint_name.clone(),
            config.replica(),
            config.lease_ttl_ms,
        );
        Ok(Parser {
            feed,
            sinks,
            config,
            prices,
            state: Mutex::new(State { units }),
            stats: std::sync::Mutex::new(ParserStats::default()),
        })
    }

    pub fn stats(&self) -> ParserStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn options(&self) -> Options<'_> {
        Options {
            deployment_models: &self.config.deployment_models,
            deployment_price_multipliers: &self.config.deployment_price_multipliers,
            prices: &self.prices,
            store_content: self.config.store_content,
        }
    }

    /// Takes or renews this replica's feed units when due, and processes one page of each;
    /// returns how many raw records it read.
    pub async fn run_once(&self) -> Result<usize, ParserError> {
        let mut state = self.state.lock().await;
        let units = &mut state.units;
        let result = self.read_units(units).await;
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .units_held = units.count() as u64;
        result
    }

    async fn read_units(&self, units: &mut Units) -> Result<usize, ParserError> {
        // First, so that the first pass already reads the units it takes.
        units.maintain(self.feed.as_ref(), false).await?;
        let mut read = 0;
        let mut failed = None;
        for unit in units.names() {
            // Between units too: a slow store must not hold a renewal past its lease.
            units.maintain(self.feed.as_ref(), false).await?;
            // One unit's failure (a sink refusing its page) must not keep the others unread.
            match self.read_unit(units, &unit).await {
                Ok(n) => read += n,
                Err(e) => {
                    tracing::warn!(unit, error = %e, "A feed unit's page failed; the others go on.");
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(read),
        }
    }

    /// One page of one unit: requests whose end arrived are consolidated, expired ones recorded
    /// as incomplete, and the unit's checkpoint saved once every sink acknowledged them.
    async fn read_unit(&self, units: &mut Units, unit: &str) -> Result<usize, ParserError> {
        let Some(held) = units.get_mut(unit) else {
            return Ok(0);
        };
        let mut candidates: Vec<String> = Vec::new();
        if !held.pending_checked {
            // Requests pending at the checkpoint may have ended since: look again.
            candidates.extend(held.checkpoint.pending.iter().map(|p| p.request_id.clone()));
        }
        let before = held.checkpoint.clone();
        let page = self
            .feed
            .read(unit, before.position.as_deref(), self.config.batch_size)
            .await?;
        let read = page.records.len() + page.dead_letters.len();
        let mut pending: HashMap<String, PendingRequest> = before
            .pending
            .iter()
            .map(|p| (p.request_id.clone(), p.clone()))
            .collect();
        let now = Utc::now();
        for record in &page.records {
            let id = record.request_id();
            let entry = pending
                .entry(id.to_owned())
                .or_insert_with(|| PendingRequest {
                    request_id: id.to_owned(),
                    first_seen: now,
                    end_seen: false,
                });
            // Kept in the checkpoint: a segment that arrives after its end (spool replays do
            // not keep acceptance order) still completes the request after a restart.
            entry.end_seen |= matches!(record, RawRecord::End(_));
            if entry.end_seen {
                candidates.push(id.to_owned());
            }
        }
        if !page.dead_letters.is_empty() {
            for letter in &page.dead_letters {
                tracing::error!(
                    position = %letter.position,
                    record_id = letter.record_id.as_deref().unwrap_or("-"),
                    error = %letter.error,
                    "A stored raw record cannot be read; it is kept as a dead letter and the feed moves on."
                );
            }
            // Kept before the checkpoint moves past them, so none is ever lost.
            self.feed.dead_letter(&page.dead_letters).await?;
        }
        candidates.sort();
        candidates.dedup();

        let opts = self.options();
        let mut out: Vec<ConsolidatedRecord> = Vec::new();
        let mut finished: Vec<String> = Vec::new();
        // Most requests' records all arrive in one page: those are assembled from it, and only
        // the others are read back by id (on Cosmos DB a query per request).
        let mut in_page: HashMap<String, Vec<RawRecord>> = HashMap::new();
        for record in &page.records {
            in_page
                .entry(record.request_id().to_owned())
                .or_default()
                .push(record.clone());
        }
        for id in candidates {
            let from_page = in_page
                .remove(&id)
                .map(Parts::from_records)
                .filter(Parts::is_complete);
            let parts = match from_page {
                Some(parts) => parts,
                None => Parts::from_records(self.feed.read_request(&id).await?),
            };
            if !parts.is_complete() {
                continue;
            }
            if let Some(r) = consolidate::consolidate(&parts, &opts) {
                out.push(r);
            }
            finished.push(id);
        }
        let deadline = chrono::Duration::milliseconds(self.config.incomplete_after_ms as i64);
        let expired: Vec<String> = pending
            .values()
            .filter(|p| !finished.contains(&p.request_id) && now - p.first_seen > deadline)
            .map(|p| p.request_id.clone())
            .collect();
        let mut incomplete = 0u64;
        for id in expired {
            let parts = Parts::from_records(self.feed.read_request(&id).await?);
            if let Some(r) = consolidate::consolidate(&parts, &opts) {
                tracing::warn!(request_id = %id, "Request never completed; recording it as incomplete.");
                out.push(r);
                incomplete += 1;
            }
            finished.push(id);
        }

        // Renewed first if due (reading the page may have taken a while), then the writes get
        // only the lease's usable time: a write still landing after another replica could
        // have taken the unit would consolidate its requests twice.
        units.maintain(self.feed.as_ref(), false).await?;
        let Some(usable) = units.usable_for(unit) else {
            tracing::warn!(
                unit,
                "Lease on a feed unit is about to expire; its page is left for after the renewal."
            );
            return Ok(0);
        };
        let write_all = async {
            for sink in &self.sinks {
                sink.write(&out).await?;
            }
            Ok::<(), ParserError>(())
        };
        match tokio::time::timeout(usable, write_all).await {
            Ok(written) => written?,
            Err(_) => {
                return Err(ParserError::Sink {
                    sink: "lease",
                    detail: format!(
                        "writing unit {unit}'s page outlasted its lease; the page is read again"
                    ),
                });
            }
        }
        for id in &finished {
            pending.remove(id);
        }
        let mut pending: Vec<PendingRequest> = pending.into_values().collect();
        pending.sort_by(|a, b| {
            a.first_seen
                .cmp(&b.first_seen)
                .then(a.request_id.cmp(&b.request_id))
        });
        let checkpoint = Checkpoint {
            position: page.position.clone(),
            pending,
        };
        if checkpoint != before {
            units
                .checkpoint(self.feed.as_ref(), unit, checkpoint)
                .await?;
        }
        if let Some(held) = units.get_mut(unit) {
            held.pending_checked = true;
        }
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.raw_records += page.records.len() as u64;
        stats.consolidated += out.len() as u64;
        stats.incomplete += incomplete;
        stats.dead_letters += page.dead_letters.len() as u64;
        Ok(read)
    }

    /// Takes what units it can and processes pages until they have nothing new.
    pub async fn catch_up(&self) -> Result<(), ParserError> {
        // Leases first, whether due or not: "everything now" includes a unit released since.
        self.state
            .lock()
            .await
            .units
            .maintain(self.feed.as_ref(), true)
            .await?;
        while self.run_once().await? > 0 {}
        Ok(())
    }

    /// Polls the feed until `cancel` fires, then catches up once more and returns.
    pub async fn run(&self, cancel: CancellationToken) {
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        // Never longer than a renewal interval: a pass is also when leases are renewed, and a
        // replica backing off from a sink outage must not let its units expire and bounce.
        let mut backoff = Backoff::new(
            poll,
            Duration::from_millis(
                self.config
                    .max_retry_interval_ms
                    .min(self.config.lease_ttl_ms / 3),
            ),
        );
        let progress_every = Duration::from_millis(self.config.progress_log_ms.max(1));
        let mut last_progress = std::time::Instant::now();
        loop {
            if last_progress.elapsed() >= progress_every {
                last_progress = std::time::Instant::now();
                self.log_progress().await;
            }
            let wait = match self.run_once().await {
                Ok(read) => {
                    backoff.reset();
                    if read == 0 { poll } else { Duration::ZERO }
                }
                Err(e) => {
                    let wait = backoff.next();
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "Parser pass failed; retrying.");
                    wait
                }
            };
            if cancel.is_cancelled() {
                break;
            }
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = cancel.cancelled() => break,
                }
            }
        }
        if let Err(e) = self.catch_up().await {
            tracing::error!(error = %e, "Final parser pass failed; the checkpoint keeps the rest for the next start.");
        }
        self.release().await;
    }

    async fn log_progress(&self) {
        let units = self.state.lock().await.units.names().join(",");
        let s = self.stats();
        tracing::info!(
            raw_records = s.raw_records,
            consolidated = s.consolidated,
            incomplete = s.incomplete,
            dead_letters = s.dead_letters,
            units_held = s.units_held,
            units = %units,
            "Parser progress."
        );
    }

    /// Gives up every feed unit this replica holds, with its checkpoint, so another replica
    /// (or the next start) goes on at once rather than after the lease expires.
    pub async fn release(&self) {
        let mut state = self.state.lock().await;
        state.units.release_all(self.feed.as_ref()).await;
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .units_held = 0;
    }
}

/// The wait after consecutive failed passes: doubling from the poll interval up to a cap, so a
/// sink that is down (a collector outage) is not hammered, nor the log flooded, every poll.
struct Backoff {
    first: Duration,
    max: Duration,
    current: Option<Duration>,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max: max.max(first),
            current: None,
        }
    }

    fn next(&mut self) -> Duration {
        let wait = match self.current {
            None => self.first,
            Some(d) => (d * 2).min(self.max),
        };
        self.current = Some(wait);
        wait
    }

    fn reset(&mut self) {
        self.current = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_millis(1000));
        let waits: Vec<u128> = (0..5).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits, vec![200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next().as_millis(), 200);
    }
}
