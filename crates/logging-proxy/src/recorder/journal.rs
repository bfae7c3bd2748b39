//! The write-ahead journal: every record handed to the recorder is also appended to a journal
//! file, so a response whose last byte has gone out has its records in a file even if the
//! process is killed (SIGKILL) before the writer stored them. The queue and the writer's linger
//! are what make the store fast; the journal is what makes them safe to lose.
//!
//! - **Group commit.** Request tasks serialise a record into a frame (the spool's format:
//!   `[len u32 LE][crc32 u32 LE][JSON]`) and add it to a shared buffer under a short lock, with
//!   the next sequence number; they never touch a file. One thread takes everything buffered
//!   since its last write, writes it with one `write_all`, and moves the watermark "released
//!   up to sequence N" (`watermark.rs`), which wakes only the responses it passes. The thread
//!   is woken when a response starts waiting, not per record. The tee
//!   holds a response's last byte until the watermark passes its `end` record; nothing else
//!   waits.
//! - **Durability.** `write(2)` puts the bytes in the page cache, which outlives the process:
//!   that is what SIGKILL needs. A power loss needs `journal_fsync = "always"` (one
//!   `fdatasync` per group, and the directory synced when a file is created).
//! - **Truncation.** Files are numbered `{id:016}.journal` and rotated at
//!   `journal_file_max_bytes`. A record is *settled* once the store confirmed it (or it was
//!   dead-lettered) or it is on disk in the spool ([`Ledger`]); a file is deleted once every
//!   sequence number up to its last is settled and the spool holds nothing in memory only (a
//!   record in the spool's in-memory tail counts as settled for the ledger, but is not durable
//!   until it leaves the tail). The file being appended to is deleted the same way once a
//!   second has passed since it was last looked at, so an idle proxy leaves little to replay.
//! - **Recovery.** At start, files an earlier run left are handed to the spool, which reads
//!   them like its own files and deletes them once the store confirmed their records; appends
//!   are idempotent by record id, so records that were already stored are no-ops.
//! - **Bounds.** `journal_max_bytes` on disk and `journal_buffer_max_bytes` of frames waiting for
//!   the thread; the ledger takes one bit per sequence number between the oldest unsettled
//!   record and the newest settled one. A record that would go over either bound is not
//!   journaled (counted in `unjournaled`, its response is not held); before that, admission
//!   refuses new requests (`has_room`), as it does for the spool.
//! - **Failure.** A failed write is rolled back (the file truncated to its last whole frame, or
//!   sealed) and its records are released unjournaled, counted, with an ERROR line: a failing
//!   disk must not hang every response. While writes fail the recorder refuses new requests;
//!   after `retry_interval` without a write, it accepts again and the next write decides.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::task::TaskTracker;
use tollgate_records::RawRecord;

use super::RecorderStats;
use super::spool::{self, AppendFile, Opener, SpoolError, SpoolFsync};
use super::spooler::SpoolHandle;
use super::watermark::{self, Watermark};

/// How often the file being appended to is checked for deletion: often enough that an idle
/// proxy keeps little to replay, rarely enough that a busy one does not create and delete a file
/// per batch.
const ACTIVE_CHECK: Duration = Duration::from_secs(1);

/// Buffered bytes at which an append wakes the thread, with no response waiting yet.
const WAKE_AT_BYTES: usize = 256 * 1024;

/// Sequence numbers start at 1; 0 means "not journaled" (nothing to wait for, nothing to settle).
pub(crate) const UNJOURNALED: u64 = 0;

const SUFFIX: &str = ".journal";

/// Which records are settled: in the store (or dead-lettered) or on disk in the spool. A bit
/// per sequence number from the oldest unsettled one; whole words of settled numbers are
/// dropped from the front.
pub(crate) struct Ledger {
    bits: Mutex<Bits>,
}

struct Bits {
    /// Sequence number of bit 0 of `words[0]`; a multiple of 64.
    start: u64,
    words: VecDeque<u64>,
}

