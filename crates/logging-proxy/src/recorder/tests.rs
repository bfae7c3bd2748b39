//! The recorder against fake stores: rejections, outages, the byte budget, a blocked disk.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use async_trait::async_trait;
use tollgate_store::StoreError;
use tollgate_store::conformance::{sample_chunk, sample_request};

use super::spool::tests::{Gate, gate, gated_opener, open_gate};
use super::*;

/// A store that keeps what it is given, and fails on demand: `outage` fails every append
/// transiently; a batch holding a `rejected` id is refused for good, naming the record (or,
/// with `anonymous` rejections, without saying which).
#[derive(Default)]
struct FakeStore {
    stored: Mutex<Vec<RawRecord>>,
    rejected: Mutex<HashSet<String>>,
    anonymous: AtomicBool,
    outage: AtomicBool,
    /// While a test holds this lock, appends wait.
    stall: tokio::sync::Mutex<()>,
    appended: Notify,
    /// For each record appended with its JSON made already: whether that JSON is the
    /// record's own.
    made: Mutex<Vec<bool>>,
}

#[async_trait]
impl RawWriter for FakeStore {
    async fn append(&self, batch: &[RawRecord]) -> Result<(), StoreError> {
        let _stalled = self.stall.lock().await;
        if self.outage.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        let rejected = self.rejected.lock().unwrap().clone();
        if let Some(bad) = batch.iter().find(|r| rejected.contains(&r.id())) {
            return Err(if self.anonymous.load(Ordering::SeqCst) {
                StoreError::Rejected {
                    id: String::new(),
                    detail: "one of these documents is malformed".into(),
                }
            } else {
                StoreError::Rejected {
                    id: bad.id(),
                    detail: "document too large".into(),
                }
            });
        }
        self.stored.lock().unwrap().extend_from_slice(batch);
        self.appended.notify_waiters();
        Ok(())
    }

    async fn append_encoded(
        &self,
        batch: &[RawRecord],
        json: &[Option<Arc<str>>],
    ) -> Result<(), StoreError> {
        let checks: Vec<bool> = batch
            .iter()
            .zip(json)
            .filter_map(|(r, j)| {
                j.as_ref()
                    .map(|j| **j == *serde_json::to_string(r).unwrap())
            })
            .collect();
        self.made.lock().unwrap().extend(checks);
        self.append(batch).await
    }
}

impl FakeStore {
    fn ids(&self) -> Vec<String> {
        self.stored
            .lock()
            .unwrap()
            .iter()
            .map(RawRecord::id)
            .collect()
    }

    fn reject(&self, id: &str) {
        self.rejected.lock().unwrap().insert(id.to_owned());
    }
}

fn settings(dir: &Path) -> RecorderSettings {
    // Replays happen on `flush`, so tests decide when.
    test_settings(dir)
}

struct Rig {
    recorder: Recorder,
    store: Arc<FakeStore>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    dir: tempfile::TempDir,
}

fn rig(tweak: impl FnOnce(&mut RecorderSettings)) -> Rig {
    rig_with(tweak, spool::file_opener())
}

fn rig_with(tweak: impl FnOnce(&mut RecorderSettings), opener: Opener) -> Rig {
    rig_in(tempfile::tempdir().unwrap(), tweak, opener)
}

/// A recorder on `dir`, as a process starting on what an earlier one left there.
fn rig_in(
    dir: tempfile::TempDir,
    tweak: impl FnOnce(&mut RecorderSettings),
    opener: Opener,
) -> Rig {
    let mut s = settings(dir.path());
    tweak(&mut s);
    let store = Arc::new(FakeStore::default());
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let recorder = Recorder::start_with(
        s,
        store.clone(),
        &tracker,
        cancel.clone(),
        opener,
        spool::file_opener(),
    )
    .unwrap();
    Rig {
        recorder,
        store,
        tracker,
        cancel,
        dir,
    }
}

impl Rig {
    fn record_all(&self, ids: &[String]) {
        for id in ids {
            self.recorder.try_record(sample_request(id)).unwrap();
        }
    }

