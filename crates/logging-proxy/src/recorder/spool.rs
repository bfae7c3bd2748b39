//! The on-disk spool: where raw records wait when the in-memory queue is full or the store
//! fails, until the writer replays them. Only the spool thread (`spooler.rs`) touches it, so
//! none of this file's I/O runs on an async worker.
//!
//! Format: numbered files `{id:016}.spool`, each a run of frames
//! `[len: u32 LE][crc32 of the payload: u32 LE][len bytes of the record's JSON]`. The journal
//! writes the same frames, and at start the journal files an earlier run left are adopted and
//! read as spool files ([`Spool::adopt`]).
//!
//! Invariants:
//! - records are read back in append order, across files and restarts;
//! - an append lands whole or not at all. A failed write (disk full, I/O error) is rolled back
//!   by truncating the file to its last good length; if even that fails, or the failure was a
//!   sync, the file is sealed and the next append starts a new one. So a failed append never
//!   leaves bytes that later appends would sit behind, and the in-memory size of the file being
//!   appended to is always the end of its last whole frame;
//! - frames are checked one at a time: a frame whose checksum fails, or whose payload is not a
//!   record, is skipped alone and reading resumes at the next frame; only a length running past
//!   the end of the file (a crash mid-write) ends that file. Every skipped frame is an ERROR log
//!   line and counts in `corrupt_records` (once, however often it is read);
//! - a file is deleted only after every record in it was acknowledged by the store, so a crash
//!   replays at most some records again, which the store ignores by record id;
//! - the total size is capped: `append` fails with [`SpoolError::Full`] instead of growing.
//!
//! Durability ([`SpoolFsync`], `spool_fsync`): `never`, the default, leaves written frames to
//! the OS page cache. They survive the process crashing or being killed, not a power loss or a
//! kernel crash. The default is `never` because the spool exists to ride out store outages and
//! bursts, and records the journal holds (with its default `journal_fsync = "never"`) are lost
//! in the same events anyway: syncing only the spool would add a disk flush to every overflow
//! without making the recorder power-loss proof. `always` syncs the data after every append (the spool thread writes the
//! records that are waiting together, so one sync covers a group) and syncs the directory when
//! a file is created, for deployments that want spooled records to survive a power loss.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use tollgate_records::RawRecord;

/// When spool writes are synced to the disk; see the module doc of the recorder's spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpoolFsync {
    /// Sync the data after every append, and the directory after a file is created.
    Always,
    /// Leave it to the OS: survives a process crash, not a power loss.
    #[default]
    Never,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SpoolError {
    #[error("spool is full ({max_bytes} bytes)")]
    Full { max_bytes: u64 },
    #[error("dead-letter file is full ({max_bytes} bytes)")]
    DeadLetterFull { max_bytes: u64 },
    #[error("spool I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("record could not be serialised: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("spool thread has stopped")]
    Stopped,
}

/// What the spool needs from a file it appends to. A seam: tests put a file behind it whose
/// writes fail part-way.
pub(crate) trait AppendFile: Send {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    fn sync_data(&mut self) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

impl AppendFile for File {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        Write::write_all(self, buf)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}

/// Creates a new spool file for appending.
pub(crate) type Opener = Box<dyn Fn(&Path) -> io::Result<Box<dyn AppendFile>> + Send>;

pub(crate) fn file_opener() -> Opener {
    Box::new(|path| {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(path)?;
        Ok(Box::new(file))
    })
}

/// Opens and syncs a directory, so a file created in it survives a power loss.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct SpoolLimits {
    pub max_bytes: u64,
    pub file_max_bytes: u64,
    pub fsync: SpoolFsync,
}

const HEADER: u64 = 8;

struct SpoolFile {
    id: u64,
    path: PathBuf,
    /// End of the last whole frame this process wrote or found; reading never goes past it.
    size: u64,
}