impl Ledger {
    pub(crate) fn new() -> Ledger {
        Ledger {
            // Sequence number 0 is never handed out: settled from the start.
            bits: Mutex::new(Bits {
                start: 0,
                words: VecDeque::from([1]),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Bits> {
        self.bits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks records settled; [`UNJOURNALED`] and numbers already settled are ignored.
    pub(crate) fn settle(&self, seqs: impl IntoIterator<Item = u64>) {
        let mut bits = self.lock();
        for seq in seqs {
            bits.settle(seq);
        }
        bits.compact();
    }

    /// The oldest sequence number not settled: everything below it is.
    pub(crate) fn low(&self) -> u64 {
        let bits = self.lock();
        match bits.words.front() {
            Some(w) => bits.start + u64::from(w.trailing_ones()),
            None => bits.start,
        }
    }

    /// Words held, for tests of the bound.
    #[cfg(test)]
    fn words(&self) -> usize {
        self.lock().words.len()
    }
}

impl Bits {
    fn settle(&mut self, seq: u64) {
        if seq < self.start {
            return;
        }
        let offset = seq - self.start;
        let Ok(word) = usize::try_from(offset / 64) else {
            return;
        };
        if self.words.len() <= word {
            self.words.resize(word + 1, 0);
        }
        if let Some(w) = self.words.get_mut(word) {
            *w |= 1 << (offset % 64);
        }
    }

    fn compact(&mut self) {
        while self.words.front() == Some(&u64::MAX) {
            self.words.pop_front();
            self.start += 64;
        }
    }
}

/// What the journal needs from the configuration.
pub(crate) struct JournalSettings {
    pub(crate) dir: PathBuf,
    pub(crate) file_max_bytes: u64,
    pub(crate) max_bytes: u64,
    pub(crate) buffer_max_bytes: u64,
    pub(crate) fsync: SpoolFsync,
    pub(crate) retry_interval: Duration,
}

/// Journal files an earlier run left in `dir` (created if missing), oldest first, and the id
/// the next file gets.
pub(crate) fn leftovers(dir: &Path) -> io::Result<(Vec<PathBuf>, u64)> {
    fs::create_dir_all(dir)?;
    let mut files: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let id = name.strip_suffix(SUFFIX)?.parse::<u64>().ok()?;
            Some((id, e.path()))
        })
        .collect();
    files.sort_by_key(|(id, _)| *id);
    let next_id = files.last().map_or(0, |(id, _)| id + 1);
    Ok((files.into_iter().map(|(_, p)| p).collect(), next_id))
}

/// Frames waiting for the journal thread.
struct Pending {
    buf: Vec<u8>,
    /// The number the next record gets.
    next_seq: u64,
    /// The thread waits for records; whoever adds one wakes it.
    sleeping: bool,
    stop: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Bytes in `pending.buf`, readable without the lock (admission).
    buffer_bytes: AtomicU64,
    /// Bytes in this run's journal files.
    disk_bytes: AtomicU64,
    /// The last write failed; new requests are refused until the journal writes again.
    failing: AtomicBool,
    max_bytes: u64,
    buffer_max_bytes: u64,
    stats: Arc<RecorderStats>,
    /// Highest sequence number released: written, or given up on (failed write). Moved to the
    /// end when the thread is gone, which releases every waiter.
    released: Arc<Watermark>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The request tasks' and the tee's side of the journal thread.
#[derive(Clone)]
pub(crate) struct Journal {
    shared: Arc<Shared>,
    /// Held by every handle; the thread stops once none is left.
    _handles: Arc<()>,
}

/// Starts the journal thread on `tracker`'s blocking pool; it runs until [`Journal::stop`].
pub(crate) fn start(
    settings: JournalSettings,
    first_id: u64,
    opener: Opener,
    ledger: Arc<Ledger>,
    spool: SpoolHandle,
    stats: Arc<RecorderStats>,
    tracker: &TaskTracker,
) -> Journal {
    let (journal, worker) = worker(settings, first_id, opener, ledger, spool, stats);
    tracker.spawn_blocking(move || worker.run());
    journal
}

fn worker(
    settings: JournalSettings,
    first_id: u64,
    opener: Opener,
    ledger: Arc<Ledger>,
    spool: SpoolHandle,
    stats: Arc<RecorderStats>,
) -> (Journal, Worker) {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending {
            buf: Vec::new(),
            next_seq: 1,
            sleeping: false,
            stop: false,
        }),
        wake: Condvar::new(),
        buffer_bytes: AtomicU64::new(0),
        disk_bytes: AtomicU64::new(0),
        failing: AtomicBool::new(false),
        max_bytes: settings.max_bytes,
        buffer_max_bytes: settings.buffer_max_bytes,
        stats,
        released: Arc::new(Watermark::default()),
    });
    let handles = Arc::new(());
    let worker = Worker {
        handles: Arc::downgrade(&handles),
        shared: shared.clone(),
        opener,
        ledger,
        spool,
        files: VecDeque::new(),
        writer: None,
        next_id: first_id,
        spare: Vec::new(),
        taken_up_to: 0,
        failed_at: None,
        active_checked: Instant::now(),
        settings,
    };
    (
        Journal {
            shared,
            _handles: handles,
        },
        worker,
    )
}

impl Journal {
    /// Serialises `record` into the journal's buffer without waiting; its sequence number, or
    /// [`UNJOURNALED`] when the journal cannot take it (over a bound, stopped, not encodable).
    #[cfg(test)]
    pub(crate) fn append(&self, record: &RawRecord) -> u64 {
        self.append_json(record, None)
    }