    fn dead_letters(&self) -> Vec<serde_json::Value> {
        let path = self.dir.path().join(DeadLetters::FILE_NAME);
        match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("{e}"),
        }
    }

    async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn ids(names: &[String]) -> Vec<String> {
    names.iter().map(|n| format!("{n}:0")).collect()
}

fn stat(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Defect: a batch the store refused for good was spooled and replayed for ever, and every
/// record behind it waited with it.
#[tokio::test]
async fn a_record_the_store_rejects_for_good_is_dead_lettered_and_the_rest_written() {
    let rig = rig(|_| {});
    let all = names("r", 10);
    rig.store.reject("r4:0");
    rig.record_all(&all);
    rig.recorder.flush().await;

    let mut expected = ids(&all);
    expected.remove(4);
    assert_eq!(rig.store.ids(), expected, "the rest written, in order");
    let dead = rig.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["id"], "r4:0");
    assert!(
        dead[0]["error"]
            .as_str()
            .unwrap()
            .contains("document too large")
    );
    let record: RawRecord = serde_json::from_value(dead[0]["record"].clone()).unwrap();
    assert_eq!((record.id(), record.kind()), ("r4:0".to_owned(), "request"));
    assert_eq!(stat(&rig.recorder.stats().dead_lettered), 1);
    assert_eq!(rig.recorder.spooled_bytes(), 0, "nothing left waiting");

    // And the recorder carries on.
    rig.record_all(&names("later", 2));
    rig.recorder.flush().await;
    assert_eq!(rig.store.ids().len(), 11);
    rig.shutdown().await;
}

#[tokio::test]
async fn a_rejection_that_names_no_record_is_bisected_to_the_refused_ones() {
    let rig = rig(|_| {});
    rig.store.anonymous.store(true, Ordering::SeqCst);
    let all = names("b", 13);
    rig.store.reject("b2:0");
    rig.store.reject("b11:0");
    rig.record_all(&all);
    rig.recorder.flush().await;

    let expected: Vec<String> = ids(&all)
        .into_iter()
        .filter(|id| id != "b2:0" && id != "b11:0")
        .collect();
    assert_eq!(rig.store.ids(), expected);
    let dead: Vec<_> = rig.dead_letters().iter().map(|d| d["id"].clone()).collect();
    assert_eq!(dead, vec!["b2:0", "b11:0"]);
    assert_eq!(stat(&rig.recorder.stats().dead_lettered), 2);
    rig.shutdown().await;
}

#[tokio::test]
async fn a_rejected_record_in_the_spool_does_not_block_its_replay() {
    let rig = rig(|_| {});
    rig.store.outage.store(true, Ordering::SeqCst);
    let all = names("s", 8);
    rig.record_all(&all);
    rig.recorder.flush().await;
    assert!(rig.store.ids().is_empty());
    assert!(
        rig.recorder.spooled_bytes() > 0,
        "spooled during the outage"
    );

    rig.store.outage.store(false, Ordering::SeqCst);
    rig.store.reject("s3:0");
    rig.recorder.flush().await;
    let mut expected = ids(&all);
    expected.remove(3);
    assert_eq!(rig.store.ids(), expected);
    assert_eq!(rig.dead_letters().len(), 1);
    assert_eq!(rig.recorder.spooled_bytes(), 0);
    rig.shutdown().await;
}

#[tokio::test]
async fn a_transient_failure_spools_and_retries_without_dead_lettering() {
    let rig = rig(|_| {});
    rig.store.outage.store(true, Ordering::SeqCst);
    let all = names("t", 6);
    rig.record_all(&all);
    rig.recorder.flush().await;
    // Replayed again on this flush, and still failing: waits, not set aside.
    rig.recorder.flush().await;
    assert!(rig.store.ids().is_empty());
    assert!(rig.recorder.spooled_bytes() > 0);
    assert!(stat(&rig.recorder.stats().store_errors) >= 2);

    rig.store.outage.store(false, Ordering::SeqCst);
    rig.recorder.flush().await;
    assert_eq!(rig.store.ids(), ids(&all));
    assert_eq!(stat(&rig.recorder.stats().dead_lettered), 0);
    assert!(rig.dead_letters().is_empty());
    assert_eq!(rig.recorder.spooled_bytes(), 0);
    rig.shutdown().await;
}