pub(crate) struct Spool {
    dir: PathBuf,
    limits: SpoolLimits,
    /// Files oldest first; when `writer` is set, the last one is open for appending.
    files: VecDeque<SpoolFile>,
    writer: Option<Box<dyn AppendFile>>,
    opener: Opener,
    /// Bytes of the oldest file already acknowledged (or skipped as corrupt).
    read_offset: u64,
    next_id: u64,
    /// Furthest (file id, offset) whose frames were checked, so a corrupt frame read again
    /// (a batch replayed after a store failure) is reported once.
    checked: (u64, u64),
    /// Records dropped as corrupt, not yet taken by [`Spool::take_corrupt`].
    corrupt_records: u64,
    /// Bytes in spool files, published for readers that must not wait on the spool thread
    /// (the admission check on every request).
    disk_bytes: Arc<AtomicU64>,
}

/// Records read from one spool file, to acknowledge once the store confirmed them.
pub(crate) struct DiskBatch {
    pub records: Vec<RawRecord>,
    pub file: u64,
    /// Offset just past each record, to acknowledge a prefix.
    pub ends: Vec<u64>,
    /// Offset just past everything this read looked at (corrupt frames after the last record
    /// included), to acknowledge the whole batch.
    pub end: u64,
}

impl DiskBatch {
    /// Where the read position goes once the first `stored` records are confirmed.
    pub(crate) fn ack_offset(&self, stored: usize) -> Option<u64> {
        match stored {
            0 => None,
            n if n >= self.ends.len() => Some(self.end),
            n => self.ends.get(n - 1).copied(),
        }
    }
}

pub(crate) fn encode_frame(buf: &mut Vec<u8>, record: &RawRecord) -> Result<(), SpoolError> {
    encode_payload(buf, &serde_json::to_vec(record)?)
}

/// A frame around a record's JSON made already (`serde_json` of the record).
pub(crate) fn encode_payload(buf: &mut Vec<u8>, payload: &[u8]) -> Result<(), SpoolError> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "record over 4 GiB"))?;
    buf.reserve(8 + payload.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buf.extend_from_slice(payload);
    Ok(())
}

