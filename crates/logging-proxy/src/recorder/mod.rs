//! The recorder: takes raw records from request tasks without waiting on the store, and writes
//! them to the store in batches from one writer task.
//!
//! Path of a record: request task → bounded queue (`queue_capacity`) → writer task →
//! `RawWriter::append` of up to `max_batch_records`. When the queue is full the record goes to
//! the on-disk spool instead; when a batch fails it goes to the spool too; while the spool holds
//! anything, new batches are appended behind it and the spool is replayed in order, so records
//! reach the store in the order they were accepted. A record leaves the spool only after the
//! store confirmed it. Nothing accepted is dropped: when even the spool is full, `record` waits
//! for queue space (and the proxy stops accepting new requests, see `can_accept`).
//!
//! `flush` waits until every request in flight has emitted its `end` record and every record
//! before the call is in the store (or, if the store is down, in the spool) — tests and the
//! admin endpoint synchronise on it instead of sleeping. `shutdown` drains the queue and exits.

pub(crate) mod spool;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_records::RawRecord;
use tollgate_store::RawWriter;

use self::spool::{Spool, SpoolError};

enum Item {
    // Boxed: records are large and the queue's slots are sized by the largest variant.
    Record(Box<RawRecord>),
    Flush(oneshot::Sender<()>),
}

/// Counters for operators and benchmarks.
#[derive(Debug, Default)]
pub struct RecorderStats {
    pub enqueued: AtomicU64,
    pub written: AtomicU64,
    pub spooled: AtomicU64,
    pub replayed: AtomicU64,
    pub store_errors: AtomicU64,
}

/// Headroom below the spool cap at which new requests are refused, so the requests already
/// accepted still have room for their records: a quarter of the cap, at most 8 MiB.
fn spool_headroom(max_bytes: u64) -> u64 {
    (max_bytes / 4).min(8 * 1024 * 1024)
}

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Item>,
    spool: Arc<Mutex<Spool>>,
    spool_disk_bytes: Arc<AtomicU64>,
    spool_max_bytes: u64,
    inflight: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    stats: Arc<RecorderStats>,
}

pub(crate) struct RecorderSettings {
    pub queue_capacity: usize,
    pub max_batch_records: usize,
    pub flush_interval: Duration,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub spool_file_max_bytes: u64,
    pub retry_interval: Duration,
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
    /// Starts the writer task on `tracker`; it stops when `cancel` fires, after draining.
    pub(crate) fn start(
        settings: RecorderSettings,
        store: Arc<dyn RawWriter>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Recorder, SpoolError> {
        let spool = Spool::open(
            &settings.spool_dir,
            settings.spool_max_bytes,
            settings.spool_file_max_bytes,
        )?;
        let (spool_disk_bytes, spool_max_bytes) = spool.gauge();
        let spool = Arc::new(Mutex::new(spool));
        let (tx, rx) = mpsc::channel(settings.queue_capacity);
        let recorder = Recorder {
            tx,
            spool: spool.clone(),
            spool_disk_bytes,
            spool_max_bytes,
            inflight: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(Notify::new()),
            stats: Arc::new(RecorderStats::default()),
        };
        let writer = Writer {
            rx,
            store,
            spool,
            max_batch: settings.max_batch_records,
            linger: settings.flush_interval,
            retry_interval: settings.retry_interval,
            next_retry: Instant::now(),
            stats: recorder.stats.clone(),
        };
        tracker.spawn(writer.run(cancel));
        Ok(recorder)
    }

    pub fn stats(&self) -> &RecorderStats {
        &self.stats
    }

    /// Whether a new request may be accepted: false once the spool is nearly full.
    pub(crate) fn can_accept(&self) -> bool {
        let headroom = spool_headroom(self.spool_max_bytes);
        self.spool_disk_bytes.load(Ordering::Relaxed) + headroom <= self.spool_max_bytes
    }

    pub(crate) fn begin(&self) -> InFlight {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            recorder: self.clone(),
        }
    }

    /// Hands a record to the writer without waiting on the store.
    pub(crate) async fn record(&self, record: RawRecord) {
        if let Err(record) = self.try_record(record) {
            tracing::warn!("Queue and spool are full; waiting for queue space.");
            if self.tx.send(Item::Record(record)).await.is_err() {
                tracing::error!("Recorder stopped before a record could be queued.");
            }
        }
    }