#[tokio::test]
async fn a_rejected_record_that_cannot_be_dead_lettered_is_kept_not_dropped() {
    let rig = rig(|s| s.dead_letter_max_bytes = 10);
    let all = names("k", 4);
    rig.store.reject("k1:0");
    rig.record_all(&all);
    rig.recorder.flush().await;
    assert_eq!(
        rig.store.ids(),
        vec!["k0:0"],
        "stops at the record it must keep"
    );
    assert!(
        rig.recorder.spooled_bytes() > 0,
        "the rest waits in the spool"
    );
    assert_eq!(stat(&rig.recorder.stats().dead_lettered), 0);

    // Once the store takes it (say, after an upgrade), nothing was lost.
    rig.store.rejected.lock().unwrap().clear();
    rig.recorder.flush().await;
    assert_eq!(rig.store.ids(), ids(&all));
    rig.shutdown().await;
}

/// Defect: the queue was bounded by record count only, so 16,384 records of up to 32 MiB each
/// could sit in memory.
#[tokio::test]
async fn records_over_the_queue_byte_budget_go_to_the_spool() {
    // A queued record counts its estimated size and the JSON made for it (held until stored).
    let sample = sample_request("q0");
    let one = estimated_size(&sample) + serde_json::to_string(&sample).unwrap().len() as u64;
    let rig = rig(|s| s.queue_max_bytes = 4 * one + one / 2);
    let all = names("q", 20);
    // On this single-threaded runtime the writer does not run until the test awaits, so
    // everything offered now is in the queue or the spool.
    rig.record_all(&all);
    assert!(rig.recorder.queued_bytes() <= 4 * one + one / 2);
    assert_eq!(stat(&rig.recorder.stats().spooled), 16);
    assert_eq!(stat(&rig.recorder.stats().enqueued), 20);

    rig.recorder.flush().await;
    let mut stored = rig.store.ids();
    stored.sort();
    let mut expected = ids(&all);
    expected.sort();
    assert_eq!(stored, expected, "every record written");
    assert_eq!(rig.recorder.queued_bytes(), 0, "the budget is given back");
    rig.shutdown().await;
}

#[tokio::test]
async fn a_record_larger_than_the_whole_budget_is_spooled_and_replayed_without_a_flush() {
    let rig = rig(|s| {
        s.queue_max_bytes = 1024;
        // Replays are driven by the spool thread's wake-up, not by a retry timer.
        s.retry_interval = Duration::ZERO;
    });
    let big = sample_chunk("big", 1, &"z".repeat(4096));
    let stored = rig.store.appended.notified();
    rig.recorder.try_record(big).unwrap();
    assert_eq!(stat(&rig.recorder.stats().spooled), 1);
    tokio::time::timeout(Duration::from_secs(30), stored)
        .await
        .expect("replayed without queue activity or a flush");
    assert_eq!(rig.store.ids(), vec!["big:1"]);
    rig.shutdown().await;
}

/// Defect: a full queue made `try_record` append to the spool file itself, inside the
/// response body's `poll_next`, so a slow disk stalled an async worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_record_never_waits_on_the_disk() {
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let released = gate();
    let rig = rig_with(
        |s| s.queue_capacity = 1,
        gated_opener(&released, Some(entered_tx)),
    );
    let stall = rig.store.stall.lock().await;
    let all = names("h", 6);
    // From a plain thread, so a hand-over that blocked on the disk would show as a timeout
    // here rather than hang the test.
    let recorder = rig.recorder.clone();
    let offered = all.clone();
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for id in &offered {
            if recorder.try_record(sample_request(id)).is_err() {
                let _ = done_tx.send(false);
                return;
            }
        }
        let _ = done_tx.send(true);
    });
    let writing = entered.recv_timeout(Duration::from_secs(30)).is_ok();
    let returned = done.recv_timeout(Duration::from_secs(30));
    // Released before asserting, so a hand-over stuck on the disk fails the test instead of
    // hanging it.
    open_gate(&released);
    assert!(writing, "the spool thread is writing");
    assert_eq!(
        returned,
        Ok(true),
        "try_record returned, accepting every record, while the disk hung"
    );
    drop(stall);
    rig.recorder.flush().await;
    let mut stored = rig.store.ids();
    stored.sort();
    let mut expected = ids(&all);
    expected.sort();
    assert_eq!(stored, expected);
    rig.shutdown().await;
}

