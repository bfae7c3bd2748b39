//! `tollgate up` killed with SIGKILL under load, then started again on the same data directory:
//! every request whose response the client read to its last byte before the kill has exactly
//! one consolidated record, complete and with AOAI's usage. Records still in the recorder's
//! memory (the queue, the writer's batch) die with the process; the write-ahead journal, and
//! the tee holding each response's last byte until its `end` record is journaled, are what
//! keep them.
//!
//! The writer lingers 200 ms per batch here, so at a kill many completed responses have records
//! that are only in memory: without the journal the test loses some every run. A run ends when,
//! after `per_kill` responses, the worker that read the last of them sends one more (from a
//! blocking socket, so the kill follows its last byte within microseconds) and kills the
//! process. The busy, synced variant kills six runs in a row, each restart replaying what the
//! previous one left, before the final restart and check.
//!
//! Without the tee's wait the default variant passes almost always: on an idle journal thread
//! the `end` is written within tens of microseconds, sooner than the client reads the last
//! byte. The busy, synced variant loses a response whose `end` queued behind a group being
//! flushed; measured on a 2-core VM, a quarter to a half of the kills without the wait lose
//! one, so six kills catch it in most runs, not all. The tee's unit tests (`tee.rs`) hold the
//! journal's writes and show the wait deterministically.
//!
//! Waits are bounded and synchronise on events (stdout lines, responses, the admin flush).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tollgate_records::UsageSource;

use crate::up::{Up, UpConfig, consolidated, open_store};

