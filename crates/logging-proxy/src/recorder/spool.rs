//! The on-disk spool: where raw records wait when the in-memory queue is full or the store
//! fails, until the writer replays them.
//!
//! Invariants:
//! - records are appended to numbered files (`{id:016}.spool`) and read back in append order;
//! - each record is framed as `[len: u32 LE][crc32: u32 LE][len bytes of JSON]`; a frame whose
//!   length runs past the end of the file or whose checksum does not match ends that file (the
//!   tail of a crash mid-write) and is reported, never replayed half-written;
//! - a file is deleted only after every record in it was acknowledged by the store, so a crash
//!   replays at most some records again, which the store ignores by record id;
//! - the total size is capped: `append` fails with `SpoolError::Full` instead of growing
//!   without bound, and the proxy then refuses new requests.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tollgate_records::RawRecord;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SpoolError {
    #[error("spool is full ({max_bytes} bytes)")]
    Full { max_bytes: u64 },
    #[error("spool I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("record could not be serialised: {0}")]
    Encode(#[from] serde_json::Error),
}

const HEADER: usize = 8;

struct SpoolFile {
    id: u64,
    path: PathBuf,
    size: u64,
}

pub(crate) struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    file_max_bytes: u64,
    /// Files oldest first; the last one is open for appending.
    files: VecDeque<SpoolFile>,
    writer: Option<File>,
    /// Bytes of the oldest file already acknowledged.
    read_offset: u64,
    next_id: u64,
    /// Records dropped as corrupt while reading (crash tails).
    pub(crate) corrupt_records: u64,
    /// Bytes in spool files, published for readers that must not take the spool's lock
    /// (the admission check on every request).
    disk_bytes: Arc<AtomicU64>,
}

/// Records read from the spool, to acknowledge after the store confirmed them.
pub(crate) struct SpoolBatch {
    pub records: Vec<RawRecord>,
    /// File id and offset just past the last record of the batch.
    end: (u64, u64),
}