    /// Hands a record over without waiting: to the queue, else to the spool. Gives the record
    /// back only when both are full; the caller must then wait with [`Recorder::record`].
    pub(crate) fn try_record(&self, record: RawRecord) -> Result<(), Box<RawRecord>> {
        self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
        let record = match self.tx.try_send(Item::Record(Box::new(record))) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(Item::Record(r))) => r,
            Err(mpsc::error::TrySendError::Closed(Item::Record(r))) => r,
            Err(_) => return Ok(()),
        };
        let spooled = {
            let mut spool = self.spool.lock().unwrap_or_else(|e| e.into_inner());
            spool.append(std::slice::from_ref(record.as_ref()))
        };
        match spooled {
            Ok(()) => {
                self.stats.spooled.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "Spool refused a record.");
                Err(record)
            }
        }
    }

    /// Waits until all requests in flight have ended and everything recorded so far has been
    /// written (or spooled, if the store is failing).
    pub async fn flush(&self) {
        self.wait_idle().await;
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

    /// Bytes waiting in the spool.
    pub fn spooled_bytes(&self) -> u64 {
        self.spool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending_bytes()
    }
}

struct Writer {
    rx: mpsc::Receiver<Item>,
    store: Arc<dyn RawWriter>,
    spool: Arc<Mutex<Spool>>,
    max_batch: usize,
    linger: Duration,
    retry_interval: Duration,
    next_retry: Instant,
    stats: Arc<RecorderStats>,
}

impl Writer {
    async fn run(mut self, cancel: CancellationToken) {
        let mut items = Vec::with_capacity(self.max_batch);
        loop {
            let spool_waiting = !self.spool_empty();
            let received = tokio::select! {
                n = self.rx.recv_many(&mut items, self.max_batch) => n,
                () = cancel.cancelled() => {
                    self.rx.close();
                    0
                }
                () = tokio::time::sleep_until(self.next_retry), if spool_waiting => {
                    self.replay().await;
                    continue;
                }
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

    fn spool_empty(&self) -> bool {
        self.spool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    async fn process(&mut self, items: &mut Vec<Item>) {
        let mut records = Vec::with_capacity(items.len());
        let mut flushes = Vec::new();
        for item in items.drain(..) {
            match item {
                Item::Record(r) => records.push(*r),
                Item::Flush(done) => flushes.push(done),
            }
        }
        if !records.is_empty() {
            self.write(records).await;
        }
        if !flushes.is_empty() {
            self.next_retry = Instant::now();
            self.replay().await;
            for done in flushes {
                let _ = done.send(());
            }
        }
    }

    async fn write(&mut self, records: Vec<RawRecord>) {
        if self.spool_empty() {
            match self.store.append(&records).await {
                Ok(()) => {
                    self.stats
                        .written
                        .fetch_add(records.len() as u64, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, records = records.len(), "Store write failed; spooling the batch.");
                    self.next_retry = Instant::now() + self.retry_interval;
                }
            }
        }
        self.spool_records(&records).await;
        self.replay().await;
    }

    async fn spool_records(&self, records: &[RawRecord]) {
        let refused = {
            let mut spool = self.spool.lock().unwrap_or_else(|e| e.into_inner());
            spool.append(records).err()
        };
        let Some(e) = refused else {
            self.stats
                .spooled
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            return;
        };
        // The spool cap applies to overflow; a batch already accepted must not be lost, so the
        // writer holds it and retries the store. The queue then fills, `record` waits, and the
        // proxy stops accepting new requests until the store is back.
        tracing::error!(error = %e, "Spool refused a failed batch; retrying the store until it accepts.");
        while self.store.append(records).await.is_err() {
            self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.retry_interval).await;
        }
        self.stats
            .written
            .fetch_add(records.len() as u64, Ordering::Relaxed);
    }

    /// Replays the spool into the store, oldest first, until it is empty or the store fails.
    async fn replay(&mut self) {
        if Instant::now() < self.next_retry {
            return;
        }
        loop {
            let batch = {
                let mut spool = self.spool.lock().unwrap_or_else(|e| e.into_inner());
                spool.read_batch(self.max_batch)
            };
            let batch = match batch {
                Ok(Some(b)) => b,
                Ok(None) => return,
                Err(e) => {
                    tracing::error!(error = %e, "Spool could not be read.");
                    self.next_retry = Instant::now() + self.retry_interval;
                    return;
                }
            };
            match self.store.append(&batch.records).await {
                Ok(()) => {
                    let n = batch.records.len() as u64;
                    self.stats.replayed.fetch_add(n, Ordering::Relaxed);
                    self.stats.written.fetch_add(n, Ordering::Relaxed);
                    let mut spool = self.spool.lock().unwrap_or_else(|e| e.into_inner());
                    if let Err(e) = spool.ack(&batch) {
                        tracing::error!(error = %e, "Spool file could not be removed after replay.");
                    }
                }
                Err(e) => {
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "Store still failing; spool replay postponed.");
                    self.next_retry = Instant::now() + self.retry_interval;
                    return;
                }
            }
        }
    }
}