    /// As [`Journal::append`], with the record's JSON when the caller made it already (it is
    /// made once and serves the store's document too).
    pub(crate) fn append_json(&self, record: &RawRecord, json: Option<&str>) -> u64 {
        let s = &self.shared;
        let mut frame = Vec::new();
        let encoded = match json {
            Some(j) => spool::encode_payload(&mut frame, j.as_bytes()),
            None => spool::encode_frame(&mut frame, record),
        };
        if let Err(e) = encoded {
            tracing::error!(record_id = %record.id(), error = %e, "Record could not be journaled.");
            s.stats.unjournaled.fetch_add(1, Ordering::Relaxed);
            return UNJOURNALED;
        }
        let len = frame.len() as u64;
        let mut p = s.lock();
        let buffered = p.buf.len() as u64;
        // An empty buffer takes any one record, so a record over the buffer's budget is not
        // refused for ever; the disk cap holds regardless.
        let over_buffer = buffered > 0 && buffered + len > s.buffer_max_bytes;
        let over_disk = s.disk_bytes.load(Ordering::Relaxed) + buffered + len > s.max_bytes;
        if p.stop || over_buffer || over_disk {
            drop(p);
            s.stats.unjournaled.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                record_id = %record.id(),
                over_buffer,
                over_disk,
                "Journal cannot take a record; its response will not wait for it."
            );
            return UNJOURNALED;
        }
        p.buf.extend_from_slice(&frame);
        let seq = p.next_seq;
        p.next_seq += 1;
        s.buffer_bytes.store(p.buf.len() as u64, Ordering::Relaxed);
        // The thread is woken when a response starts waiting ([`Journal::released`]), not per
        // record: waking it for every record cost a futex wake and two context switches each,
        // and the records before the one waited for are written in its group (the buffer keeps
        // their order). A large buffer is written without waiting for a waiter.
        let wake = p.buf.len() >= WAKE_AT_BYTES && std::mem::take(&mut p.sleeping);
        drop(p);
        if wake {
            s.wake.notify_one();
        }
        seq
    }

    /// Wakes the thread if it sleeps: something waits for what is buffered.
    fn wake(&self) {
        let s = &self.shared;
        let wake = std::mem::take(&mut s.lock().sleeping);
        if wake {
            s.wake.notify_one();
        }
    }

