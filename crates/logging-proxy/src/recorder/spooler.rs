//! The spool thread: the only place spool and dead-letter files are read or written, so no
//! async worker ever waits on the disk. Request tasks hand it records without waiting
//! ([`SpoolHandle::offer`]); the writer task sends it requests and awaits the answers.
//!
//! Commands are handled one at a time in the order they were sent, which is what keeps the
//! spool in order: a record offered before a read is on disk (or in memory, below) before
//! that read looks.
//!
//! When the disk refuses a write (full, I/O error, spool cap) the records are not lost: they
//! stay in memory, behind everything on disk, as the spool's *tail*. Later records join the
//! tail so the order holds; the writer replays the tail after the files; the thread retries
//! writing it to disk every retry interval. Memory for records handed over and not yet on disk
//! is bounded by `spool_buffer_max_bytes`; beyond it `offer` refuses and the caller waits.
//! While the tail holds anything the recorder reports itself full, so new requests are refused.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{Notify, oneshot};
use tokio_util::task::TaskTracker;
use tollgate_records::RawRecord;

use super::RecorderStats;
use super::journal::Ledger;
use super::spool::{DiskBatch, Spool, SpoolError, SpoolFsync};

/// Gauges the thread publishes and request tasks read without waiting on it.
pub(crate) struct Shared {
    /// Bytes in spool files (the spool's own gauge).
    disk_bytes: Arc<AtomicU64>,
    /// Bytes in spool files not yet acknowledged.
    pending_disk: AtomicU64,
    /// Estimated bytes of records handed to the thread and not on disk: in the channel, in
    /// the tail, or lent from the tail to the writer.
    buffer_bytes: AtomicU64,
    /// The tail holds records (the disk refused them).
    degraded: AtomicBool,
    max_bytes: u64,
    buffer_max_bytes: u64,
}

enum Command {
    /// A record a request task could not queue, its estimated size (already in
    /// `buffer_bytes`) and its journal sequence number (settled once the spool has it).
    Overflow(Box<RawRecord>, u64, u64),
    /// A batch from the writer; refused (given back) only when the disk refused it and the
    /// memory budget is spent.
    Append {
        records: Vec<RawRecord>,
        sizes: Vec<u64>,
        reply: oneshot::Sender<Result<(), Vec<RawRecord>>>,
    },
    Read {
        max: usize,
        max_bytes: u64,
        reply: oneshot::Sender<Result<Option<ReplayBatch>, SpoolError>>,
    },
    /// The writer is done with a batch: its first `stored` records are in the store (or
    /// dead-lettered); `rest` are the others, given back.
    Settle {
        source: Source,
        stored: usize,
        rest: Vec<RawRecord>,
    },
    DeadLetter {
        record: Box<RawRecord>,
        error: String,
        reply: oneshot::Sender<Result<PathBuf, SpoolError>>,
    },
    /// Answered once every command sent before it was handled.
    Barrier(oneshot::Sender<()>),
    Stop,
}

/// Records read from the spool for the writer to replay, oldest first.
pub(crate) struct ReplayBatch {
    pub(crate) records: Vec<RawRecord>,
    source: Source,
}

enum Source {
    Disk {
        file: u64,
        ends: Vec<u64>,
        end: u64,
    },
    /// Taken from the tail; `sizes` are the records' estimated sizes.
    Memory {
        sizes: Vec<u64>,
    },
}

/// The request tasks' and the writer's side of the spool thread.
#[derive(Clone)]
pub(crate) struct SpoolHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

/// Everything the thread needs besides the spool itself.
pub(crate) struct SpoolerSettings {
    pub(crate) buffer_max_bytes: u64,
    pub(crate) retry_interval: Duration,
    pub(crate) dead_letter: DeadLetters,
    pub(crate) stats: Arc<RecorderStats>,
    /// Woken when records reach the spool, so the writer replays them.
    pub(crate) ready: Arc<Notify>,
    /// Woken when memory is freed, for request tasks waiting in `Recorder::record`.
    pub(crate) space: Arc<Notify>,
    /// Where overflowed records are marked settled for the journal once the spool has them.
    pub(crate) ledger: Arc<Ledger>,
}