#[test]
fn estimated_size_follows_the_bodies() {
    let small = estimated_size(&sample_chunk("e", 1, "x"));
    let large = estimated_size(&sample_chunk("e", 1, &"x".repeat(10_000)));
    assert_eq!(large - small, 9_999);
}

fn journal_files(dir: &Path) -> Vec<std::path::PathBuf> {
    journal::leftovers(&dir.join("journal")).unwrap().0
}

/// Waits until the journal has written the records behind `tickets`.
async fn journaled(recorder: &Recorder, tickets: Vec<Journaled>) {
    for t in tickets {
        if let Some(wait) = recorder.journaled(t) {
            tokio::time::timeout(Duration::from_secs(30), wait)
                .await
                .expect("journaled");
        }
    }
}

/// Defect: records waited in the queue (and the writer's batch) only in memory, so a SIGKILL
/// lost them although the responses they describe had gone out.
#[tokio::test]
async fn records_journaled_before_a_kill_are_replayed_at_the_next_start() {
    let rig = rig(|_| {});
    // The store takes nothing: the records sit in the queue and the writer's batch.
    let stall = rig.store.stall.lock().await;
    let all = names("j", 5);
    let tickets = all
        .iter()
        .map(|id| rig.recorder.try_record(sample_request(id)).unwrap())
        .collect();
    journaled(&rig.recorder, tickets).await;
    assert!(rig.store.ids().is_empty());
    // Killed here: what is on disk is what the next process finds.
    let killed = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(killed.path().join("journal")).unwrap();
    for f in journal_files(rig.dir.path()) {
        std::fs::copy(
            &f,
            killed.path().join("journal").join(f.file_name().unwrap()),
        )
        .unwrap();
    }
    drop(stall);
    rig.shutdown().await;

    let next = rig_in(killed, |_| {}, spool::file_opener());
    next.recorder.flush().await;
    assert_eq!(
        next.store.ids(),
        ids(&all),
        "every journaled record, in order"
    );
    assert_eq!(next.recorder.spooled_bytes(), 0);
    let dir = next.dir.path().to_path_buf();
    next.shutdown().await;
    assert!(journal_files(&dir).is_empty(), "replayed files are deleted");
}

#[tokio::test]
async fn journal_files_go_once_their_records_are_stored() {
    let rig = rig(|_| {});
    let tickets = names("s", 4)
        .iter()
        .map(|id| rig.recorder.try_record(sample_request(id)).unwrap())
        .collect();
    journaled(&rig.recorder, tickets).await;
    assert_eq!(journal_files(rig.dir.path()).len(), 1);
    assert!(rig.recorder.journal_bytes() > 0);
    rig.recorder.flush().await;
    assert_eq!(stat(&rig.recorder.stats().journaled), 4);
    let dir = rig.dir.path().to_path_buf();
    rig.shutdown().await;
    assert!(
        journal_files(&dir).is_empty(),
        "a clean stop leaves no journal"
    );
}

/// Spooled records are safe on disk, so they release the journal; records the spool holds in
/// memory only (the disk refuses spool writes) do not.
#[tokio::test]
async fn the_journal_is_kept_only_for_records_not_yet_safe_in_the_store_or_spool() {
    let rig = rig(|_| {});
    rig.store.outage.store(true, Ordering::SeqCst);
    rig.record_all(&names("d", 3));
    rig.recorder.flush().await;
    assert!(
        rig.recorder.spooled_bytes() > 0,
        "spooled during the outage"
    );
    let dir = rig.dir.path().to_path_buf();
    rig.shutdown().await;
    assert!(
        journal_files(&dir).is_empty(),
        "spooled records release the journal"
    );

    // Now the spool's disk refuses too: the records are only in memory when the process stops.
    let budget = Arc::new(Mutex::new(Some(0)));
    let opener = spool::tests::short_opener(budget, Arc::new(AtomicU64::new(0)));
    let rig = rig_with(|_| {}, opener);
    rig.store.outage.store(true, Ordering::SeqCst);
    let all = names("m", 3);
    rig.record_all(&all);
    rig.recorder.flush().await;
    assert!(rig.recorder.spooled_bytes() > 0);
    assert!(
        !rig.recorder.can_accept(),
        "refusing while records are in memory"
    );
    let Rig {
        tracker,
        cancel,
        dir,
        ..
    } = rig;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    assert!(
        !journal_files(dir.path()).is_empty(),
        "kept for the next start"
    );

    // The next start replays them from the journal.
    let next = rig_in(dir, |_| {}, spool::file_opener());
    next.recorder.flush().await;
    assert_eq!(next.store.ids(), ids(&all));
    next.shutdown().await;
}

