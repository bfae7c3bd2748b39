//! The recorder: takes raw records from request tasks without waiting on the store or the
//! disk, and writes them to the store in batches from one writer task.
//!
//! Invariants:
//! - **nothing accepted is lost or silently dropped.** A record handed over is in the queue, the
//!   spool (on disk, or in memory while the disk refuses writes), the store, or the dead-letter
//!   file. The only exits besides the store are ERROR log lines with a counter: a spooled frame
//!   found corrupt (`corrupt`), a record the store rejects for good (`dead_lettered`), and records
//!   still in memory when the process stops with both disk and store refusing them;
//! - **a response's last byte waits for its records to be in a file.** `try_record` first adds
//!   the record to the write-ahead journal's buffer (`journal.rs`: one thread writes everything
//!   buffered with one write and publishes how far it got) and returns its ticket; the tee
//!   holds the response's last chunk until [`Recorder::journaled`] says the `end` record is
//!   written. So a response the client has in full survives a SIGKILL of the proxy: journal
//!   files an earlier run left are replayed through the spool at start;
//! - **a request task never waits on the store or on file I/O.** `try_record` puts the record
//!   in the queue, else hands it to the spool thread over a channel; only when both are full
//!   does it give the record back, and `record` then waits for space. All spool and
//!   dead-letter file I/O runs on the spool thread (`spooler.rs`), all journal I/O on the
//!   journal thread, never on an async worker;
//! - **a record leaves the spool only after the store confirmed it** (or it was dead-lettered);
//! - **order:** the queue and the spool are each first in, first out; while the spool holds
//!   anything, the writer appends new batches behind it and replays it oldest first. A record
//!   that overflows to the spool can still reach the store before records queued earlier (the
//!   parser does not depend on arrival order: it reads a request's records by id);
//! - **a store error never blocks the recorder for ever.** A transient error
//!   ([`StoreError::is_transient`](tollgate_store::StoreError::is_transient)) spools the batch
//!   and retries every `retry_interval`. A non-transient one splits the batch until the
//!   refused records stand alone; each goes to `<spool_dir>/dead-letter.jsonl` (JSON lines:
//!   record id, error, time, the record) and the rest carries on.
//!
//! Limits (all in `[proxy.recorder]`):
//! - `queue_capacity` records and `queue_max_bytes` (estimated from body and segment lengths,
//!   [`estimated_size`]) in memory between request tasks and the store, the writer's batch
//!   included; a record over either limit goes to the spool as a full queue's does;
//! - `max_batch_records` per store write (and per replay read, which also stops at
//!   `queue_max_bytes`);
//! - `spool_max_bytes` on disk; new requests are refused (503) before it is reached, and while
//!   the disk refuses spool writes;
//! - `spool_buffer_max_bytes` of records handed to the spool thread and not yet on disk;
//! - `dead_letter_max_bytes` for the dead-letter file; when full, rejected records stay in the
//!   spool and are retried (the spool fills and requests are refused, nothing is dropped);
//! - `spool_fsync` (`never` by default): see the spool's module doc for what each choice survives;
//! - `journal_max_bytes` on disk, `journal_file_max_bytes` per file, `journal_buffer_max_bytes`
//!   of frames waiting for the journal thread, `journal_fsync`: see the journal's module doc.
//!
//! `flush` waits until every request in flight has emitted its `end` record and every record
//! before the call is in the store (or, if the store is down, in the spool) — tests and the
//! admin endpoint synchronise on it instead of sleeping. `shutdown` drains the queue and exits.

mod journal;
pub(crate) mod spool;
mod spooler;
mod watermark;
mod writer;

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_records::{Body, RawRecord, SegmentData};
use tollgate_store::RawWriter;

use self::journal::{Journal, JournalSettings, Ledger, UNJOURNALED};
pub use self::spool::SpoolFsync;
use self::spool::{Opener, Spool, SpoolError, SpoolLimits};
use self::spooler::{DeadLetters, SpoolHandle, SpoolerSettings};
use self::writer::Writer;