impl Spool {
    pub(crate) fn open(
        dir: &Path,
        max_bytes: u64,
        file_max_bytes: u64,
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
        Ok(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            file_max_bytes,
            files: files.into(),
            writer: None,
            read_offset: 0,
            next_id,
            corrupt_records: 0,
            disk_bytes,
        })
    }

    /// Bytes not yet acknowledged.
    pub(crate) fn pending_bytes(&self) -> u64 {
        self.files
            .iter()
            .map(|f| f.size)
            .sum::<u64>()
            .saturating_sub(self.read_offset)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending_bytes() == 0
    }

    /// A lock-free view of the bytes on disk and the cap.
    pub(crate) fn gauge(&self) -> (Arc<AtomicU64>, u64) {
        (self.disk_bytes.clone(), self.max_bytes)
    }

    fn publish(&self) {
        let total = self.files.iter().map(|f| f.size).sum();
        self.disk_bytes.store(total, Ordering::Relaxed);
    }

    pub(crate) fn append(&mut self, records: &[RawRecord]) -> Result<(), SpoolError> {
        let mut buf = Vec::new();
        for r in records {
            let payload = serde_json::to_vec(r)?;
            let len = u32::try_from(payload.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "record over 4 GiB"))?;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
        }
        let total: u64 = self.files.iter().map(|f| f.size).sum();
        if total + buf.len() as u64 > self.max_bytes {
            return Err(SpoolError::Full {
                max_bytes: self.max_bytes,
            });
        }
        let needs_new = match (self.writer.as_ref(), self.files.back()) {
            (Some(_), Some(last)) => last.size >= self.file_max_bytes,
            _ => true,
        };
        if needs_new {
            let id = self.next_id;
            self.next_id += 1;
            let path = self.dir.join(format!("{id:016}.spool"));
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)?;
            self.writer = Some(file);
            self.files.push_back(SpoolFile { id, path, size: 0 });
        }
        let (Some(w), Some(last)) = (self.writer.as_mut(), self.files.back_mut()) else {
            return Err(io::Error::other("spool writer missing").into());
        };
        w.write_all(&buf)?;
        last.size += buf.len() as u64;
        self.publish();
        Ok(())
    }

    /// Up to `max` records from the oldest unacknowledged position.
    pub(crate) fn read_batch(&mut self, max: usize) -> Result<Option<SpoolBatch>, SpoolError> {
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
            // Read from the first unacknowledged record, one frame at a time, so a batch costs
            // what it reads, however large the file.
            let mut file = File::open(&path)?;
            file.seek(SeekFrom::Start(self.read_offset))?;
            let mut reader = BufReader::new(file.take(size - self.read_offset));
            let mut offset = self.read_offset as usize;
            let mut records = Vec::new();
            while records.len() < max && offset + HEADER <= size as usize {
                let mut header = [0u8; HEADER];
                reader.read_exact(&mut header)?;
                let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
                let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
                // A torn length can claim anything; never allocate past the file's end.
                let start = offset + HEADER;
                if start + len > size as usize {
                    break;
                }
                let mut payload = vec![0u8; len];
                reader.read_exact(&mut payload)?;
                if crc32fast::hash(&payload) != crc {
                    break;
                }
                match serde_json::from_slice::<RawRecord>(&payload) {
                    Ok(r) => records.push(r),
                    Err(_) => self.corrupt_records += 1,
                }
                offset = start + len;
            }
            if records.is_empty() && offset == self.read_offset as usize {
                // The rest of this file is a torn or corrupt tail: skip it.
                self.corrupt_records += 1;
                if let Some(f) = self.files.front_mut() {
                    f.size = offset as u64;
                }
                self.publish();
                continue;
            }
            return Ok(Some(SpoolBatch {
                records,
                end: (id, offset as u64),
            }));
        }
    }

    /// Marks a batch as stored; fully consumed files are deleted.
    pub(crate) fn ack(&mut self, batch: &SpoolBatch) -> Result<(), SpoolError> {
        let (id, end) = batch.end;
        if self.files.front().map(|f| f.id) != Some(id) {
            return Ok(());
        }
        self.read_offset = end;
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
        if let Some(f) = self.files.pop_front() {
            if self.files.is_empty() {
                self.writer = None;
            }
            match fs::remove_file(&f.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.read_offset = 0;
        self.publish();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tollgate_store::conformance::{sample_chunk, sample_request};

    use super::*;

    fn drain(spool: &mut Spool) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(b) = spool.read_batch(3).unwrap() {
            out.extend(b.records.iter().map(RawRecord::id));
            spool.ack(&b).unwrap();
        }
        out
    }

    #[test]
    fn records_come_back_in_order_across_files_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20, 300).unwrap();
        let recs: Vec<RawRecord> = (0..10).map(|i| sample_request(&format!("r{i}"))).collect();
        for r in &recs[..6] {
            spool.append(std::slice::from_ref(r)).unwrap();
        }
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20, 300).unwrap();
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
        let mut spool = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        spool
            .append(&[sample_request("a"), sample_request("b")])
            .unwrap();
        let b = spool.read_batch(10).unwrap().unwrap();
        assert_eq!(b.records.len(), 2);
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!(drain(&mut spool), vec!["a:0", "b:0"]);
    }

    #[test]
    fn torn_tail_is_skipped_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        spool.append(&[sample_request("a")]).unwrap();
        drop(spool);
        let path = fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, b'{']).unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!(drain(&mut spool), vec!["a:0"]);
        assert_eq!(spool.corrupt_records, 1);
    }

    #[test]
    fn full_spool_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 400, 400).unwrap();
        let (gauge, max) = spool.gauge();
        assert_eq!((gauge.load(Ordering::Relaxed), max), (0, 400));
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

    proptest! {
        #[test]
        fn round_trip_any_interleaving(ops in proptest::collection::vec(0u8..3, 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut spool = Spool::open(dir.path(), 1 << 24, 512).unwrap();
            let mut written = Vec::new();
            let mut read = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                match op {
                    0 | 1 => {
                        let r = sample_chunk(&format!("r{i}"), 1, &"x".repeat(i * 7));
                        written.push(r.id());
                        spool.append(&[r]).unwrap();
                    }
                    _ => {
                        if let Some(b) = spool.read_batch(2).unwrap() {
                            read.extend(b.records.iter().map(RawRecord::id));
                            spool.ack(&b).unwrap();
                        }
                    }
                }
            }
            read.extend(drain(&mut spool));
            prop_assert_eq!(read, written);
        }
    }
}