/// Starts the spool thread on `tracker`'s blocking pool; it runs until [`SpoolHandle::stop`].
pub(crate) fn start(spool: Spool, settings: SpoolerSettings, tracker: &TaskTracker) -> SpoolHandle {
    let (handle, worker) = worker(spool, settings);
    tracker.spawn_blocking(move || worker.run());
    handle
}

/// A handle whose thread never runs: for tests that only read its gauges.
#[cfg(test)]
pub(crate) fn detached(spool: Spool, settings: SpoolerSettings) -> SpoolHandle {
    worker(spool, settings).0
}

fn worker(spool: Spool, settings: SpoolerSettings) -> (SpoolHandle, Worker) {
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        disk_bytes: spool.gauge(),
        pending_disk: AtomicU64::new(spool.pending_bytes()),
        buffer_bytes: AtomicU64::new(0),
        degraded: AtomicBool::new(false),
        max_bytes: spool.max_bytes(),
        buffer_max_bytes: settings.buffer_max_bytes,
    });
    let worker = Worker {
        rx,
        spool,
        tail: VecDeque::new(),
        lent: false,
        next_tail_retry: Instant::now(),
        shared: shared.clone(),
        settings,
    };
    (SpoolHandle { tx, shared }, worker)
}

impl SpoolHandle {
    /// Hands a record (journaled as `seq`) to the spool without waiting. Refused (given back)
    /// when the memory for records on their way to disk is spent, or the spool is at its cap.
    pub(crate) fn offer(
        &self,
        record: Box<RawRecord>,
        size: u64,
        seq: u64,
    ) -> Result<(), Box<RawRecord>> {
        let s = &self.shared;
        let disk = s.disk_bytes.load(Ordering::Relaxed);
        let reserved = s
            .buffer_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                // An empty buffer takes any one record, so a record larger than the budget
                // is not refused for ever.
                let fits = b == 0 || b + size <= s.buffer_max_bytes;
                (fits && disk + b + size <= s.max_bytes).then_some(b + size)
            });
        if reserved.is_err() {
            return Err(record);
        }
        match self.tx.send(Command::Overflow(record, size, seq)) {
            Ok(()) => Ok(()),
            Err(mpsc::SendError(cmd)) => {
                s.buffer_bytes.fetch_sub(size, Ordering::AcqRel);
                match cmd {
                    Command::Overflow(record, _, _) => Err(record),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Appends a batch of the writer's. Gives the records back when the spool cannot take
    /// them (the disk refuses and memory is spent), or the thread has stopped.
    pub(crate) async fn append(&self, records: Vec<RawRecord>) -> Result<(), Vec<RawRecord>> {
        let sizes = records.iter().map(super::estimated_size).collect();
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Append {
            records,
            sizes,
            reply,
        };
        if let Err(mpsc::SendError(cmd)) = self.tx.send(cmd) {
            return match cmd {
                Command::Append { records, .. } => Err(records),
                _ => Err(Vec::new()),
            };
        }
        answer.await.unwrap_or_else(|_| {
            tracing::error!("Spool thread stopped while appending a batch.");
            Err(Vec::new())
        })
    }

    /// The oldest records in the spool (files first, then the tail). The batch must be given
    /// back with [`SpoolHandle::settle`] before the next read.
    pub(crate) async fn read(
        &self,
        max: usize,
        max_bytes: u64,
    ) -> Result<Option<ReplayBatch>, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Read {
                max,
                max_bytes,
                reply,
            })
            .map_err(|_| SpoolError::Stopped)?;
        answer.await.map_err(|_| SpoolError::Stopped)?
    }

    /// The first `stored` records of `batch` are in the store (or set aside): they leave the
    /// spool; the others stay, in order, to be read again.
    pub(crate) fn settle(&self, mut batch: ReplayBatch, stored: usize) {
        let stored = stored.min(batch.records.len());
        let rest = batch.records.split_off(stored);
        let cmd = Command::Settle {
            source: batch.source,
            stored,
            rest,
        };
        if self.tx.send(cmd).is_err() {
            tracing::error!("Spool thread stopped before a replayed batch was settled.");
        }
    }

    /// Writes `record` to the dead-letter file; the path written to, once it is there.
    pub(crate) async fn dead_letter(
        &self,
        record: &RawRecord,
        error: String,
    ) -> Result<PathBuf, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::DeadLetter {
                record: Box::new(record.clone()),
                error,
                reply,
            })
            .map_err(|_| SpoolError::Stopped)?;
        answer.await.map_err(|_| SpoolError::Stopped)?
    }

    /// Returns once everything sent before it was handled (offered records are on disk, or in
    /// the tail).
    pub(crate) async fn barrier(&self) {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Command::Barrier(reply)).is_ok() {
            let _ = answer.await;
        }
    }

    /// Stops the thread after everything sent before; a tail the disk still refuses is the
    /// one loss left, and is logged.
    pub(crate) fn stop(&self) {
        let _ = self.tx.send(Command::Stop);
    }

    /// Whether the spool holds records in memory only (the disk refused them). Such records
    /// count as settled for the journal, so the journal keeps its files meanwhile. Published
    /// before the records are marked settled.
    pub(crate) fn in_memory(&self) -> bool {
        self.shared.degraded.load(Ordering::Acquire)
    }

    #[cfg(test)]
    pub(crate) fn set_in_memory_for_test(&self, in_memory: bool) {
        self.shared.degraded.store(in_memory, Ordering::Release);
    }

    /// Nothing on disk or on its way there.
    pub(crate) fn is_empty(&self) -> bool {
        self.pending_bytes() == 0
    }

    /// Bytes waiting: unacknowledged on disk plus (estimated) not yet on disk.
    pub(crate) fn pending_bytes(&self) -> u64 {
        self.shared.pending_disk.load(Ordering::Acquire)
            + self.shared.buffer_bytes.load(Ordering::Acquire)
    }

    /// Whether `headroom` bytes are left below the cap and the disk takes writes.
    pub(crate) fn has_room(&self, headroom: u64) -> bool {
        let s = &self.shared;
        let used = s.disk_bytes.load(Ordering::Relaxed) + s.buffer_bytes.load(Ordering::Relaxed);
        !s.degraded.load(Ordering::Relaxed) && used + headroom <= s.max_bytes
    }

    pub(crate) fn max_bytes(&self) -> u64 {
        self.shared.max_bytes
    }
}