enum Item {
    // Boxed: records are large and the queue's slots are sized by the largest variant. Then
    // the record's JSON when it was made for the journal (the store's document reuses it);
    // what the item counts in the queue's byte budget (the record's estimated size and that
    // JSON); and its journal sequence number, settled once the record is stored or spooled.
    Record(Box<RawRecord>, Option<Arc<str>>, u64, u64),
    Flush(oneshot::Sender<()>),
}

/// Counters for operators and benchmarks.
#[derive(Debug, Default)]
pub struct RecorderStats {
    /// Records accepted (queued or spooled).
    pub enqueued: AtomicU64,
    pub written: AtomicU64,
    pub spooled: AtomicU64,
    pub replayed: AtomicU64,
    pub store_errors: AtomicU64,
    /// Spooled records found corrupt (checksum, torn tail) and dropped.
    pub corrupt: AtomicU64,
    /// Records the store rejected for good, written to the dead-letter file.
    pub dead_lettered: AtomicU64,
    /// Spool writes that failed (the records were kept in memory and retried).
    pub spool_errors: AtomicU64,
    /// Records written to the journal.
    pub journaled: AtomicU64,
    /// Journal writes that failed.
    pub journal_errors: AtomicU64,
    /// Records handed over but not journaled (a failed write, a journal over its caps): their
    /// responses did not wait, so a SIGKILL could lose them.
    pub unjournaled: AtomicU64,
    /// Records that found queue and spool full and waited in memory for room.
    pub overflowed: AtomicU64,
    /// Records still waiting for room at shutdown that were not journaled either: lost.
    pub overflow_lost: AtomicU64,
}

/// A cheap estimate of a record's size, in memory and in the spool: bodies and segment data
/// dominate, everything else is a small overhead. Lengths only, nothing is serialised.
pub(crate) fn estimated_size(record: &RawRecord) -> u64 {
    const OVERHEAD: usize = 512;
    let body = |b: &Body| match b {
        Body::Empty => 0,
        Body::Json { json } => json.as_str().len(),
        Body::Text { text, .. } => text.len(),
        Body::Base64 { data, .. } => data.len(),
        // The bytes are in the request's `part` records, each estimated on its own.
        Body::Parts { .. } => 0,
    };
    let data = |d: &SegmentData| match d {
        SegmentData::Utf8(s) | SegmentData::Base64(s) => s.len(),
    };
    let headers = |h: &std::collections::BTreeMap<String, String>| {
        h.iter().map(|(k, v)| k.len() + v.len() + 8).sum::<usize>()
    };
    let n = match record {
        RawRecord::Request(r) => {
            OVERHEAD
                + body(&r.body)
                + headers(&r.headers)
                + r.path.len()
                + r.query.as_ref().map_or(0, String::len)
        }
        RawRecord::Part(p) => OVERHEAD + data(&p.data),
        RawRecord::Chunks(c) => OVERHEAD + data(&c.data) + c.arrivals.len() * 24,
        RawRecord::End(e) => {
            OVERHEAD + body(&e.body) + headers(&e.headers) + e.attempts.len() * 128
        }
    };
    n as u64
}

/// The queue's byte budget: estimated bytes of records queued or in the writer's hands.
pub(crate) struct QueueBudget {
    bytes: AtomicU64,
    max_bytes: u64,
}

impl QueueBudget {
    /// Counts `size` in, if it fits; `patient` callers (already refused by the spool) also get
    /// in when the queue holds nothing, so a record over the whole budget is not refused for
    /// ever.
    fn reserve(&self, size: u64, patient: bool) -> bool {
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                let fits = b + size <= self.max_bytes || (patient && b == 0);
                fits.then_some(b + size)
            })
            .is_ok()
    }

    fn release(&self, size: u64) {
        self.bytes.fetch_sub(size, Ordering::AcqRel);
    }
}