    /// A future that completes once record `seq` is released (written to the journal, or given
    /// up on); `None` when it already is.
    pub(crate) fn released(&self, seq: u64) -> Option<impl Future<Output = ()> + Send + 'static> {
        let released = &self.shared.released;
        if seq == UNJOURNALED || released.get() >= seq {
            return None;
        }
        self.wake();
        Some(watermark::reached(released.clone(), seq))
    }

    /// Whether the journal takes new requests' records: not while writes fail, nor within the
    /// headroom of its caps.
    pub(crate) fn has_room(&self) -> bool {
        let s = &self.shared;
        let headroom = super::spool_headroom(s.max_bytes);
        let buffered = s.buffer_bytes.load(Ordering::Relaxed);
        !s.failing.load(Ordering::Relaxed)
            && s.disk_bytes.load(Ordering::Relaxed) + buffered + headroom <= s.max_bytes
            && buffered + super::spool_headroom(s.buffer_max_bytes) <= s.buffer_max_bytes
    }

    /// Bytes in this run's journal files.
    pub(crate) fn disk_bytes(&self) -> u64 {
        self.shared.disk_bytes.load(Ordering::Relaxed)
    }

    /// Writes what is buffered, deletes the files whose records are all settled, and stops the
    /// thread. Later records are not journaled.
    pub(crate) fn stop(&self) {
        let mut p = self.shared.lock();
        p.stop = true;
        drop(p);
        self.shared.wake.notify_one();
    }
}

struct JournalFile {
    path: PathBuf,
    /// End of the last whole frame written.
    size: u64,
    /// Highest sequence number in the file (0: none).
    last_seq: u64,
}

struct Worker {
    shared: Arc<Shared>,
    handles: std::sync::Weak<()>,
    opener: Opener,
    ledger: Arc<Ledger>,
    spool: SpoolHandle,
    /// Oldest first; when `writer` is set, the last one is open for appending.
    files: VecDeque<JournalFile>,
    writer: Option<Box<dyn AppendFile>>,
    next_id: u64,
    /// The buffer swapped in for the one taken, so neither is reallocated per group.
    spare: Vec<u8>,
    /// Highest sequence number taken from the buffer.
    taken_up_to: u64,
    /// When the last write failed, while the journal is failing.
    failed_at: Option<Instant>,
    active_checked: Instant,
    settings: JournalSettings,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // However the thread ends (a stop, a panic), no response waits for it any longer.
        self.shared.released.close();
    }
}

/// A group taken from the buffer: its frames and the last sequence number among them.
struct Group {
    frames: Vec<u8>,
    first_seq: u64,
    last_seq: u64,
    stop: bool,
}

impl Worker {
    fn run(mut self) {
        loop {
            self.wait();
            let due = self.active_checked.elapsed() >= ACTIVE_CHECK;
            if self.turn(due) {
                // Dropping the worker releases every waiter, whatever they wait for.
                return;
            }
        }
    }

    /// Blocks until frames are buffered, the stop is asked for, or the file being appended to
    /// is due a look.
    fn wait(&mut self) {
        let shared = self.shared.clone();
        let mut p = shared.lock();
        while p.buf.is_empty() && !p.stop {
            if self.handles.strong_count() == 0 {
                // Every handle is gone without a stop (the recorder was dropped, a test
                // panicked): nothing can add records, so stop rather than keep a thread.
                p.stop = true;
                break;
            }
            if let Some(at) = self.failed_at
                && at.elapsed() >= self.settings.retry_interval
            {
                // Nothing written since the failure: accept again and let the next write tell.
                self.failed_at = None;
                self.shared.failing.store(false, Ordering::Relaxed);
                tracing::info!("Journal accepts records again after a failed write.");
            }
            let since = self.active_checked.elapsed();
            if since >= ACTIVE_CHECK {
                return;
            }
            p.sleeping = true;
            let (guard, _) = shared
                .wake
                .wait_timeout(p, ACTIVE_CHECK - since)
                .unwrap_or_else(PoisonError::into_inner);
            p = guard;
            p.sleeping = false;
        }
    }

    /// One turn: takes what is buffered, writes it as one group, publishes the watermark and
    /// deletes the files whose records are settled (with `check_active`, or when stopping, the
    /// file being appended to too). True once stopped.
    fn turn(&mut self, check_active: bool) -> bool {
        let group = self.take();
        if !group.frames.is_empty() {
            self.write_group(&group);
        }
        self.shared.released.advance(group.last_seq);
        self.spare = group.frames;
        self.spare.clear();
        // A burst's buffer is not kept for ever.
        if self.spare.capacity() > 4 * 1024 * 1024 {
            self.spare = Vec::new();
        }
        self.retire(check_active || group.stop);
        group.stop
    }