const KEY: &str = "kill-consumer-key";
const ADMIN_KEY: &str = "kill-admin-key";
const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
const WORKERS: usize = 16;
/// The outer safety net of every wait.
const PATIENCE: Duration = Duration::from_secs(60);

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(PATIENCE, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// SIGKILL (what `Child::kill` sends on Unix), and the exit reaped.
fn sigkill(child: &Mutex<Child>) {
    let mut child = child.lock().expect("child");
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reap");
    assert!(!status.success(), "killed, not exited: {status}");
}

/// A run's `tollgate up`, its writer lingering 200 ms a batch; `recorder`: extra lines for
/// `[proxy.recorder]`.
fn start_up(dir: &Path, data: &Path, run: &str, recorder: &str) -> Up {
    let sections = format!("[proxy.recorder]\nflush_interval_ms = 200\n{recorder}");
    Up::start(
        dir,
        data,
        &format!("tollgate-{run}"),
        &UpConfig {
            env: &[],
            consumer: "kill",
            key: KEY,
            admin_key: ADMIN_KEY,
            sections: &sections,
        },
    )
}

/// What the workers send, and how often the process is killed.
#[derive(Clone, Copy)]
struct Load {
    inter_token_ms: &'static str,
    /// Responses read to their end before the last one of a run, after which it is killed.
    per_kill: usize,
    /// Runs, each killed; every run but the first starts on what the previous one left.
    kills: usize,
}

/// One chat request read to its end: its request id, or `None` when it failed (the process is
/// gone).
async fn chat(
    http: &reqwest::Client,
    base: &str,
    label: String,
    stream: bool,
    load: Load,
) -> Option<String> {
    let mut body = json!({"messages": [{"role": "user", "content": label}]});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let response = http
        .post(format!("{base}{CHAT}"))
        .header("api-key", KEY)
        .header("x-sim-inter-token-ms", load.inter_token_ms)
        .json(&body)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    let id = response
        .headers()
        .get(tollgate_logging_proxy::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Read to the end: a body cut by the kill is an error here, and not counted.
    let bytes = response.bytes().await.ok()?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    Some(id.expect("request id on the answer"))
}

/// The last request, from a blocking socket read by a thread of its own, so the kill follows
/// the response's last byte within microseconds: a non-stream chat request, read until its
/// `content-length` is complete; then SIGKILL. Its request id.
fn last_then_kill(
    addr: SocketAddr,
    label: &str,
    inter_token_ms: &str,
    child: &Mutex<Child>,
) -> String {
    let body = json!({"messages": [{"role": "user", "content": label}]}).to_string();
    let request = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: kill.test\r\napi-key: {KEY}\r\nx-sim-inter-token-ms: {inter_token_ms}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(PATIENCE)).expect("read timeout");
    conn.write_all(request.as_bytes()).expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    // Bounded by the read timeout and the response's size.
    loop {
        let n = conn.read(&mut buf).expect("read the last response");
        assert!(n > 0, "closed before the last response was complete");
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        let len: usize = header("content-length:")
            .expect("a sized answer")
            .parse()
            .expect("length");
        if got.len() - (end + 4) < len {
            continue;
        }
        sigkill(child);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        return header(&format!("{}:", tollgate_logging_proxy::REQUEST_ID_HEADER))
            .expect("request id on the answer");
    }
}

/// Sends chat requests, alternately stream (with the usage frame) and not, until one fails
/// (the process is gone); notes the request id of every response read to its end. The worker
/// that reads the `per_kill`th sends one more, small, and kills the
/// process the moment it has read it: that response's `end` is as recent as it gets.
async fn worker(
    http: reqwest::Client,
    addr: SocketAddr,
    load: Load,
    n: usize,
    completed: Arc<Mutex<Vec<String>>>,
    count: Arc<AtomicUsize>,
    child: Arc<Mutex<Child>>,
) {
    let base = format!("http://{addr}");
    // Bounded: the process is killed after a few hundred responses in all.
    for i in 0..10_000 {
        let stream = (n + i).is_multiple_of(2);
        let label = format!("kill test {n}/{i}");
        let Some(id) = chat(&http, &base, label, stream, load).await else {
            return;
        };
        completed.lock().expect("ids").push(id);
        if count.fetch_add(1, Ordering::SeqCst) + 1 == load.per_kill {
            let label = format!("kill test {n}: the last");
            let last = tokio::task::spawn_blocking(move || {
                last_then_kill(addr, &label, load.inter_token_ms, &child)
            });
            let id = within("the last response", last)
                .await
                .expect("the last request's thread");
            completed.lock().expect("ids").push(id);
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_completed_before_a_sigkill_are_all_recorded_after_a_restart() {
    let load = Load {
        inter_token_ms: "1",
        per_kill: 300,
        kills: 1,
    };
    kill_and_restart("default", "", load).await;
}

/// The journal synced per write (the power-loss policy) and kept busy: unpaced streams, a
/// segment record per chunk. Each group then takes a disk flush, and a response can complete
/// while its `end` waits behind the group being written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_busy_synced_journal_too() {
    let load = Load {
        inter_token_ms: "0",
        per_kill: 60,
        kills: 6,
    };
    kill_and_restart(
        "busy synced journal",
        "journal_fsync = \"always\"\nsegment_max_age_ms = 0",
        load,
    )
    .await;
}

#[expect(clippy::print_stderr, reason = "the figures of the run")]
async fn kill_and_restart(label: &str, recorder: &str, load: Load) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let completed = Arc::new(Mutex::new(Vec::new()));
    for run in 0..load.kills {
        let up = start_up(dir.path(), &data, &format!("killed-{run}"), recorder);
        let count = Arc::new(AtomicUsize::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for n in 0..WORKERS {
            workers.spawn(worker(
                http.clone(),
                up.addr,
                load,
                n,
                completed.clone(),
                count.clone(),
                up.child.clone(),
            ));
        }
        // Every worker stops at its first failed request, after the kill.
        within("the kill and the workers to stop", async {
            while let Some(joined) = workers.join_next().await {
                joined.expect("worker");
            }
        })
        .await;
    }
    let completed = completed.lock().expect("ids").clone();

    let up = start_up(dir.path(), &data, "restarted", recorder);
    let flush = within(
        "the admin flush",
        http.post(format!("{}/tollgate/admin/flush", up.base()))
            .header("api-key", ADMIN_KEY)
            .send(),
    )
    .await
    .expect("flush");
    assert_eq!(flush.status(), 200);

    let store = open_store(&data).await;
    let (all, count) = consolidated(store.as_ref()).await;
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "listed more than once: {twice:?}");
    let by_id: BTreeMap<&str, _> = all.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut problems = Vec::new();
    let mut found = 0;
    for id in &completed {
        let Some(r) = by_id.get(id.as_str()) else {
            problems.push(format!("{id}: no consolidated record"));
            continue;
        };
        found += 1;
        if !r.complete || r.status != Some(200) {
            problems.push(format!(
                "{id}: complete {}, status {:?}",
                r.complete, r.status
            ));
        }
        match &r.usage {
            Some(u) if u.source == UsageSource::Reported && u.total_tokens > 0 => {}
            u => problems.push(format!("{id}: usage {u:?}")),
        }
    }
    eprintln!(
        "{label}: {} responses completed before the kill, {found} of them consolidated after the restart ({} records in all)",
        completed.len(),
        all.len()
    );
    assert!(completed.len() > load.per_kill * load.kills);
    assert!(
        problems.is_empty(),
        "{} of {} completed requests:\n{}",
        problems.len(),
        completed.len(),
        problems.join("\n")
    );
}