/// Headroom below the spool cap at which new requests are refused, so the requests already
/// accepted still have room for their records: a quarter of the cap, at most 8 MiB.
fn spool_headroom(max_bytes: u64) -> u64 {
    (max_bytes / 4).min(8 * 1024 * 1024)
}

/// A record's place in the journal, to wait on with [`Recorder::journaled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Journaled(u64);

/// A record neither the queue nor the spool could take; already journaled. Wait for space
/// with [`Recorder::requeue`].
#[derive(Debug)]
pub(crate) struct Refused {
    record: Box<RawRecord>,
    size: u64,
    seq: u64,
}

impl Refused {
    pub(crate) fn ticket(&self) -> Journaled {
        Journaled(self.seq)
    }
}

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Item>,
    journal: Journal,
    queue: Arc<QueueBudget>,
    spool: SpoolHandle,
    /// Woken when queue or spool memory is freed.
    space: Arc<Notify>,
    overflow: Arc<Overflow>,
    inflight: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    stats: Arc<RecorderStats>,
    /// See [`Recorder::drain_until`].
    drain_by: Arc<tokio::sync::watch::Sender<Option<Instant>>>,
}

/// Records neither the queue nor the spool could take (both full), in arrival order, waiting
/// for room. Bounded in practice by admission: a full spool refuses new requests, so only the
/// requests already in flight add to it. One task drains it ([`Recorder::feed_overflow`]).
#[derive(Default)]
struct Overflow {
    records: Mutex<VecDeque<Refused>>,
    bytes: AtomicU64,
    ready: Notify,
    /// Records listed and not yet in the queue or the spool (one may be in the feeding task's
    /// hands), and a wake-up when that reaches zero: `flush` waits for it.
    pending: AtomicUsize,
    emptied: Notify,
}

impl Overflow {
    fn push(&self, refused: Refused, stats: &RecorderStats) {
        let size = refused.size;
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        if records.is_empty() {
            tracing::warn!("Queue and spool are full; records wait for room in memory.");
        }
        records.push_back(refused);
        self.pending.fetch_add(1, Ordering::AcqRel);
        drop(records);
        self.bytes.fetch_add(size, Ordering::Relaxed);
        stats.overflowed.fetch_add(1, Ordering::Relaxed);
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<Refused> {
        let r = self
            .records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()?;
        self.bytes.fetch_sub(r.size, Ordering::Relaxed);
        Some(r)
    }

    /// A record popped is in the queue or the spool (or given up on at shutdown).
    fn placed(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.emptied.notify_waiters();
        }
    }

    /// Waits until every record listed so far is in the queue or the spool.
    async fn drained(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            emptied.await;
        }
    }

    /// Puts back a record that still found no room, at the front: order is kept.
    fn unpop(&self, r: Refused) {
        self.bytes.fetch_add(r.size, Ordering::Relaxed);
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_front(r);
    }
}

pub(crate) struct RecorderSettings {
    pub queue_capacity: usize,
    pub queue_max_bytes: u64,
    pub max_batch_records: usize,
    pub flush_interval: Duration,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub spool_file_max_bytes: u64,
    pub spool_buffer_max_bytes: u64,
    pub spool_fsync: SpoolFsync,
    pub dead_letter_max_bytes: u64,
    pub retry_interval: Duration,
    pub journal_dir: PathBuf,
    pub journal_file_max_bytes: u64,
    pub journal_max_bytes: u64,
    pub journal_buffer_max_bytes: u64,
    pub journal_fsync: SpoolFsync,
}

/// A request being recorded; emitting its `end` record (or dropping the guard) marks it done.
pub(crate) struct InFlight {
    recorder: Recorder,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.recorder.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.recorder.idle.notify_waiters();
        }
    }
}

