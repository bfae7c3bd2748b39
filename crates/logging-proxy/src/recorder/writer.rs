//! The writer task: drains the queue into the store in batches, spools what the store cannot
//! take, replays the spool, and sets aside records the store rejects for good. Records it
//! stored, dead-lettered or spooled are marked settled in the journal's ledger.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tollgate_records::RawRecord;
use tollgate_store::{RawWriter, StoreError};

use super::journal::{Journal, Ledger};
use super::spooler::SpoolHandle;
use super::{Item, QueueBudget, RecorderStats};

pub(super) struct Writer {
    pub(super) rx: mpsc::Receiver<Item>,
    pub(super) store: Arc<dyn RawWriter>,
    pub(super) spool: SpoolHandle,
    pub(super) queue: Arc<QueueBudget>,
    /// Woken when queue space is freed, for request tasks waiting in `Recorder::record`.
    pub(super) space: Arc<Notify>,
    /// Woken by the spool thread when records reach the spool.
    pub(super) spool_ready: Arc<Notify>,
    pub(super) max_batch: usize,
    /// Most (estimated) bytes read from the spool in one replay batch.
    pub(super) max_batch_bytes: u64,
    pub(super) linger: Duration,
    pub(super) retry_interval: Duration,
    pub(super) next_retry: Instant,
    pub(super) stats: Arc<RecorderStats>,
    pub(super) ledger: Arc<Ledger>,
    /// Stopped after the spool, once everything is stored or spooled.
    pub(super) journal: Journal,
    /// Set at shutdown: past it, writes to the store give up (the records go to the spool,
    /// replayed at the next start), so a slow store cannot hold a stop beyond its grace.
    pub(super) drain_by: tokio::sync::watch::Receiver<Option<Instant>>,
}

/// How far a write of a run of records got.
struct Written {
    /// Records from the start that are done: stored or dead-lettered.
    done: usize,
    /// Of those, stored.
    stored: u64,
}

impl Writer {
    pub(super) async fn run(mut self, cancel: CancellationToken) {
        let mut items = Vec::with_capacity(self.max_batch);
        loop {
            let spool_waiting = !self.spool.is_empty();
            let received = tokio::select! {
                n = self.rx.recv_many(&mut items, self.max_batch) => n,
                () = cancel.cancelled() => {
                    self.rx.close();
                    0
                }
                () = tokio::time::sleep_until(self.next_retry), if spool_waiting => {
                    if !self.replay().await && !self.spool.is_empty() {
                        // Nothing to read yet the spool reports records: do not spin on it.
                        self.next_retry = Instant::now() + self.retry_interval;
                    }
                    continue;
                }
                // A record went to the spool with the queue empty (over the byte budget):
                // look again, so it is replayed without waiting for the next queued record.
                () = self.spool_ready.notified(), if !spool_waiting => continue,
            };
            if received == 0 {
                // Closed: drain what is left, then stop.
                while let Some(item) = self.rx.recv().await {
                    items.push(item);
                    if items.len() >= self.max_batch {
                        self.process(&mut items).await;
                    }
                }
                self.process(&mut items).await;
                self.next_retry = Instant::now();
                self.replay().await;
                self.spool.barrier().await;
                self.spool.stop();
                self.journal.stop();
                return;
            }
            self.linger(&mut items).await;
            self.process(&mut items).await;
        }
    }

    /// Waits up to the flush interval for a fuller batch: one store transaction for many
    /// records costs far less than one per record, and only the records wait, not clients.
    /// A flush request ends the wait at once.
    async fn linger(&mut self, items: &mut Vec<Item>) {
        let is_flush = |i: &Item| matches!(i, Item::Flush(_));
        if self.linger.is_zero() || items.iter().any(is_flush) {
            return;
        }
        let deadline = Instant::now() + self.linger;
        while items.len() < self.max_batch {
            let before = items.len();
            let room = self.max_batch - before;
            match tokio::time::timeout_at(deadline, self.rx.recv_many(items, room)).await {
                Ok(0) | Err(_) => return,
                Ok(_) if items[before..].iter().any(is_flush) => return,
                Ok(_) => {}
            }
        }
    }