    /// Takes everything buffered, without waiting.
    fn take(&mut self) -> Group {
        let shared = self.shared.clone();
        let mut p = shared.lock();
        std::mem::swap(&mut p.buf, &mut self.spare);
        let frames = std::mem::take(&mut self.spare);
        let last_seq = p.next_seq - 1;
        let stop = p.stop;
        self.shared.buffer_bytes.store(0, Ordering::Relaxed);
        drop(p);
        let first_seq = self.taken_up_to + 1;
        self.taken_up_to = last_seq;
        Group {
            frames,
            first_seq,
            last_seq,
            stop,
        }
    }

    fn write_group(&mut self, group: &Group) {
        let records = group.last_seq + 1 - group.first_seq;
        let stats = self.shared.stats.clone();
        match self.write(&group.frames, group.last_seq) {
            Ok(()) => {
                stats.journaled.fetch_add(records, Ordering::Relaxed);
                if self.failed_at.take().is_some() {
                    self.shared.failing.store(false, Ordering::Relaxed);
                    tracing::info!("Journal writes again.");
                }
            }
            Err(e) => {
                stats.journal_errors.fetch_add(1, Ordering::Relaxed);
                stats.unjournaled.fetch_add(records, Ordering::Relaxed);
                tracing::error!(
                    error = %e,
                    records,
                    "Journal write failed; these records are in the queue or spool but not journaled, and their responses were not held. New requests are refused until the journal writes again."
                );
                self.failed_at = Some(Instant::now());
                self.shared.failing.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Appends `frames` to the current file (a new one past the size cap): all of them, or none
    /// and the file as before.
    fn write(&mut self, frames: &[u8], last_seq: u64) -> Result<(), SpoolError> {
        let rotate = match (self.writer.as_ref(), self.files.back()) {
            (Some(_), Some(f)) => f.size >= self.settings.file_max_bytes,
            _ => true,
        };
        if rotate {
            self.start_file()?;
        }
        let sync = self.settings.fsync == SpoolFsync::Always;
        let (Some(w), Some(f)) = (self.writer.as_mut(), self.files.back_mut()) else {
            return Err(io::Error::other("journal writer missing").into());
        };
        let good = f.size;
        let written = w
            .write_all(frames)
            .and_then(|()| if sync { w.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            // Nothing may follow a partial frame: cut it off, or stop appending to this file.
            // After a failed sync what the file holds is unknown, so it is sealed either way.
            let cut = w.set_len(good);
            if cut.is_err() || sync {
                self.writer = None;
            }
            return Err(e.into());
        }
        f.size = good + frames.len() as u64;
        f.last_seq = last_seq;
        self.shared
            .disk_bytes
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn start_file(&mut self) -> Result<(), SpoolError> {
        let id = self.next_id;
        self.next_id += 1;
        let path = self.settings.dir.join(format!("{id:016}{SUFFIX}"));
        // The old file is sealed first: only the newest is appended to.
        self.writer = None;
        let file = (self.opener)(&path)?;
        self.files.push_back(JournalFile {
            path,
            size: 0,
            last_seq: 0,
        });
        if self.settings.fsync == SpoolFsync::Always {
            spool::sync_dir(&self.settings.dir)?;
        }
        self.writer = Some(file);
        Ok(())
    }

    /// Deletes the sealed files (and, with `active`, the one being appended to) whose records
    /// are all settled.
    fn retire(&mut self, active: bool) {
        if active {
            self.active_checked = Instant::now();
        }
        // The ledger first, then the spool: a record the spool took into memory is marked
        // settled only after the spool says it holds records in memory, so seeing it settled
        // and then the spool not in memory means it left memory (stored or on disk).
        let low = self.ledger.low();
        if self.spool.in_memory() {
            return;
        }
        while let Some(f) = self.files.front() {
            let is_active = self.writer.is_some() && self.files.len() == 1;
            if f.last_seq >= low || (is_active && !active) {
                return;
            }
            if is_active {
                self.writer = None;
            }
            let Some(f) = self.files.pop_front() else {
                return;
            };
            match fs::remove_file(&f.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    // Left on disk, it is replayed (as no-ops) at the next start; not counted
                    // here any more, so it does not hold the journal full.
                    tracing::warn!(file = %f.path.display(), error = %e, "Journal file could not be deleted.");
                }
            }
            self.shared.disk_bytes.fetch_sub(f.size, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tollgate_store::conformance::{sample_chunk, sample_request};

    use super::super::spool::tests::{drain, limits, short_opener};
    use super::super::spool::{Spool, file_opener};
    use super::super::spooler::{self, DeadLetters, SpoolerSettings};
    use super::*;

    struct Rig {
        journal: Journal,
        worker: Option<Worker>,
        ledger: Arc<Ledger>,
        stats: Arc<RecorderStats>,
        dir: tempfile::TempDir,
    }

    fn settings(dir: &Path, file_max_bytes: u64) -> JournalSettings {
        JournalSettings {
            dir: dir.to_path_buf(),
            file_max_bytes,
            max_bytes: 1 << 24,
            buffer_max_bytes: 1 << 20,
            fsync: SpoolFsync::Never,
            retry_interval: Duration::from_secs(3600),
        }
    }

    /// A journal whose thread is driven by hand (`step`), next to an idle spool.
    fn rig(tweak: impl FnOnce(&mut JournalSettings), opener: Opener) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let journal_dir = dir.path().join("journal");
        fs::create_dir_all(&journal_dir).unwrap();
        let mut s = settings(&journal_dir, 1 << 20);
        tweak(&mut s);
        let stats = Arc::new(RecorderStats::default());
        let ledger = Arc::new(Ledger::new());
        let spool = Spool::open(
            &dir.path().join("spool"),
            limits(1 << 20, 1 << 20),
            file_opener(),
        )
        .unwrap();
        // Only its "holds records in memory" flag is read; no thread needed.
        let spool = spooler::detached(
            spool,
            SpoolerSettings {
                buffer_max_bytes: 1 << 20,
                retry_interval: Duration::from_secs(3600),
                dead_letter: DeadLetters::new(dir.path(), 1 << 20, SpoolFsync::Never),
                stats: stats.clone(),
                ready: Arc::new(tokio::sync::Notify::new()),
                space: Arc::new(tokio::sync::Notify::new()),
                ledger: ledger.clone(),
            },
        );
        let (journal, worker) = worker(s, 0, opener, ledger.clone(), spool, stats.clone());
        Rig {
            journal,
            worker: Some(worker),
            ledger,
            stats,
            dir,
        }
    }

    impl Rig {
        fn worker(&mut self) -> &mut Worker {
            self.worker.as_mut().unwrap()
        }

        /// One turn of the thread's loop, without waiting.
        fn step(&mut self, check_active: bool) {
            self.worker().turn(check_active);
        }

        fn files(&self) -> Vec<PathBuf> {
            leftovers(&self.dir.path().join("journal")).unwrap().0
        }

        fn released(&self) -> u64 {
            self.journal.shared.released.get()
        }
    }

    /// Found when the watch channel gave way to the watermark: the thread counted a clone of
    /// its own as a handle, never stopped, and a runtime without an explicit shutdown (a
    /// test's) waited on it for ever.
    #[test]
    fn the_thread_stops_once_every_handle_is_gone_and_releases_waiters() {
        let mut rig = rig(|_| {}, file_opener());
        let worker = rig.worker.take().unwrap();
        let mark = rig.journal.shared.released.clone();
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            worker.run();
            let _ = done_tx.send(());
        });
        drop(rig.journal);
        done.recv_timeout(Duration::from_secs(30))
            .expect("the thread stopped with no handle left");
        assert_eq!(mark.get(), u64::MAX, "every waiter is released");
    }

    #[test]
    fn one_group_is_one_write_and_publishes_its_last_sequence_number() {
        let mut rig = rig(|_| {}, file_opener());
        let a = rig.journal.append(&sample_request("a"));
        let b = rig.journal.append(&sample_request("b"));
        assert_eq!((a, b), (1, 2));
        assert!(rig.journal.released(b).is_some(), "not written yet");
        rig.step(false);
        assert_eq!(rig.released(), 2);
        assert!(rig.journal.released(a).is_none());
        assert!(rig.journal.released(b).is_none());
        let c = rig.journal.append(&sample_request("c"));
        assert_eq!(c, 3);
        assert!(rig.journal.released(c).is_some(), "a later record waits");
        rig.step(false);
        assert_eq!(rig.released(), 3);
        assert_eq!(rig.stats.journaled.load(Ordering::Relaxed), 3);
        // Everything is in the file, in order, in the spool's format.
        let files = rig.files();
        assert_eq!(files.len(), 1);
        let mut spool =
            Spool::open(rig.dir.path(), limits(1 << 20, 1 << 20), file_opener()).unwrap();
        spool.adopt(files).unwrap();
        assert_eq!(drain(&mut spool), vec!["a:0", "b:0", "c:0"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_thread_releases_waiters_and_stop_releases_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut rig = rig(|s| s.dir = dir.path().to_path_buf(), file_opener());
        let worker = rig.worker.take().unwrap();
        let tracker = TaskTracker::new();
        tracker.spawn_blocking(move || worker.run());
        let seq = rig.journal.append(&sample_request("t"));
        if let Some(wait) = rig.journal.released(seq) {
            tokio::time::timeout(Duration::from_secs(20), wait)
                .await
                .expect("released by the thread");
        }
        assert_eq!(rig.stats.journaled.load(Ordering::Relaxed), 1);
        rig.ledger.settle([seq]);
        rig.journal.stop();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(20), tracker.wait())
            .await
            .expect("the thread stops");
        assert!(
            leftovers(dir.path()).unwrap().0.is_empty(),
            "a settled journal is deleted at stop"
        );
        // After the stop nothing is journaled and nothing waits.
        let late = rig.journal.append(&sample_request("late"));
        assert_eq!(late, UNJOURNALED);
        assert!(rig.journal.released(late).is_none());
    }

    #[test]
    fn a_file_is_deleted_once_every_record_in_it_is_settled() {
        // Rotates after every group.
        let mut rig = rig(|s| s.file_max_bytes = 1, file_opener());
        let first: Vec<u64> = ["a", "b"]
            .iter()
            .map(|id| rig.journal.append(&sample_request(id)))
            .collect();
        rig.step(false);
        let second = rig.journal.append(&sample_request("c"));
        rig.step(false);
        assert_eq!(rig.files().len(), 2);
        // Settled out of order: the first file still has `a` outstanding.
        rig.ledger.settle([first[1], second]);
        rig.step(true);
        assert_eq!(
            rig.files().len(),
            2,
            "nothing deleted while `a` is not settled"
        );
        rig.ledger.settle([first[0]]);
        rig.step(false);
        assert_eq!(rig.files().len(), 1, "the sealed file is deleted");
        rig.step(true);
        assert!(
            rig.files().is_empty(),
            "the active file goes on an idle look"
        );
        assert_eq!(rig.journal.disk_bytes(), 0);
        // The next record starts a new file.
        rig.journal.append(&sample_request("d"));
        rig.step(false);
        assert_eq!(rig.files().len(), 1);
    }

    #[test]
    fn nothing_is_deleted_while_the_spool_holds_records_in_memory_only() {
        let mut rig = rig(|s| s.file_max_bytes = 1, file_opener());
        let a = rig.journal.append(&sample_request("a"));
        rig.step(false);
        rig.journal.append(&sample_request("b"));
        rig.step(false);
        rig.ledger.settle([a]);
        rig.worker().spool.set_in_memory_for_test(true);
        rig.step(false);
        assert_eq!(rig.files().len(), 2);
        rig.worker().spool.set_in_memory_for_test(false);
        rig.step(false);
        assert_eq!(rig.files().len(), 1);
    }

    #[test]
    fn the_ledger_moves_past_settled_numbers_in_any_order_and_stays_small() {
        let ledger = Ledger::new();
        assert_eq!(ledger.low(), 1);
        ledger.settle([3, 2]);
        assert_eq!(ledger.low(), 1);
        ledger.settle([1, UNJOURNALED, 2]);
        assert_eq!(ledger.low(), 4);
        ledger.settle((4..10_000).rev());
        assert_eq!(ledger.low(), 10_000);
        assert!(ledger.words() <= 1, "settled words are dropped");
    }

    #[test]
    fn leftover_files_are_replayed_and_a_torn_tail_is_skipped_frame_by_frame() {
        let mut rig = rig(|s| s.file_max_bytes = 1, file_opener());
        for id in ["l0", "l1"] {
            rig.journal.append(&sample_request(id));
        }
        rig.step(false);
        rig.journal.append(&sample_chunk("l2", 1, &"x".repeat(500)));
        rig.journal.append(&sample_request("l3"));
        rig.step(false);
        let files = rig.files();
        assert_eq!(files.len(), 2);
        // Killed mid-write: the last frame of the last file is cut short, and the one before
        // it damaged.
        let last = files[1].clone();
        let mut bytes = fs::read(&last).unwrap();
        let first_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
        bytes[8 + first_len / 2] ^= 0xff;
        bytes.truncate(bytes.len() - 10);
        fs::write(&last, &bytes).unwrap();

        // The next start: what the killed run left is handed to the spool.
        let journal_dir = rig.dir.path().join("journal");
        let (left, next_id) = leftovers(&journal_dir).unwrap();
        assert_eq!(left.len(), 2);
        assert_eq!(next_id, 2, "new files are numbered after the leftovers");
        let mut spool = Spool::open(
            &rig.dir.path().join("spool"),
            limits(1 << 20, 1 << 20),
            file_opener(),
        )
        .unwrap();
        spool.adopt(left).unwrap();
        assert_eq!(drain(&mut spool), vec!["l0:0", "l1:0"]);
        assert_eq!(
            spool.take_corrupt(),
            2,
            "the damaged frame and the torn tail"
        );
        assert!(
            leftovers(&journal_dir).unwrap().0.is_empty(),
            "replayed files are deleted"
        );
    }

    #[test]
    fn a_failed_write_is_rolled_back_released_and_refuses_new_requests_until_one_succeeds() {
        let budget = Arc::new(Mutex::new(None));
        let opener = short_opener(budget.clone(), Arc::new(AtomicU64::new(0)));
        let mut rig = rig(|_| {}, opener);
        rig.journal.append(&sample_request("ok"));
        rig.step(false);
        *budget.lock().unwrap() = Some(7);
        let lost = rig.journal.append(&sample_request("lost"));
        rig.step(false);
        assert_eq!(rig.released(), lost, "released although not written");
        assert!(!rig.journal.has_room(), "new requests are refused");
        assert_eq!(rig.stats.journal_errors.load(Ordering::Relaxed), 1);
        assert_eq!(rig.stats.unjournaled.load(Ordering::Relaxed), 1);
        *budget.lock().unwrap() = None;
        rig.journal.append(&sample_request("after"));
        rig.step(false);
        assert!(rig.journal.has_room(), "a good write clears it");
        let mut spool =
            Spool::open(rig.dir.path(), limits(1 << 20, 1 << 20), file_opener()).unwrap();
        spool.adopt(rig.files()).unwrap();
        assert_eq!(drain(&mut spool), vec!["ok:0", "after:0"]);
        assert_eq!(spool.take_corrupt(), 0, "the failed write left no garbage");
    }

    #[test]
    fn records_over_the_buffer_or_disk_cap_are_not_journaled_and_not_waited_for() {
        let one = {
            let mut f = Vec::new();
            spool::encode_frame(&mut f, &sample_request("a")).unwrap();
            f.len() as u64
        };
        let mut rig = rig(
            |s| {
                s.buffer_max_bytes = one + one / 2;
                s.max_bytes = 3 * one + one / 2;
            },
            file_opener(),
        );
        assert_ne!(rig.journal.append(&sample_request("a")), UNJOURNALED);
        assert_eq!(
            rig.journal.append(&sample_request("b")),
            UNJOURNALED,
            "over the buffer"
        );
        rig.step(false);
        for id in ["c", "d"] {
            assert_ne!(rig.journal.append(&sample_request(id)), UNJOURNALED);
            rig.step(false);
        }
        assert!(!rig.journal.has_room());
        assert_eq!(
            rig.journal.append(&sample_request("e")),
            UNJOURNALED,
            "over the disk cap"
        );
        assert_eq!(rig.stats.unjournaled.load(Ordering::Relaxed), 2);
    }
}