impl Recorder {
    /// Starts the writer task and the spool thread on `tracker`; they stop when `cancel`
    /// fires, after draining.
    pub(crate) fn start(
        settings: RecorderSettings,
        store: Arc<dyn RawWriter>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Recorder, SpoolError> {
        Self::start_with(
            settings,
            store,
            tracker,
            cancel,
            spool::file_opener(),
            spool::file_opener(),
        )
    }

    /// [`Recorder::start`] with the spool's and the journal's files opened by the given openers
    /// (a seam for tests).
    pub(crate) fn start_with(
        settings: RecorderSettings,
        store: Arc<dyn RawWriter>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
        opener: Opener,
        journal_opener: Opener,
    ) -> Result<Recorder, SpoolError> {
        let limits = SpoolLimits {
            max_bytes: settings.spool_max_bytes,
            file_max_bytes: settings.spool_file_max_bytes,
            fsync: settings.spool_fsync,
        };
        let mut spool = Spool::open(&settings.spool_dir, limits, opener)?;
        // Recovery: what the journal of an earlier run holds goes to the spool, behind the
        // spool's own files, and is replayed into the store like them (records already
        // stored are no-ops there). Done before anything is served.
        let (leftovers, first_id) = journal::leftovers(&settings.journal_dir)?;
        if !leftovers.is_empty() {
            tracing::info!(
                files = leftovers.len(),
                dir = %settings.journal_dir.display(),
                "Replaying journal files left by an earlier run."
            );
        }
        spool.adopt(leftovers)?;
        let stats = Arc::new(RecorderStats::default());
        let space = Arc::new(Notify::new());
        let spool_ready = Arc::new(Notify::new());
        let ledger = Arc::new(Ledger::new());
        let spool = spooler::start(
            spool,
            SpoolerSettings {
                buffer_max_bytes: settings.spool_buffer_max_bytes,
                retry_interval: settings.retry_interval,
                dead_letter: DeadLetters::new(
                    &settings.spool_dir,
                    settings.dead_letter_max_bytes,
                    settings.spool_fsync,
                ),
                stats: stats.clone(),
                ready: spool_ready.clone(),
                space: space.clone(),
                ledger: ledger.clone(),
            },
            tracker,
        );
        let journal = journal::start(
            JournalSettings {
                dir: settings.journal_dir.clone(),
                file_max_bytes: settings.journal_file_max_bytes,
                max_bytes: settings.journal_max_bytes,
                buffer_max_bytes: settings.journal_buffer_max_bytes,
                fsync: settings.journal_fsync,
                retry_interval: settings.retry_interval,
            },
            first_id,
            journal_opener,
            ledger.clone(),
            spool.clone(),
            stats.clone(),
            tracker,
        );
        let queue = Arc::new(QueueBudget {
            bytes: AtomicU64::new(0),
            max_bytes: settings.queue_max_bytes,
        });
        let (tx, rx) = mpsc::channel(settings.queue_capacity);
        let recorder = Recorder {
            tx,
            journal: journal.clone(),
            queue: queue.clone(),
            spool: spool.clone(),
            space: space.clone(),
            overflow: Arc::new(Overflow::default()),
            inflight: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(Notify::new()),
            stats: stats.clone(),
            drain_by: Arc::new(tokio::sync::watch::Sender::new(None)),
        };
        let writer = Writer {
            rx,
            store,
            spool,
            queue,
            space,
            spool_ready,
            max_batch: settings.max_batch_records,
            max_batch_bytes: settings.queue_max_bytes,
            linger: settings.flush_interval,
            retry_interval: settings.retry_interval,
            next_retry: Instant::now(),
            stats,
            ledger,
            journal,
            drain_by: recorder.drain_by.subscribe(),
        };
        tracker.spawn(recorder.clone().feed_overflow(cancel.clone()));
        tracker.spawn(writer.run(cancel));
        Ok(recorder)
    }

    pub fn stats(&self) -> &RecorderStats {
        &self.stats
    }

    /// From `deadline` on, the writer stops waiting for the store: what is left goes to the
    /// spool, on disk, and is replayed at the next start. For shutdown, whose grace a slow
    /// store must not outlast.
    pub fn drain_until(&self, deadline: Instant) {
        self.drain_by.send_replace(Some(deadline));
    }

    /// Whether a new request may be accepted: false once the spool or the journal is nearly
    /// full, or while the disk refuses their writes.
    pub(crate) fn can_accept(&self) -> bool {
        self.spool.has_room(spool_headroom(self.spool.max_bytes())) && self.journal.has_room()
    }

    /// Whether records of refused requests (no key, bad path) may be taken: only while the
    /// spool is empty, so refusals never take room that accepted requests need.
    pub(crate) fn has_room_for_refusals(&self) -> bool {
        self.spool.is_empty()
    }

    pub(crate) fn begin(&self) -> InFlight {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            recorder: self.clone(),
        }
    }