impl Spool {
    pub(crate) fn open(
        dir: &Path,
        limits: SpoolLimits,
        opener: Opener,
    ) -> Result<Self, SpoolError> {
        fs::create_dir_all(dir)?;
        let mut files: Vec<SpoolFile> = fs::read_dir(dir)?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let id = name.strip_suffix(".spool")?.parse::<u64>().ok()?;
                let size = e.metadata().ok()?.len();
                Some(SpoolFile {
                    id,
                    path: e.path(),
                    size,
                })
            })
            .collect();
        files.sort_by_key(|f| f.id);
        let next_id = files.last().map_or(0, |f| f.id + 1);
        let disk_bytes = Arc::new(AtomicU64::new(files.iter().map(|f| f.size).sum()));
        // Files from an earlier run are only read, never appended to: one of them may end in a
        // torn frame, and nothing must be written behind it.
        Ok(Spool {
            dir: dir.to_path_buf(),
            limits,
            files: files.into(),
            writer: None,
            opener,
            read_offset: 0,
            next_id,
            checked: (0, 0),
            corrupt_records: 0,
            disk_bytes,
        })
    }

    /// Takes files another writer left (the journal's, from an earlier run) into the spool,
    /// behind its own files: they are read, checked frame by frame and deleted once their
    /// records are acknowledged, like spool files, and never appended to. Only before the first
    /// append, while no file is open for appending.
    pub(crate) fn adopt(&mut self, paths: Vec<PathBuf>) -> Result<(), SpoolError> {
        if self.writer.is_some() {
            return Err(io::Error::other("files can only be adopted before appending").into());
        }
        for path in paths {
            let size = fs::metadata(&path)?.len();
            let id = self.next_id;
            self.next_id += 1;
            self.files.push_back(SpoolFile { id, path, size });
        }
        self.publish();
        Ok(())
    }

    /// Bytes not yet acknowledged.
    pub(crate) fn pending_bytes(&self) -> u64 {
        self.total_bytes().saturating_sub(self.read_offset)
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.pending_bytes() == 0
    }

    fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    pub(crate) fn max_bytes(&self) -> u64 {
        self.limits.max_bytes
    }

    /// A lock-free view of the bytes on disk.
    pub(crate) fn gauge(&self) -> Arc<AtomicU64> {
        self.disk_bytes.clone()
    }

    /// Records found corrupt since the last call.
    pub(crate) fn take_corrupt(&mut self) -> u64 {
        std::mem::take(&mut self.corrupt_records)
    }

    fn publish(&self) {
        self.disk_bytes.store(self.total_bytes(), Ordering::Relaxed);
    }

    /// Appends `records` as one write: all of them land, or none and the file is as before.
    pub(crate) fn append<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a RawRecord>,
    ) -> Result<(), SpoolError> {
        let mut buf = Vec::new();
        for r in records {
            encode_frame(&mut buf, r)?;
        }
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len() as u64;
        if self.total_bytes() + len > self.limits.max_bytes {
            return Err(SpoolError::Full {
                max_bytes: self.limits.max_bytes,
            });
        }
        let needs_new = match (self.writer.as_ref(), self.files.back()) {
            (Some(_), Some(last)) => last.size >= self.limits.file_max_bytes,
            _ => true,
        };
        if needs_new {
            self.start_file()?;
        }
        let sync = self.limits.fsync == SpoolFsync::Always;
        let (Some(w), Some(last)) = (self.writer.as_mut(), self.files.back()) else {
            return Err(io::Error::other("spool writer missing").into());
        };
        let good = last.size;
        if let Err(e) = w.write_all(&buf) {
            self.roll_back(good, false);
            return Err(e.into());
        }
        if sync && let Err(e) = w.sync_data() {
            // After a failed sync the kernel may have dropped pages it could not write, so what
            // the file holds is no longer known: roll back what we can and never append to it
            // again.
            self.roll_back(good, true);
            return Err(e.into());
        }
        if let Some(last) = self.files.back_mut() {
            last.size = good + len;
        }
        self.publish();
        Ok(())
    }

    /// Truncates the file being appended to back to `good` after a failed append; seals it
    /// (the next append starts a new file) if that fails or `seal` is asked for.
    fn roll_back(&mut self, good: u64, seal: bool) {
        let Some(w) = self.writer.as_mut() else {
            return;
        };
        match w.set_len(good) {
            Ok(()) if !seal => {}
            Ok(()) => self.writer = None,
            Err(e) => {
                // Its in-memory size stays at `good`, so this process never reads past it; after
                // a restart the partial frame at its end is skipped by the frame checks.
                tracing::warn!(error = %e, "Spool file could not be truncated after a failed write; sealing it.");
                self.writer = None;
            }
        }
    }

    fn start_file(&mut self) -> Result<(), SpoolError> {
        let id = self.next_id;
        self.next_id += 1;
        let path = self.dir.join(format!("{id:016}.spool"));
        // The old writer is dropped first: a file is appended to only while it is the newest.
        self.writer = None;
        let file = (self.opener)(&path)?;
        self.files.push_back(SpoolFile { id, path, size: 0 });
        if self.limits.fsync == SpoolFsync::Always {
            sync_dir(&self.dir)?;
        }
        self.writer = Some(file);
        Ok(())
    }

    /// Up to `max` records (and about `max_bytes` of payload, at least one record) from the
    /// oldest unacknowledged position, all from one file. Corrupt frames are skipped and
    /// reported on the way.
    pub(crate) fn read_batch(
        &mut self,
        max: usize,
        max_bytes: u64,
    ) -> Result<Option<DiskBatch>, SpoolError> {
        loop {
            let Some(first) = self.files.front() else {
                return Ok(None);
            };
            if self.read_offset >= first.size {
                if self.files.len() == 1 && self.writer.is_some() {
                    return Ok(None);
                }
                self.drop_oldest()?;
                continue;
            }
            let (id, path, size) = (first.id, first.path.clone(), first.size);
            let batch = self.scan(id, &path, size, max.max(1), max_bytes)?;
            if batch.records.is_empty() {
                // Only corrupt frames: nothing to hand out, so skipping them is settled here.
                self.read_offset = batch.end;
                continue;
            }
            return Ok(Some(batch));
        }
    }

    /// Reads frames of one file from the read position, one at a time, so a batch costs what
    /// it reads however large the file.
    fn scan(
        &mut self,
        id: u64,
        path: &Path,
        size: u64,
        max: usize,
        max_bytes: u64,
    ) -> Result<DiskBatch, SpoolError> {
        let mut file = File::open(path)?;
        file.seek(SeekFrom::Start(self.read_offset))?;
        let mut reader = BufReader::new(file.take(size - self.read_offset));
        let mut offset = self.read_offset;
        let mut records = Vec::new();
        let mut ends = Vec::new();
        let mut bytes = 0u64;
        while records.len() < max && (records.is_empty() || bytes < max_bytes) && offset < size {
            if size - offset < HEADER {
                self.report(
                    id,
                    path,
                    offset,
                    size,
                    "torn frame header at the end of the file",
                );
                offset = size;
                break;
            }
            let mut header = [0u8; HEADER as usize];
            if !read_full(&mut reader, &mut header)? {
                self.report(id, path, offset, size, "file shorter than recorded");
                offset = size;
                break;
            }
            let len = u64::from(u32::from_le_bytes([
                header[0], header[1], header[2], header[3],
            ]));
            let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            let start = offset + HEADER;
            // A torn length can claim anything: it ends the file, and nothing is allocated
            // past the file's end.
            if len > size - start {
                self.report(
                    id,
                    path,
                    offset,
                    size,
                    "frame runs past the end of the file",
                );
                offset = size;
                break;
            }
            let mut payload = vec![0u8; len as usize];
            if !read_full(&mut reader, &mut payload)? {
                self.report(id, path, offset, size, "file shorter than recorded");
                offset = size;
                break;
            }
            let next = start + len;
            if crc32fast::hash(&payload) != crc {
                self.report(id, path, offset, next, "checksum mismatch");
            } else {
                match serde_json::from_slice::<RawRecord>(&payload) {
                    Ok(r) => {
                        records.push(r);
                        ends.push(next);
                        bytes += len;
                    }
                    Err(_) => self.report(id, path, offset, next, "payload is not a record"),
                }
            }
            offset = next;
        }
        self.checked = self.checked.max((id, offset));
        Ok(DiskBatch {
            records,
            file: id,
            ends,
            end: offset,
        })
    }

    /// A corrupt frame (or torn tail) at `offset`; reported once per process.
    fn report(&mut self, id: u64, path: &Path, offset: u64, skipped_to: u64, why: &str) {
        if (id, offset) < self.checked {
            return;
        }
        self.checked = (id, skipped_to);
        self.corrupt_records += 1;
        tracing::error!(
            file = %path.display(),
            offset,
            skipped_bytes = skipped_to - offset,
            reason = why,
            "Spooled record is corrupt and was dropped."
        );
    }

    /// Marks the records of file `file` up to `end` as stored; a fully consumed file is
    /// deleted.
    pub(crate) fn ack(&mut self, file: u64, end: u64) -> Result<(), SpoolError> {
        if self.files.front().map(|f| f.id) != Some(file) {
            return Ok(());
        }
        self.read_offset = self.read_offset.max(end);
        let done = self
            .files
            .front()
            .is_some_and(|f| self.read_offset >= f.size);
        if done {
            self.drop_oldest()?;
        }
        Ok(())
    }

    fn drop_oldest(&mut self) -> Result<(), SpoolError> {
        self.read_offset = 0;
        if let Some(f) = self.files.pop_front() {
            if self.files.is_empty() {
                self.writer = None;
            }
            self.publish();
            match fs::remove_file(&f.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// `read_exact`, but a file that ends early is `Ok(false)` (a torn tail), not an error.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<bool, SpoolError> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::process::Command;
    use std::sync::Mutex;

    use proptest::prelude::*;
    use tollgate_store::conformance::{sample_chunk, sample_request};

    use super::*;

    pub(crate) fn limits(max_bytes: u64, file_max_bytes: u64) -> SpoolLimits {
        SpoolLimits {
            max_bytes,
            file_max_bytes,
            fsync: SpoolFsync::Never,
        }
    }

    fn open(dir: &Path, max_bytes: u64, file_max_bytes: u64) -> Spool {
        Spool::open(dir, limits(max_bytes, file_max_bytes), file_opener()).unwrap()
    }

    pub(crate) fn drain(spool: &mut Spool) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(b) = spool.read_batch(3, u64::MAX).unwrap() {
            out.extend(b.records.iter().map(RawRecord::id));
            spool.ack(b.file, b.end).unwrap();
        }
        out
    }

    fn spool_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "spool"))
            .collect();
        files.sort();
        files
    }

    /// A file whose writes fail part-way while `budget` (bytes it will still take) runs out:
    /// the bytes up to the budget really reach the file, then the write fails as on a full
    /// disk.
    pub(crate) struct ShortWrites {
        file: File,
        budget: Arc<Mutex<Option<u64>>>,
        pub(crate) syncs: Arc<AtomicU64>,
    }

    impl AppendFile for ShortWrites {
        fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
            let mut budget = self.budget.lock().unwrap();
            match *budget {
                Some(left) if (left as usize) < buf.len() => {
                    Write::write_all(&mut self.file, &buf[..left as usize])?;
                    *budget = Some(0);
                    Err(io::Error::new(
                        io::ErrorKind::StorageFull,
                        "no space left (test)",
                    ))
                }
                Some(left) => {
                    *budget = Some(left - buf.len() as u64);
                    Write::write_all(&mut self.file, buf)
                }
                None => Write::write_all(&mut self.file, buf),
            }
        }

        fn sync_data(&mut self) -> io::Result<()> {
            self.syncs.fetch_add(1, Ordering::Relaxed);
            self.file.sync_data()
        }

        fn set_len(&mut self, len: u64) -> io::Result<()> {
            self.file.set_len(len)
        }
    }

    /// A gate a test opens; until then writes to files from [`gated_opener`] wait.
    pub(crate) type Gate = Arc<(Mutex<bool>, std::sync::Condvar)>;

    pub(crate) fn gate() -> Gate {
        Arc::new((Mutex::new(false), std::sync::Condvar::new()))
    }

    pub(crate) fn open_gate(gate: &Gate) {
        let (open, cvar) = &**gate;
        *open.lock().unwrap() = true;
        cvar.notify_all();
    }

    /// A file whose writes (each first signalled on `entered`) wait until the gate opens: a
    /// disk that stopped answering, or a journal that has not written yet.
    struct Gated {
        file: File,
        entered: Option<std::sync::mpsc::Sender<()>>,
        gate: Gate,
    }

    impl AppendFile for Gated {
        fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
            if let Some(entered) = &self.entered {
                let _ = entered.send(());
            }
            let (open, cvar) = &*self.gate;
            let mut open = open.lock().unwrap();
            while !*open {
                open = cvar.wait(open).unwrap();
            }
            Write::write_all(&mut self.file, buf)
        }

        fn sync_data(&mut self) -> io::Result<()> {
            self.file.sync_data()
        }

        fn set_len(&mut self, len: u64) -> io::Result<()> {
            self.file.set_len(len)
        }
    }

    /// An opener of [`Gated`] files.
    pub(crate) fn gated_opener(
        gate: &Gate,
        entered: Option<std::sync::mpsc::Sender<()>>,
    ) -> Opener {
        let gate = gate.clone();
        let entered = Mutex::new(entered);
        Box::new(move |path| {
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(path)?;
            Ok(Box::new(Gated {
                file,
                entered: entered.lock().unwrap().clone(),
                gate: gate.clone(),
            }))
        })
    }

    /// An opener whose files share one write budget (`None`: unlimited).
    pub(crate) fn short_opener(budget: Arc<Mutex<Option<u64>>>, syncs: Arc<AtomicU64>) -> Opener {
        Box::new(move |path| {
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(path)?;
            Ok(Box::new(ShortWrites {
                file,
                budget: budget.clone(),
                syncs: syncs.clone(),
            }))
        })
    }

    #[test]
    fn records_come_back_in_order_across_files_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open(dir.path(), 1 << 20, 300);
        let recs: Vec<RawRecord> = (0..10).map(|i| sample_request(&format!("r{i}"))).collect();
        for r in &recs[..6] {
            spool.append([r]).unwrap();
        }
        drop(spool);
        let mut spool = open(dir.path(), 1 << 20, 300);
        spool.append(&recs[6..]).unwrap();
        let ids = drain(&mut spool);
        assert_eq!(ids, recs.iter().map(RawRecord::id).collect::<Vec<_>>());
        assert!(spool.is_empty());
        spool.append(&recs[..1]).unwrap();
        assert_eq!(drain(&mut spool), vec!["r0:0"]);
    }

    #[test]
    fn unacked_records_are_read_again_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open(dir.path(), 1 << 20, 1 << 20);
        spool
            .append(&[sample_request("a"), sample_request("b")])
            .unwrap();
        let b = spool.read_batch(10, u64::MAX).unwrap().unwrap();
        assert_eq!(b.records.len(), 2);
        drop(spool);
        let mut spool = open(dir.path(), 1 << 20, 1 << 20);
        assert_eq!(drain(&mut spool), vec!["a:0", "b:0"]);
    }

    #[test]
    fn a_partly_acknowledged_batch_resumes_after_the_last_stored_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open(dir.path(), 1 << 20, 1 << 20);
        let recs: Vec<RawRecord> = (0..4).map(|i| sample_request(&format!("p{i}"))).collect();
        spool.append(&recs).unwrap();
        let b = spool.read_batch(10, u64::MAX).unwrap().unwrap();
        assert_eq!(b.records.len(), 4);
        spool.ack(b.file, b.ack_offset(2).unwrap()).unwrap();
        assert_eq!(drain(&mut spool), vec!["p2:0", "p3:0"]);
    }

    #[test]
    fn a_batch_stops_at_its_byte_budget_but_holds_at_least_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open(dir.path(), 1 << 20, 1 << 20);
        let recs: Vec<RawRecord> = (0..4).map(|i| sample_request(&format!("m{i}"))).collect();
        spool.append(&recs).unwrap();
        let b = spool.read_batch(10, 1).unwrap().unwrap();
        assert_eq!(b.records.len(), 1, "over budget after one record");
    }

    #[test]
    fn a_torn_tail_ends_the_file_and_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open(dir.path(), 1 << 20, 1 << 20);
        spool.append(&[sample_request("a")]).unwrap();
        drop(spool);
        let path = spool_files(dir.path()).remove(0);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        Write::write_all(&mut f, &[200, 0, 0, 0, 1, 2, 3, 4, b'{']).unwrap();
        let mut spool = open(dir.path(), 1 << 20, 1 << 20);
        let b = spool.read_batch(10, u64::MAX).unwrap().unwrap();
        assert_eq!(b.records.len(), 1);
        // Not acknowledged: read again, the torn tail is not reported twice.
        let b = spool.read_batch(10, u64::MAX).unwrap().unwrap();
        spool.ack(b.file, b.end).unwrap();
        assert_eq!(spool.take_corrupt(), 1);
        assert!(spool.read_batch(10, u64::MAX).unwrap().is_none());
        assert!(
            spool_files(dir.path()).is_empty(),
            "the consumed file is deleted"
        );
    }

    #[test]
    fn a_corrupt_frame_is_skipped_alone_and_reading_resumes_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open(dir.path(), 1 << 20, 1 << 20);
        let recs: Vec<RawRecord> = (0..5).map(|i| sample_request(&format!("c{i}"))).collect();
        for r in &recs {
            spool.append([r]).unwrap();
        }
        drop(spool);
        // Flip one payload byte of the second frame and of the last: their lengths still fit.
        let path = spool_files(dir.path()).remove(0);
        let mut bytes = fs::read(&path).unwrap();
        let frame = |i: usize| {
            let mut at = 0usize;
            for _ in 0..i {
                let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
                at += 8 + len;
            }
            at
        };
        let (second, last) = (frame(1), frame(4));
        bytes[second + 12] ^= 0xff;
        bytes[last + 12] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let mut spool = open(dir.path(), 1 << 20, 1 << 20);
        assert_eq!(drain(&mut spool), vec!["c0:0", "c2:0", "c3:0"]);
        assert_eq!(spool.take_corrupt(), 2);
    }

    #[test]
    fn a_file_of_only_corrupt_frames_is_skipped_and_the_next_file_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open(dir.path(), 1 << 20, 1);
        spool.append(&[sample_request("x")]).unwrap();
        spool.append(&[sample_request("y")]).unwrap();
        drop(spool);
        let first = spool_files(dir.path()).remove(0);
        let mut bytes = fs::read(&first).unwrap();
        bytes[4] ^= 0xff;
        fs::write(&first, &bytes).unwrap();
        let mut spool = open(dir.path(), 1 << 20, 1);
        assert_eq!(drain(&mut spool), vec!["y:0"]);
        assert_eq!(spool.take_corrupt(), 1);
    }

    /// Defect: a `write_all` that failed part-way left the file longer than the spool believed,
    /// so every later record in that file was read at the wrong offset and skipped as a torn
    /// tail.
    #[test]
    fn a_short_spool_write_loses_nothing_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let budget = Arc::new(Mutex::new(None));
        let opener = short_opener(budget.clone(), Arc::new(AtomicU64::new(0)));
        let mut spool = Spool::open(dir.path(), limits(1 << 20, 1 << 20), opener).unwrap();
        spool.append(&[sample_request("before")]).unwrap();
        // The next write gets 11 bytes onto the disk, then the disk is full.
        *budget.lock().unwrap() = Some(11);
        let failed = spool.append(&[sample_request("lost1"), sample_request("lost2")]);
        assert!(matches!(failed, Err(SpoolError::Io(_))), "{failed:?}");
        *budget.lock().unwrap() = None;
        let after: Vec<RawRecord> = (0..5)
            .map(|i| sample_request(&format!("after{i}")))
            .collect();
        for r in &after {
            spool.append([r]).unwrap();
        }
        let mut expected = vec!["before:0".to_owned()];
        expected.extend(after.iter().map(RawRecord::id));
        assert_eq!(drain(&mut spool), expected, "read back in this process");
        assert_eq!(spool.take_corrupt(), 0, "the failed append left no garbage");
    }

    #[test]
    fn a_short_write_survives_a_restart_before_replay() {
        let dir = tempfile::tempdir().unwrap();
        let budget = Arc::new(Mutex::new(None));
        let opener = short_opener(budget.clone(), Arc::new(AtomicU64::new(0)));
        let mut spool = Spool::open(dir.path(), limits(1 << 20, 1 << 20), opener).unwrap();
        spool.append(&[sample_request("a")]).unwrap();
        *budget.lock().unwrap() = Some(5);
        assert!(spool.append(&[sample_request("lost")]).is_err());
        *budget.lock().unwrap() = None;
        spool.append(&[sample_request("b")]).unwrap();
        drop(spool);
        let mut spool = open(dir.path(), 1 << 20, 1 << 20);
        assert_eq!(drain(&mut spool), vec!["a:0", "b:0"]);
        assert_eq!(spool.take_corrupt(), 0);
    }

    #[test]
    fn fsync_always_syncs_every_append() {
        let dir = tempfile::tempdir().unwrap();
        let syncs = Arc::new(AtomicU64::new(0));
        let opener = short_opener(Arc::new(Mutex::new(None)), syncs.clone());
        let limits = SpoolLimits {
            fsync: SpoolFsync::Always,
            ..limits(1 << 20, 1 << 20)
        };
        let mut spool = Spool::open(dir.path(), limits, opener).unwrap();
        spool.append(&[sample_request("a")]).unwrap();
        spool
            .append(&[sample_request("b"), sample_request("c")])
            .unwrap();
        assert_eq!(syncs.load(Ordering::Relaxed), 2);
        assert_eq!(drain(&mut spool), vec!["a:0", "b:0", "c:0"]);
    }

    #[test]
    fn full_spool_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open(dir.path(), 400, 400);
        let gauge = spool.gauge();
        assert_eq!(gauge.load(Ordering::Relaxed), 0);
        spool.append(&[sample_request("a")]).unwrap();
        assert!(
            gauge.load(Ordering::Relaxed) > 0,
            "the gauge follows appends"
        );
        assert!(matches!(
            spool.append(&[sample_request("b")]),
            Err(SpoolError::Full { .. })
        ));
    }

    /// A tiny tmpfs, mounted for one test; unmounted on drop.
    struct SmallFs {
        dir: tempfile::TempDir,
    }

    impl SmallFs {
        /// `None` where mounting is not allowed (not root, no tmpfs): the seam-based test above
        /// covers the behaviour there.
        fn mount(kib: u32) -> Option<SmallFs> {
            let dir = tempfile::tempdir().ok()?;
            let status = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
                .arg(dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .ok()?;
            status.success().then_some(SmallFs { dir })
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.dir.path()).status();
        }
    }

    /// The same defect on a real full filesystem, where the kernel itself writes part of a
    /// frame before reporting "no space left".
    #[test]
    fn a_full_filesystem_loses_nothing_after_it() {
        let Some(fs) = SmallFs::mount(256) else {
            return;
        };
        let spool_dir = fs.path().join("spool");
        let mut spool = open(&spool_dir, 1 << 30, 1 << 30);
        // Leave two pages free: the first record fits, the second is cut short by the kernel.
        let filler = fs.path().join("filler");
        fs::write(&filler, vec![0u8; 248 * 1024]).unwrap();
        let body = "y".repeat(6000);
        let mut appended = Vec::new();
        let mut failures = 0;
        for i in 0..20 {
            if i == 10 {
                // Free the disk: later appends must land and be read back.
                fs::remove_file(&filler).unwrap();
            }
            let r = sample_chunk(&format!("f{i}"), 1, &body);
            match spool.append([&r]) {
                Ok(()) => appended.push(r.id()),
                Err(_) if i < 10 => failures += 1,
                Err(e) => panic!("append {i} failed with room on the disk: {e}"),
            }
        }
        assert!(failures > 0, "the filesystem filled up");
        assert!(appended.len() > 10, "appends resumed once there was room");
        assert_eq!(drain(&mut spool), appended);
        assert_eq!(spool.take_corrupt(), 0);
    }

    proptest! {
        #[test]
        fn round_trip_any_interleaving(ops in proptest::collection::vec(0u8..4, 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let budget = Arc::new(Mutex::new(None));
            let opener = short_opener(budget.clone(), Arc::new(AtomicU64::new(0)));
            let mut spool = Spool::open(dir.path(), limits(1 << 24, 512), opener).unwrap();
            let mut written = Vec::new();
            let mut read = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                let r = sample_chunk(&format!("r{i}"), 1, &"x".repeat(i * 7));
                match op {
                    0 | 1 => {
                        written.push(r.id());
                        spool.append([&r]).unwrap();
                    }
                    2 => {
                        // A write cut short: nothing of it may come back, nothing after it lost.
                        *budget.lock().unwrap() = Some(i as u64 * 3);
                        let ok = spool.append([&r]).is_ok();
                        *budget.lock().unwrap() = None;
                        if ok {
                            written.push(r.id());
                        }
                    }
                    _ => {
                        if let Some(b) = spool.read_batch(2, u64::MAX).unwrap() {
                            read.extend(b.records.iter().map(RawRecord::id));
                            spool.ack(b.file, b.end).unwrap();
                        }
                    }
                }
            }
            read.extend(drain(&mut spool));
            prop_assert_eq!(read, written);
            prop_assert_eq!(spool.take_corrupt(), 0);
        }
    }
}