struct Worker {
    rx: mpsc::Receiver<Command>,
    spool: Spool,
    /// Records the disk refused, after everything on disk, oldest first.
    tail: VecDeque<(RawRecord, u64)>,
    /// A batch taken from the tail is with the writer; the tail is not written to disk
    /// meanwhile, or records given back would land behind newer ones.
    lent: bool,
    next_tail_retry: Instant,
    shared: Arc<Shared>,
    settings: SpoolerSettings,
}

impl Worker {
    fn run(mut self) {
        let mut next = None;
        loop {
            let Some(cmd) = next.take().or_else(|| self.next_command()) else {
                break;
            };
            match cmd {
                Command::Overflow(record, size, seq) => {
                    // Group commit: one write (and one sync) for every overflow already waiting.
                    let mut group = vec![(*record, size)];
                    let mut seqs = vec![seq];
                    loop {
                        match self.rx.try_recv() {
                            Ok(Command::Overflow(r, s, q)) => {
                                group.push((*r, s));
                                seqs.push(q);
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                        }
                    }
                    self.overflow(group);
                    self.settings.ledger.settle(seqs);
                }
                Command::Stop => {
                    self.stop();
                    break;
                }
                other => self.handle(other),
            }
        }
    }

    fn next_command(&mut self) -> Option<Command> {
        loop {
            if self.tail.is_empty() || self.lent {
                return self.rx.recv().ok();
            }
            let now = Instant::now();
            if now >= self.next_tail_retry {
                self.retry_tail();
                continue;
            }
            match self.rx.recv_timeout(self.next_tail_retry - now) {
                Ok(cmd) => return Some(cmd),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Overflow(record, size, seq) => {
                self.overflow(vec![(*record, size)]);
                self.settings.ledger.settle([seq]);
            }
            Command::Append {
                records,
                sizes,
                reply,
            } => {
                let result = self.append(records, sizes);
                self.publish();
                let _ = reply.send(result);
            }
            Command::Read {
                max,
                max_bytes,
                reply,
            } => {
                let result = self.read(max, max_bytes);
                self.publish();
                let _ = reply.send(result);
            }
            Command::Settle {
                source,
                stored,
                rest,
            } => {
                self.settle(source, stored, rest);
                self.publish();
                self.settings.space.notify_waiters();
            }
            Command::DeadLetter {
                record,
                error,
                reply,
            } => {
                let result = self.settings.dead_letter.write(&record, &error);
                let _ = reply.send(result);
            }
            Command::Barrier(reply) => {
                let _ = reply.send(());
            }
            Command::Stop => self.stop(),
        }
    }

    /// Whether records are held in memory (tail, or lent from it).
    fn in_memory(&self) -> bool {
        !self.tail.is_empty() || self.lent
    }

    fn publish(&self) {
        self.shared
            .pending_disk
            .store(self.spool.pending_bytes(), Ordering::Release);
        self.shared
            .degraded
            .store(self.in_memory(), Ordering::Release);
    }

    /// Puts a group of overflowed records on disk, or in the tail. Either way `publish` has
    /// run before it returns, so the journal sees `degraded` before these records settle.
    fn overflow(&mut self, group: Vec<(RawRecord, u64)>) {
        let bytes: u64 = group.iter().map(|(_, s)| s).sum();
        if !self.in_memory() {
            match self.spool.append(group.iter().map(|(r, _)| r)) {
                Ok(()) => {
                    // Published before the buffer shrinks, so the spool never looks empty
                    // while these records are in it.
                    self.publish();
                    self.shared.buffer_bytes.fetch_sub(bytes, Ordering::AcqRel);
                    self.settings.ready.notify_one();
                    self.settings.space.notify_waiters();
                    return;
                }
                Err(e) => self.write_failed(&e),
            }
        }
        self.tail.extend(group);
        self.publish();
        self.settings.ready.notify_one();
    }

    fn append(&mut self, records: Vec<RawRecord>, sizes: Vec<u64>) -> Result<(), Vec<RawRecord>> {
        if !self.in_memory() {
            match self.spool.append(&records) {
                Ok(()) => return Ok(()),
                Err(e) => self.write_failed(&e),
            }
        }
        let bytes: u64 = sizes.iter().sum();
        let s = &self.shared;
        let reserved = s
            .buffer_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b == 0 || b + bytes <= s.buffer_max_bytes).then_some(b + bytes)
            });
        if reserved.is_err() {
            return Err(records);
        }
        self.tail.extend(records.into_iter().zip(sizes));
        Ok(())
    }

    fn write_failed(&mut self, e: &SpoolError) {
        self.settings
            .stats
            .spool_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            error = %e,
            "Spool write failed; keeping the records in memory and retrying. New requests are refused until the spool takes writes again."
        );
        self.next_tail_retry = Instant::now() + self.settings.retry_interval;
    }

    /// Moves the tail to disk, once the disk takes writes again.
    fn retry_tail(&mut self) {
        if self.tail.is_empty() || self.lent {
            return;
        }
        match self.spool.append(self.tail.iter().map(|(r, _)| r)) {
            Ok(()) => {
                let bytes: u64 = self.tail.iter().map(|(_, s)| s).sum();
                let records = self.tail.len();
                self.tail.clear();
                self.publish();
                self.shared.buffer_bytes.fetch_sub(bytes, Ordering::AcqRel);
                self.settings.space.notify_waiters();
                tracing::info!(
                    records,
                    "Spool takes writes again; records moved from memory to disk."
                );
            }
            Err(e) => {
                self.settings
                    .stats
                    .spool_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, records = self.tail.len(), "Spool still refuses writes.");
                self.next_tail_retry = Instant::now() + self.settings.retry_interval;
            }
        }
        self.publish();
    }

    fn read(&mut self, max: usize, max_bytes: u64) -> Result<Option<ReplayBatch>, SpoolError> {
        if self.lent {
            // The writer settles every batch before reading again; a second read would hand
            // out the same records twice.
            tracing::error!("Spool read while a batch is still out; refusing.");
            return Ok(None);
        }
        let read = self.spool.read_batch(max, max_bytes);
        let corrupt = self.spool.take_corrupt();
        if corrupt > 0 {
            self.settings
                .stats
                .corrupt
                .fetch_add(corrupt, Ordering::Relaxed);
        }
        if let Some(DiskBatch {
            records,
            file,
            ends,
            end,
        }) = read?
        {
            return Ok(Some(ReplayBatch {
                records,
                source: Source::Disk { file, ends, end },
            }));
        }
        let mut records = Vec::new();
        let mut sizes = Vec::new();
        let mut bytes = 0;
        while records.len() < max.max(1) && (records.is_empty() || bytes < max_bytes) {
            let Some((r, size)) = self.tail.pop_front() else {
                break;
            };
            bytes += size;
            records.push(r);
            sizes.push(size);
        }
        if records.is_empty() {
            return Ok(None);
        }
        self.lent = true;
        Ok(Some(ReplayBatch {
            records,
            source: Source::Memory { sizes },
        }))
    }

    fn settle(&mut self, source: Source, stored: usize, rest: Vec<RawRecord>) {
        match source {
            Source::Disk { file, ends, end } => {
                let batch = DiskBatch {
                    records: Vec::new(),
                    file,
                    ends,
                    end,
                };
                if let Some(offset) = batch.ack_offset(stored)
                    && let Err(e) = self.spool.ack(file, offset)
                {
                    tracing::error!(error = %e, "Spool file could not be removed after replay.");
                }
            }
            Source::Memory { sizes } => {
                self.lent = false;
                let freed: u64 = sizes.iter().take(stored).sum();
                self.shared.buffer_bytes.fetch_sub(freed, Ordering::AcqRel);
                for (r, size) in rest.into_iter().zip(sizes.into_iter().skip(stored)).rev() {
                    self.tail.push_front((r, size));
                }
            }
        }
    }

    fn stop(&mut self) {
        self.next_tail_retry = Instant::now();
        self.retry_tail();
        if !self.tail.is_empty() {
            tracing::error!(
                records = self.tail.len(),
                "Recorder stopping with records the disk refused and the store did not take; they are not in the spool (those the journal took stay in its files and are replayed at the next start)."
            );
        }
    }
}