    /// Hands a record over without waiting: to the queue, else the spool, else (both full) the
    /// overflow list, which one task feeds to them as space frees up. A request never waits
    /// and never spawns a task of its own; the record is journaled either way, and the
    /// ticket says when it is written.
    pub(crate) fn record(&self, record: RawRecord) -> Journaled {
        match self.try_record(record) {
            Ok(ticket) => ticket,
            Err(refused) => {
                let ticket = refused.ticket();
                self.overflow.push(refused, &self.stats);
                ticket
            }
        }
    }

    /// Bytes of records waiting in the overflow list for room in the queue or the spool.
    pub fn overflow_bytes(&self) -> u64 {
        self.overflow.bytes.load(Ordering::Relaxed)
    }

    /// The overflow list's one task: moves its records, oldest first, to the queue or the
    /// spool as room frees up. At shutdown it stops waiting; what is still listed then is in
    /// the journal, replayed at the next start (and counted, with an ERROR line, if the
    /// journal could not take it).
    async fn feed_overflow(self, cancel: CancellationToken) {
        loop {
            let ready = self.overflow.ready.notified();
            let Some(refused) = self.overflow.pop() else {
                tokio::select! {
                    () = ready => continue,
                    () = cancel.cancelled() => break,
                }
            };
            // Registered before looking, so room freed in between is not missed.
            let mut space = pin!(self.space.notified());
            space.as_mut().enable();
            let Refused { record, size, seq } = refused;
            match self.offer(record, None, size, seq, true) {
                Ok(()) => self.overflow.placed(),
                Err(record) => {
                    self.overflow.unpop(Refused { record, size, seq });
                    tokio::select! {
                        () = space => {}
                        () = cancel.cancelled() => break,
                    }
                }
            }
        }
        let mut left = 0u64;
        let mut lost = 0u64;
        while let Some(r) = self.overflow.pop() {
            self.overflow.placed();
            left += 1;
            if r.seq == UNJOURNALED {
                lost += 1;
                tracing::error!(record_id = %r.record.id(), "A record had no room when Tollgate stopped and is not in the journal: it is lost.");
            }
        }
        if left > 0 {
            self.stats.overflow_lost.fetch_add(lost, Ordering::Relaxed);
            tracing::warn!(
                records = left,
                unjournaled = lost,
                "Records still waiting for room at shutdown; the journaled ones are replayed at the next start."
            );
        }
    }

    /// Journals the record (adds it to the journal's buffer) and hands it over without
    /// waiting: to the queue, else to the spool. Gives the record back only when both are
    /// full; [`Recorder::record`] then lists it in the overflow list.
    pub(crate) fn try_record(&self, record: RawRecord) -> Result<Journaled, Refused> {
        let size = estimated_size(&record);
        // Serialised once, for the journal and the store's document alike.
        let json: Option<Arc<str>> = serde_json::to_string(&record).ok().map(Arc::from);
        let seq = self.journal.append_json(&record, json.as_deref());
        match self.offer(Box::new(record), json, size, seq, false) {
            Ok(()) => Ok(Journaled(seq)),
            Err(record) => Err(Refused { record, size, seq }),
        }
    }