/// A recorder with no room anywhere — a one-record queue, a store in an outage, a one-byte
/// spool buffer on a disk that does not answer until the gate is opened — handed 40 records
/// named `prefix0…`.
fn no_room(prefix: &str) -> (Rig, Gate, Vec<String>) {
    let released = gate();
    let rig = rig_with(
        |s| {
            s.queue_capacity = 1;
            s.max_batch_records = 1;
            s.spool_buffer_max_bytes = 1;
        },
        gated_opener(&released, None),
    );
    rig.store.outage.store(true, Ordering::SeqCst);
    let all = names(prefix, 40);
    for id in &all {
        rig.recorder.record(sample_request(id));
    }
    (rig, released, all)
}

/// Review finding: with queue and spool both full, every record handed over spawned a task of
/// its own to wait for room, without bound. Now they wait in one list fed by one task, in
/// order, counted in `overflow_bytes`, and `flush` covers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_with_no_room_wait_in_one_list_and_all_arrive() {
    let (rig, released, all) = no_room("o");
    let overflowed = stat(&rig.recorder.stats().overflowed);
    assert!(overflowed > 0, "queue and spool are full: records wait");
    assert!(rig.recorder.overflow_bytes() > 0);
    open_gate(&released);
    rig.store.outage.store(false, Ordering::SeqCst);
    rig.recorder.flush().await;
    let mut stored = rig.store.ids();
    stored.sort();
    stored.dedup();
    let mut expected = ids(&all);
    expected.sort();
    assert_eq!(stored, expected, "every record reached the store");
    assert_eq!(rig.recorder.overflow_bytes(), 0);
    rig.shutdown().await;
}

/// Records still waiting for room when the proxy stops are not lost: shutdown does not wait
/// for room that will never come, and the journal replays them at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_waiting_for_room_at_shutdown_are_replayed_at_the_next_start() {
    let (rig, released, all) = no_room("w");
    assert!(stat(&rig.recorder.stats().overflowed) > 0);
    let Rig {
        recorder,
        store: _,
        tracker,
        cancel,
        dir,
    } = rig;
    cancel.cancel();
    // The disk answers again only once the stop is under way: the writer and the spool thread
    // can finish; the records still listed are left to the journal.
    open_gate(&released);
    tracker.close();
    tokio::time::timeout(Duration::from_secs(30), tracker.wait())
        .await
        .expect("the recorder stops with records still waiting for room");
    assert_eq!(stat(&recorder.stats().overflow_lost), 0);
    drop(recorder);

    let next = rig_in(dir, |_| {}, spool::file_opener());
    next.recorder.flush().await;
    let mut stored = next.store.ids();
    stored.sort();
    stored.dedup();
    let mut expected = ids(&all);
    expected.sort();
    assert_eq!(stored, expected, "the next start stored every record");
    next.shutdown().await;
}

/// A record is serialised once: the JSON made for the journal reaches the store with the
/// record, and it is the record's own.
#[tokio::test]
async fn the_journal_s_json_is_the_store_s_document() {
    let rig = rig(|_| {});
    let ids: Vec<String> = (0..5).map(|i| format!("j{i}")).collect();
    rig.record_all(&ids);
    rig.recorder.flush().await;
    assert_eq!(rig.store.ids().len(), 5);
    let made = rig.store.made.lock().unwrap().clone();
    assert_eq!(
        made,
        vec![true; 5],
        "every record came with its JSON, and the right one"
    );
}