    async fn process(&mut self, items: &mut Vec<Item>) {
        let mut records = Vec::with_capacity(items.len());
        let mut jsons = Vec::with_capacity(items.len());
        let mut seqs = Vec::with_capacity(items.len());
        let mut bytes = 0;
        let mut flushes = Vec::new();
        for item in items.drain(..) {
            match item {
                Item::Record(r, json, size, seq) => {
                    records.push(*r);
                    jsons.push(json);
                    seqs.push(seq);
                    bytes += size;
                }
                Item::Flush(done) => flushes.push(done),
            }
        }
        // Queue slots are free again.
        self.space.notify_waiters();
        if !records.is_empty() {
            self.write(records, jsons, seqs).await;
        }
        // The bytes stay counted until the records are written or spooled: the budget bounds
        // what the writer holds too.
        self.queue.release(bytes);
        self.space.notify_waiters();
        if !flushes.is_empty() {
            self.next_retry = Instant::now();
            self.replay().await;
            // Records offered to the spool before the flush are on disk (or in its tail).
            self.spool.barrier().await;
            for done in flushes {
                let _ = done.send(());
            }
        }
    }

    /// Writes a batch from the queue (`seqs`: the records' journal sequence numbers).
    /// `jsons`: each record's JSON when it was made already (for the journal).
    async fn write(
        &mut self,
        mut records: Vec<RawRecord>,
        jsons: Vec<Option<Arc<str>>>,
        mut seqs: Vec<u64>,
    ) {
        if self.spool.is_empty() {
            let written = self.store_isolating_with(&records, &jsons).await;
            // Used for the first attempt only: what is retried or spooled is serialised again,
            // and the JSON is not held through the retries.
            drop(jsons);
            self.ledger.settle(seqs.drain(..written.done));
            if written.done == records.len() {
                return;
            }
            tracing::warn!(
                records = records.len() - written.done,
                "Store write failed; spooling the batch."
            );
            self.next_retry = Instant::now() + self.retry_interval;
            records.drain(..written.done);
        }
        self.spool_or_hold(records, seqs).await;
        self.replay().await;
    }

    /// Puts a batch in the spool. A batch already accepted must not be lost, so when the spool
    /// cannot take it (disk refusing and memory spent) the writer holds it and retries the
    /// store and the spool until one accepts; the queue then fills, `record` waits, and the
    /// proxy stops accepting new requests meanwhile.
    async fn spool_or_hold(&mut self, mut records: Vec<RawRecord>, mut seqs: Vec<u64>) {
        let mut warned = false;
        loop {
            let n = records.len() as u64;
            match self.spool.append(records).await {
                Ok(()) => {
                    // On disk, or in the spool's memory (which the journal checks itself).
                    self.ledger.settle(seqs);
                    self.stats.spooled.fetch_add(n, Ordering::Relaxed);
                    return;
                }
                Err(back) => records = back,
            }
            if records.is_empty() {
                return;
            }
            if !warned {
                tracing::error!(
                    records = records.len(),
                    "Spool refused a batch; holding it and retrying the store until it accepts."
                );
                warned = true;
            }
            tokio::time::sleep(self.retry_interval).await;
            let written = self.store_isolating(&records).await;
            self.ledger.settle(seqs.drain(..written.done));
            if written.done == records.len() {
                return;
            }
            records.drain(..written.done);
        }
    }

    /// Replays the spool into the store, oldest first, until it is empty or the store fails.
    /// Whether anything was read.
    async fn replay(&mut self) -> bool {
        if Instant::now() < self.next_retry {
            return false;
        }
        let mut read_any = false;
        loop {
            let batch = match self.spool.read(self.max_batch, self.max_batch_bytes).await {
                Ok(Some(b)) => b,
                Ok(None) => return read_any,
                Err(e) => {
                    tracing::error!(error = %e, "Spool could not be read.");
                    self.next_retry = Instant::now() + self.retry_interval;
                    return read_any;
                }
            };
            read_any = true;
            let total = batch.records.len();
            let written = self.store_isolating(&batch.records).await;
            self.stats
                .replayed
                .fetch_add(written.stored, Ordering::Relaxed);
            self.spool.settle(batch, written.done);
            if written.done < total {
                tracing::warn!("Store still failing; spool replay postponed.");
                self.next_retry = Instant::now() + self.retry_interval;
                return read_any;
            }
        }
    }