    /// A future that completes once the record behind `ticket` is in a journal file (or the
    /// journal gave up on it: see `unjournaled`); `None` when it already is.
    pub(crate) fn journaled(
        &self,
        ticket: Journaled,
    ) -> Option<Pin<Box<dyn Future<Output = ()> + Send + 'static>>> {
        if ticket.0 == UNJOURNALED {
            return None;
        }
        self.journal
            .released(ticket.0)
            .map(|f| Box::pin(f) as Pin<Box<dyn Future<Output = ()> + Send>>)
    }

    /// Hands `record` to the queue, else the spool. `json`, the record's JSON when made
    /// already, is held with it until the store has it, so the queue's byte budget counts
    /// both; should the record go to the spool instead, the JSON is dropped and the spool
    /// counts the record alone (`size`).
    fn offer(
        &self,
        record: Box<RawRecord>,
        json: Option<Arc<str>>,
        size: u64,
        seq: u64,
        patient: bool,
    ) -> Result<(), Box<RawRecord>> {
        let queued = size + json.as_ref().map_or(0, |j| j.len() as u64);
        let record = if self.queue.reserve(queued, patient) {
            match self.tx.try_send(Item::Record(record, json, queued, seq)) {
                Ok(()) => {
                    self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(
                    mpsc::error::TrySendError::Full(item) | mpsc::error::TrySendError::Closed(item),
                ) => {
                    self.queue.release(queued);
                    match item {
                        Item::Record(r, ..) => r,
                        Item::Flush(_) => return Ok(()),
                    }
                }
            }
        } else {
            record
        };
        self.spool.offer(record, size, seq)?;
        self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
        self.stats.spooled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Waits until all requests in flight have ended and everything recorded so far has been
    /// written (or spooled, if the store is failing).
    pub async fn flush(&self) {
        self.wait_idle().await;
        self.overflow.drained().await;
        let (done, wait) = oneshot::channel();
        if self.tx.send(Item::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Waits until every request in flight has handed over its `end` record (which may still
    /// be queued).
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.inflight.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Requests accepted whose `end` record has not been handed over yet.
    pub fn in_flight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Bytes waiting in the spool (on disk, or on their way there).
    pub fn spooled_bytes(&self) -> u64 {
        self.spool.pending_bytes()
    }

    /// Estimated bytes of records in the queue and the writer's hands.
    pub fn queued_bytes(&self) -> u64 {
        self.queue.bytes.load(Ordering::Relaxed)
    }

    /// Bytes in this run's journal files.
    pub fn journal_bytes(&self) -> u64 {
        self.journal.disk_bytes()
    }
}

/// Settings for tests: small limits, everything under `dir`, replays only on `flush`.
#[cfg(test)]
pub(crate) fn test_settings(dir: &std::path::Path) -> RecorderSettings {
    RecorderSettings {
        queue_capacity: 64,
        queue_max_bytes: 1 << 20,
        max_batch_records: 16,
        flush_interval: Duration::ZERO,
        spool_dir: dir.to_path_buf(),
        spool_max_bytes: 1 << 22,
        spool_file_max_bytes: 64 * 1024,
        spool_buffer_max_bytes: 1 << 20,
        spool_fsync: SpoolFsync::Never,
        dead_letter_max_bytes: 1 << 20,
        retry_interval: Duration::from_secs(3600),
        journal_dir: dir.join("journal"),
        journal_file_max_bytes: 64 * 1024,
        journal_max_bytes: 1 << 22,
        journal_buffer_max_bytes: 1 << 20,
        journal_fsync: SpoolFsync::Never,
    }
}

#[cfg(test)]
mod tests;
