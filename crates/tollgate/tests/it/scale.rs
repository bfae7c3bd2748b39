//! Parser replicas sharing one Cosmos DB change feed: three `tollgate parser` processes split
//! the raw container's shards between them, one is killed with SIGKILL mid-run, and the
//! survivors take its shards over once its leases expire. Every request ends with exactly one
//! consolidated record and the totals are right.
//!
//! The records are written from the test, as proxies would, in two waves: one while all three
//! run, one after the kill. Waits poll the store and the processes' progress lines with a
//! bound; nothing sleeps to synchronise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tollgate_records::{Body, RawRecord};
use tollgate_store::conformance::{cosmos_test_config, sample_end, sample_request};
use tollgate_store::{CosmosConfig, RecordQuery, Store, StoreConfig, lease};

const SHARDS: u32 = 8;
const LEASE_TTL_MS: u64 = 4_000;
const GROUP: &str = "log-parser";
const PATIENCE: Duration = Duration::from_secs(90);

/// A `tollgate parser` child on the Cosmos store; killed on drop.
struct Replica {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Replica {
    fn start(dir: &Path, name: &str, cosmos: &CosmosConfig) -> Replica {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"{store}[parser]
replica_id = "{name}"
lease_ttl_ms = {LEASE_TTL_MS}
poll_interval_ms = 50
progress_log_ms = 100
[log]
filter = "info"
"#,
                store = tollgate_store::conformance::cosmos_toml(cosmos),
            ),
        )
        .expect("write config");
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["parser", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.join(name))
            .env("RUST_LOG", "info")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start tollgate parser");
        Replica {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    /// The counters of the replica's last progress line: (consolidated, raw records).
    fn progress(&self) -> (u64, u64) {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let Some(line) = log.lines().rev().find(|l| l.contains("Parser progress.")) else {
            return (0, 0);
        };
        let field = |name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("consolidated"), field("raw_records"))
    }

    fn sigkill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("reap");
        assert!(!status.success(), "killed, not exited: {status}");
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        crate::up::print_tail_if_failed(&self.name, &self.log, 30);
    }
}

/// A complete non-stream chat request whose answer reports `input` and `output` tokens.
fn request(id: &str, input: u64, output: u64) -> [RawRecord; 2] {
    let RawRecord::Request(mut req) = sample_request(id) else {
        unreachable!("a request record")
    };
    req.stream = false;
    req.body = Body::json(&json!({"messages": [{"role": "user", "content": "hi"}]}));
    let RawRecord::End(mut end) = sample_end(id, 1) else {
        unreachable!("an end record")
    };
    end.content_type = Some("application/json".into());
    end.body = Body::json(&json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output}
    }));
    [RawRecord::Request(req), RawRecord::End(end)]
}

/// Writes `n` requests from `first`, as proxies would; returns their ids and expected usage.
async fn wave(store: &dyn Store, first: usize, n: usize) -> BTreeMap<String, (u64, u64)> {
    let mut expected = BTreeMap::new();
    let mut records = Vec::new();
    for i in first..first + n {
        let id = format!("scale-{i:05}");
        let (input, output) = (10 + (i as u64 % 7), 3 + (i as u64 % 5));
        records.extend(request(&id, input, output));
        expected.insert(id, (input, output));
    }
    for batch in records.chunks(50) {
        store.append(batch).await.expect("append raw records");
    }
    expected
}

async fn until<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Live owners and the units each holds.
async fn owners(store: &dyn Store) -> BTreeMap<String, Vec<String>> {
    lease::owners(store, GROUP)
        .await
        .expect("leases")
        .into_iter()
        .collect()
}

async fn consolidated_ids(store: &dyn Store) -> Vec<String> {
    store
        .list(&RecordQuery::default())
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_parsers_share_the_feed_and_survivors_take_over_a_killed_ones_units() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cosmos = cosmos_test_config(&format!("scale-{}", std::process::id()));
    cosmos.raw_shards = SHARDS;
    let store: Arc<dyn Store> = tollgate_store::open(&StoreConfig::Cosmos(cosmos.clone()))
        .await
        .expect("open the Cosmos store");

    let mut replicas: Vec<Replica> = ["one", "two", "three"]
        .iter()
        .map(|n| Replica::start(dir.path(), n, &cosmos))
        .collect();
    // Balanced: every shard held, by all three.
    until("three replicas holding every shard", async || {
        let o = owners(store.as_ref()).await;
        let held: usize = o.values().map(Vec::len).sum();
        // A replica that has only asked for a shard counts as live but holds none yet.
        (o.len() == 3 && o.values().all(|u| !u.is_empty()) && held == SHARDS as usize).then_some(())
    })
    .await;

    let mut expected = wave(store.as_ref(), 0, 150).await;
    until("the first wave consolidated", async || {
        (consolidated_ids(store.as_ref()).await.len() == 150).then_some(())
    })
    .await;
    // Each replica did a share of the work, by its own counters.
    let shares = until("every replica's progress line", async || {
        let p: Vec<(u64, u64)> = replicas.iter().map(Replica::progress).collect();
        (p.iter().map(|(c, _)| c).sum::<u64>() == 150).then_some(p)
    })
    .await;
    for (r, (consolidated, _)) in replicas.iter().zip(&shares) {
        assert!(
            *consolidated > 0,
            "{} consolidated nothing: {shares:?}",
            r.name
        );
    }

    // One replica dies without a word; its shards wait for their leases to expire.
    let dead_units = until("the replica to kill holding shards", async || {
        owners(store.as_ref()).await.get("two").cloned()
    })
    .await;
    replicas[1].sigkill();
    let killed = Instant::now();
    expected.extend(wave(store.as_ref(), 150, 150).await);
    let taken_after = until("the survivors holding every shard", async || {
        let o = owners(store.as_ref()).await;
        let held: usize = o.values().map(Vec::len).sum();
        (!o.contains_key("two") && held == SHARDS as usize).then(|| killed.elapsed())
    })
    .await;
    assert!(
        taken_after >= Duration::from_millis(LEASE_TTL_MS / 3),
        "the dead replica's shards were taken before its leases could have expired ({taken_after:?})"
    );
    until("the second wave consolidated", async || {
        (consolidated_ids(store.as_ref()).await.len() == 300).then_some(())
    })
    .await;
    let after = owners(store.as_ref()).await;
    for unit in &dead_units {
        assert!(
            after.values().any(|units| units.contains(unit)),
            "shard {unit} of the killed replica is held again: {after:?}"
        );
    }

    // Exactly one consolidated record per request, each with its own usage; totals exact.
    let all = store.list(&RecordQuery::default()).await.expect("list");
    let mut seen = BTreeMap::new();
    for r in &all {
        *seen.entry(r.id.clone()).or_insert(0) += 1;
        let usage = r.usage.as_ref().expect("usage");
        assert_eq!(
            Some(&(usage.input_tokens, usage.output_tokens)),
            expected.get(&r.id),
            "{}",
            r.id
        );
        assert!(r.complete, "{} complete", r.id);
    }
    assert_eq!(seen.len(), expected.len(), "every request consolidated");
    assert!(seen.values().all(|n| *n == 1), "none twice");
    let rows = store.usage(&RecordQuery::default()).await.expect("usage");
    let (input, output) = expected
        .values()
        .fold((0, 0), |(i, o), (a, b)| (i + a, o + b));
    assert_eq!(rows.iter().map(|r| r.requests).sum::<u64>(), 300);
    assert_eq!(rows.iter().map(|r| r.input_tokens).sum::<u64>(), input);
    assert_eq!(rows.iter().map(|r| r.output_tokens).sum::<u64>(), output);
}