    /// Writes `records` in order, setting aside those the store rejects for good: a batch
    /// refused with a non-transient error is split (around the record the store named, else
    /// in halves) until the refused records stand alone, and each is dead-lettered. Stops at
    /// the first transient failure (or a dead letter that could not be written); what is
    /// before that point is done.
    async fn store_isolating(&self, records: &[RawRecord]) -> Written {
        self.store_isolating_with(records, &[]).await
    }

    /// [`Writer::store_isolating`] with the records' JSON where it was made already (index for
    /// index with `records`; absent or shorter: the store serialises).
    async fn store_isolating_with(
        &self,
        records: &[RawRecord],
        jsons: &[Option<Arc<str>>],
    ) -> Written {
        debug_assert!(jsons.is_empty() || jsons.len() == records.len());
        let mut ranges = VecDeque::from([(0, records.len())]);
        let mut stored = 0;
        while let Some((lo, hi)) = ranges.pop_front() {
            if lo == hi {
                continue;
            }
            let Some(run) = records.get(lo..hi) else {
                break;
            };
            // A write already waiting on the store when the stop begins is cut at the deadline
            // too: an in-flight append that may or may not land is spooled and replayed, and
            // appends are idempotent by record id.
            let result = tokio::select! {
                r = self.store.append_encoded(run, jsons.get(lo..hi).unwrap_or_default()) => r,
                () = grace_over(self.drain_by.clone()) => Err(StoreError::Unavailable(
                    "the shutdown grace period is over".into(),
                )),
            };
            let e = match result {
                Ok(()) => {
                    stored += run.len() as u64;
                    self.stats
                        .written
                        .fetch_add(run.len() as u64, Ordering::Relaxed);
                    continue;
                }
                Err(e) => e,
            };
            self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
            if e.is_transient() {
                tracing::debug!(error = %e, "Store write failed (transient).");
                return Written { done: lo, stored };
            }
            if let [record] = run {
                if self.dead_letter(record, &e).await {
                    continue;
                }
                return Written { done: lo, stored };
            }
            tracing::warn!(error = %e, records = run.len(), "Store refused a batch for good; isolating the records it refuses.");
            let named = match &e {
                StoreError::Rejected { id, .. } => run.iter().position(|r| r.id() == *id),
                _ => None,
            };
            // Pushed to the front in reverse, so the pieces are written in order.
            match named {
                Some(i) => {
                    let i = lo + i;
                    ranges.push_front((i + 1, hi));
                    ranges.push_front((i, i + 1));
                    ranges.push_front((lo, i));
                }
                None => {
                    let mid = lo + (hi - lo) / 2;
                    ranges.push_front((mid, hi));
                    ranges.push_front((lo, mid));
                }
            }
        }
        Written {
            done: records.len(),
            stored,
        }
    }

    /// Sets a record the store refused for good aside in the dead-letter file. False when that
    /// failed: the record is then kept and retried like a transient failure, never dropped.
    async fn dead_letter(&self, record: &RawRecord, error: &StoreError) -> bool {
        match self.spool.dead_letter(record, error.to_string()).await {
            Ok(path) => {
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    record_id = %record.id(),
                    error = %error,
                    file = %path.display(),
                    "Store rejected a record for good; it was written to the dead-letter file."
                );
                true
            }
            Err(e) => {
                tracing::error!(
                    record_id = %record.id(),
                    store_error = %error,
                    error = %e,
                    "A record the store rejected could not be dead-lettered; keeping it and retrying."
                );
                false
            }
        }
    }
}

/// Completes once a drain deadline is set and has passed; never before.
async fn grace_over(mut deadline: tokio::sync::watch::Receiver<Option<Instant>>) {
    loop {
        let set = *deadline.borrow_and_update();
        if let Some(at) = set {
            tokio::time::sleep_until(at).await;
            return;
        }
        if deadline.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