/// The file records the store rejected for good go to, one JSON object a line:
/// `{"id", "error", "time", "record"}`. Capped; when full, writing fails and the writer keeps
/// the record (it is retried, not dropped).
pub(crate) struct DeadLetters {
    path: PathBuf,
    max_bytes: u64,
    fsync: SpoolFsync,
}

#[derive(Serialize)]
struct DeadLetter<'a> {
    id: String,
    error: &'a str,
    time: DateTime<Utc>,
    record: &'a RawRecord,
}

impl DeadLetters {
    pub(crate) const FILE_NAME: &'static str = "dead-letter.jsonl";

    pub(crate) fn new(spool_dir: &std::path::Path, max_bytes: u64, fsync: SpoolFsync) -> Self {
        DeadLetters {
            path: spool_dir.join(Self::FILE_NAME),
            max_bytes,
            fsync,
        }
    }

    fn write(&self, record: &RawRecord, error: &str) -> Result<PathBuf, SpoolError> {
        let entry = DeadLetter {
            id: record.id(),
            error,
            time: Utc::now(),
            record,
        };
        let mut line = serde_json::to_vec(&entry)?;
        line.push(b'\n');
        // Measured each time (not remembered), so an operator moving the file away frees the
        // budget at once.
        let len = match fs::metadata(&self.path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e.into()),
        };
        if len + line.len() as u64 > self.max_bytes {
            return Err(SpoolError::DeadLetterFull {
                max_bytes: self.max_bytes,
            });
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        // Whole lines only, as spool appends: a failed write is cut back off.
        let written = file.write_all(&line).and_then(|()| match self.fsync {
            SpoolFsync::Always => file.sync_data(),
            SpoolFsync::Never => Ok(()),
        });
        if let Err(e) = written {
            let _ = file.set_len(len);
            return Err(e.into());
        }
        Ok(self.path.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tollgate_store::conformance::sample_request;

    use super::super::spool::tests::{limits, short_opener};
    use super::*;

    fn ids(records: &[RawRecord]) -> Vec<String> {
        records.iter().map(RawRecord::id).collect()
    }

    struct Rig {
        handle: SpoolHandle,
        worker: Worker,
        budget: Arc<Mutex<Option<u64>>>,
        stats: Arc<RecorderStats>,
        _dir: tempfile::TempDir,
    }

    /// A worker driven by hand: commands are handled when the test says, no thread involved.
    fn rig(buffer_max_bytes: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let budget = Arc::new(Mutex::new(None));
        let opener = short_opener(budget.clone(), Arc::new(AtomicU64::new(0)));
        let spool = Spool::open(dir.path(), limits(1 << 20, 1 << 20), opener).unwrap();
        let stats = Arc::new(RecorderStats::default());
        let (handle, worker) = worker(
            spool,
            SpoolerSettings {
                buffer_max_bytes,
                retry_interval: Duration::from_secs(3600),
                dead_letter: DeadLetters::new(dir.path(), 1 << 20, SpoolFsync::Never),
                stats: stats.clone(),
                ready: Arc::new(Notify::new()),
                space: Arc::new(Notify::new()),
                ledger: Arc::new(Ledger::new()),
            },
        );
        Rig {
            handle,
            worker,
            budget,
            stats,
            _dir: dir,
        }
    }

    impl Rig {
        fn pump(&mut self) {
            while let Ok(cmd) = self.worker.rx.try_recv() {
                self.worker.handle(cmd);
            }
        }

        fn offer(&mut self, id: &str) {
            self.offer_journaled(id, 0);
        }

        fn offer_journaled(&mut self, id: &str, seq: u64) {
            let r = sample_request(id);
            let size = super::super::estimated_size(&r);
            assert!(self.handle.offer(Box::new(r), size, seq).is_ok());
            self.pump();
        }

        /// Reads everything, settling each batch as stored.
        fn drain(&mut self) -> Vec<String> {
            let mut out = Vec::new();
            loop {
                let batch = self.worker.read(2, u64::MAX).unwrap();
                let Some(batch) = batch else {
                    return out;
                };
                out.extend(ids(&batch.records));
                let n = batch.records.len();
                self.handle.settle(batch, n);
                self.pump();
            }
        }
    }

    #[test]
    fn records_the_disk_refuses_wait_in_memory_in_order_and_are_replayed_from_there() {
        let mut rig = rig(1 << 20);
        rig.offer("a");
        *rig.budget.lock().unwrap() = Some(0);
        rig.offer("b");
        assert!(rig.worker.in_memory(), "the refused record is kept");
        assert!(
            !rig.handle.has_room(0),
            "new requests are refused meanwhile"
        );
        // The disk works again, but order holds: c joins the tail behind b.
        *rig.budget.lock().unwrap() = None;
        rig.offer("c");
        assert_eq!(rig.stats.spool_errors.load(Ordering::Relaxed), 1);
        assert_eq!(rig.drain(), vec!["a:0", "b:0", "c:0"]);
        assert!(rig.handle.is_empty());
        assert!(rig.handle.has_room(0));
    }

    /// An overflowed record releases its journal entry once the spool has it; one the disk
    /// refused is flagged in memory before it counts as settled, so the journal keeps its file.
    #[test]
    fn overflowed_records_settle_once_the_spool_has_them() {
        let mut rig = rig(1 << 20);
        let ledger = rig.worker.settings.ledger.clone();
        rig.offer_journaled("a", 1);
        assert_eq!(ledger.low(), 2, "on disk: settled");
        assert!(!rig.handle.in_memory());
        *rig.budget.lock().unwrap() = Some(0);
        rig.offer_journaled("b", 2);
        assert_eq!(ledger.low(), 3, "in the tail: settled…");
        assert!(rig.handle.in_memory(), "…with the spool saying so");
        *rig.budget.lock().unwrap() = None;
        rig.worker.next_tail_retry = Instant::now();
        rig.worker.retry_tail();
        assert!(!rig.handle.in_memory(), "on disk now");
    }

    #[test]
    fn a_tail_batch_given_back_is_read_again_first() {
        let mut rig = rig(1 << 20);
        *rig.budget.lock().unwrap() = Some(0);
        for id in ["a", "b", "c"] {
            rig.offer(id);
        }
        let batch = rig.worker.read(2, u64::MAX).unwrap().unwrap();
        assert_eq!(ids(&batch.records), vec!["a:0", "b:0"]);
        // While the batch is out the tail stays in memory even if the disk recovers.
        *rig.budget.lock().unwrap() = None;
        rig.worker.retry_tail();
        assert!(rig.worker.in_memory());
        // The store took only `a`.
        rig.handle.settle(batch, 1);
        rig.pump();
        assert_eq!(rig.drain(), vec!["b:0", "c:0"]);
    }

    #[test]
    fn the_tail_moves_to_disk_when_the_disk_recovers() {
        let mut rig = rig(1 << 20);
        *rig.budget.lock().unwrap() = Some(0);
        rig.offer("a");
        rig.offer("b");
        *rig.budget.lock().unwrap() = None;
        rig.worker.retry_tail();
        assert!(!rig.worker.in_memory());
        assert!(rig.handle.pending_bytes() > 0);
        assert_eq!(rig.drain(), vec!["a:0", "b:0"]);
    }

    #[test]
    fn memory_for_refused_records_is_bounded() {
        let mut rig = rig(1);
        *rig.budget.lock().unwrap() = Some(0);
        // An empty buffer takes one record whatever its size…
        rig.offer("a");
        // …but no more while it is held.
        let r = sample_request("b");
        assert!(rig.handle.offer(Box::new(r), 600, 0).is_err());
        let (reply, _answer) = oneshot::channel();
        rig.worker.handle(Command::Append {
            records: vec![sample_request("c")],
            sizes: vec![600],
            reply,
        });
        assert_eq!(rig.worker.tail.len(), 1, "the writer's batch is given back");
    }

    #[test]
    fn dead_letters_are_json_lines_with_id_error_time_and_record() {
        let mut rig = rig(1 << 20);
        let (reply, mut answer) = oneshot::channel();
        rig.worker.handle(Command::DeadLetter {
            record: Box::new(sample_request("bad")),
            error: "rejected".into(),
            reply,
        });
        let path = answer.try_recv().unwrap().unwrap();
        let text = fs::read_to_string(path).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(line["id"], "bad:0");
        assert_eq!(line["error"], "rejected");
        assert!(line["time"].is_string());
        let back: RawRecord = serde_json::from_value(line["record"].clone()).unwrap();
        assert_eq!((back.id(), back.kind()), ("bad:0".to_owned(), "request"));
    }

    #[test]
    fn a_full_dead_letter_file_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let dl = DeadLetters::new(dir.path(), 10, SpoolFsync::Always);
        assert!(matches!(
            dl.write(&sample_request("x"), "e"),
            Err(SpoolError::DeadLetterFull { .. })
        ));
    }
}
