//! The behaviour every store backend must show, written once and run against each backend
//! (`tests/it`). Panics with a message on the first violation.

use chrono::{Duration, TimeZone, Utc};
use tollgate_records::{
    AuthKind, Body, ChunksRecord, ConsolidatedRecord, Consumer, Cost, EndRecord, Money, RawRecord,
    RequestRecord, SCHEMA_VERSION, SegmentData, Usage, UsageQuality, UsageQualityInfo, UsageSource,
};

use crate::{Checkpoint, DeadLetter, PendingRequest, RecordQuery, Store, StoreError};

fn some<T>(o: Option<T>, what: &str) -> T {
    match o {
        Some(v) => v,
        None => panic!("{what}"),
    }
}

fn must<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

pub fn sample_request(id: &str) -> RawRecord {
    RawRecord::Request(RequestRecord {
        schema_version: SCHEMA_VERSION,
        request_id: id.to_owned(),
        time: Utc::now(),
        method: "POST".into(),
        path: "/openai/deployments/d/chat/completions".into(),
        query: Some("api-version=2024-10-21".into()),
        deployment: Some("d".into()),
        api_version: Some("2024-10-21".into()),
        operation: "chat.completions".into(),
        stream: true,
        consumer: Consumer {
            id: "c".into(),
            key_id: None,
            auth_kind: AuthKind::ApiKey,
            ..Default::default()
        },
        client_ip: None,
        user_agent: None,
        headers: Default::default(),
        body: Body::Empty,
        stream_usage_injected: false,
    })
}

pub fn sample_chunk(id: &str, seq: u32, text: &str) -> RawRecord {
    RawRecord::Chunks(ChunksRecord {
        schema_version: SCHEMA_VERSION,
        request_id: id.to_owned(),
        seq,
        offset: 0,
        data: SegmentData::from_bytes(text.as_bytes()),
        arrivals: vec![[1, text.len() as u64]],
    })
}

pub fn sample_end(id: &str, seq: u32) -> RawRecord {
    RawRecord::End(EndRecord {
        price_multiplier: None,
        schema_version: SCHEMA_VERSION,
        request_id: id.to_owned(),
        seq,
        time: Utc::now(),
        status: 200,
        backend: Some("b".into()),
        attempts: vec![],
        ttfb_ms: Some(1.0),
        total_ms: 2.0,
        headers: Default::default(),
        content_type: None,
        body: Body::Empty,
        client_disconnected: false,
        truncated: false,
        error: None,
        segments: seq - 1,
        first_segment_seq: 1,
        response_bytes: 0,
    })
}

/// A cost of `nanos` nano-units, all of it output.
pub fn sample_cost(nanos: i64) -> Cost {
    Cost {
        input: Money::ZERO,
        cached_input: Money::ZERO,
        output: Money::from_nanos(nanos),
        total: Money::from_nanos(nanos),
        currency: "USD".into(),
        price_table_version: "t".into(),
        price_multiplier: None,
    }
}

pub fn sample_consolidated(id: &str, consumer: &str, day: u32, input: u64) -> ConsolidatedRecord {
    ConsolidatedRecord {
        schema_version: SCHEMA_VERSION,
        id: id.to_owned(),
        time: Utc
            .with_ymd_and_hms(2026, 11, day, 12, 0, 0)
            .single()
            .unwrap_or_default(),
        consumer: Consumer {
            id: consumer.to_owned(),
            key_id: None,
            auth_kind: AuthKind::ApiKey,
            ..Default::default()
        },
        deployment: Some("d".into()),
        model: Some("gpt-4o".into()),
        operation: "chat.completions".into(),
        api_version: None,
        path: "/".into(),
        stream: false,
        status: Some(200),
        backend: None,
        attempts: vec![],
        latency: None,
        usage: Some(Usage {
            input_tokens: input,
            output_tokens: 10,
            total_tokens: input + 10,
            cached_input_tokens: 0,
            reasoning_tokens: 0,
            audio_input_tokens: 0,
            audio_output_tokens: 0,
            source: UsageSource::Reported,
        }),
        cost: None,
        unpriced: false,
        usage_quality: None,
        prompt: None,
        choices: vec![],
        prompt_filter_results: None,
        response_id: None,
        system_fingerprint: None,
        response_headers: Default::default(),
        client_ip: None,
        user_agent: None,
        client_disconnected: false,
        complete: true,
        truncated: false,
        response_bytes: 0,
        revision: tollgate_records::revision(3, true),
        error: None,
    }
}

/// Runs every check. `store` must be empty.
pub async fn run(store: &dyn Store) {
    feed_order_idempotence_and_resume(store).await;
    units_split_requests_whole(store).await;
    leases_are_exclusive_and_carry_the_checkpoint(store).await;
    dead_letters_are_kept_once(store).await;
    upsert_is_idempotent_and_usage_groups(store).await;
    consumer_registry_writes_are_conditional(store).await;
    records_appended_with_their_json_read_back_the_same(store).await;
}

/// A record appended with its JSON made by the caller reads back as the record, on the feed
/// and by request; one without (a shorter slice) is serialised by the store.
async fn records_appended_with_their_json_read_back_the_same(store: &dyn Store) {
    let id = "encoded-1";
    let records = vec![sample_request(id), sample_chunk(id, 1, "héllo \"x\"")];
    let made: Vec<Option<std::sync::Arc<str>>> = vec![Some(std::sync::Arc::from(must(
        serde_json::to_string(&records[0]),
        "serialise",
    )))];
    must(
        store.append_encoded(&records, &made).await,
        "append_encoded",
    );
    let back = must(store.read_request(id).await, "read back");
    assert_eq!(back, records);
}

/// Consumers are created once, replaced only over the version read, and listed whole: two
/// administrators changing one consumer at once cannot both win.
async fn consumer_registry_writes_are_conditional(store: &dyn Store) {
    let some = |v: Option<String>, what: &str| must(v.ok_or("none"), what);
    let doc = |n: u64| serde_json::json!({"consumer": {"id": "team-a"}, "n": n});
    assert!(must(store.consumer("team-a").await, "absent").is_none());
    let v1 = some(
        must(store.put_consumer("team-a", &doc(1), None).await, "create"),
        "the first create wins",
    );
    assert!(
        must(
            store.put_consumer("team-a", &doc(9), None).await,
            "second create"
        )
        .is_none(),
        "a second create of one id must fail"
    );
    let v2 = some(
        must(
            store.put_consumer("team-a", &doc(2), Some(&v1)).await,
            "update",
        ),
        "an update over the version read wins",
    );
    assert_ne!(v1, v2);
    assert!(
        must(
            store.put_consumer("team-a", &doc(3), Some(&v1)).await,
            "stale"
        )
        .is_none(),
        "an update over a stale version must fail"
    );
    must(
        store.put_consumer("team-b", &doc(1), None).await,
        "create b",
    );
    let got = must(
        must(store.consumer("team-a").await, "read").ok_or("absent"),
        "stored",
    );
    assert_eq!(
        (got.version.as_str(), &got.document),
        (v2.as_str(), &doc(2))
    );
    let all = must(store.consumers().await, "list");
    let ids: Vec<&str> = all.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["team-a", "team-b"]);
}

/// Request ids whose records all land in `unit` (the unit of each request is the backend's
/// choice, so the suite finds ids that fall in the unit it reads).
fn ids_in_unit(store: &dyn Store, unit: &str, prefix: &str, n: usize) -> Vec<String> {
    let mut found = Vec::new();
    let units = store.units();
    for i in 0.. {
        if found.len() == n {
            break;
        }
        let id = format!("{prefix}{i}");
        if units.len() == 1 || crate::unit_of(&units, &id) == unit {
            found.push(id);
        }
    }
    found
}

async fn feed_order_idempotence_and_resume(store: &dyn Store) {
    let unit = store.units()[0].clone();
    let unit = unit.as_str();
    let ids = ids_in_unit(store, unit, "a", 2);
    let (a, b) = (ids[0].as_str(), ids[1].as_str());
    let first = vec![
        sample_request(a),
        sample_chunk(a, 1, "data: x\n\n"),
        sample_request(b),
    ];
    must(store.append(&first).await, "append");
    // Replaying an already-stored batch must not duplicate anything.
    must(store.append(&first).await, "replayed append");
    let page = must(store.read(unit, None, 2).await, "read");
    assert_eq!(page.records.len(), 2, "page size honours max");
    assert_eq!(page.records[0].id(), format!("{a}:0"));
    assert_eq!(page.records[1].id(), format!("{a}:1"));
    let rest = must(
        store.read(unit, page.position.as_deref(), 100).await,
        "read rest",
    );
    assert_eq!(
        rest.records.iter().map(RawRecord::id).collect::<Vec<_>>(),
        vec![format!("{b}:0")]
    );
    let empty = must(
        store.read(unit, rest.position.as_deref(), 100).await,
        "read at end",
    );
    assert!(empty.records.is_empty(), "nothing after the last record");
    assert_eq!(
        empty.position, rest.position,
        "an empty page keeps the position"
    );

    must(store.append(&[sample_end(a, 2)]).await, "append end");
    let next = must(
        store.read(unit, rest.position.as_deref(), 100).await,
        "read new",
    );
    assert_eq!(
        next.records.iter().map(RawRecord::id).collect::<Vec<_>>(),
        vec![format!("{a}:2")]
    );

    let records = must(store.read_request(a).await, "read_request");
    assert_eq!(
        records.iter().map(RawRecord::seq).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(
        records[1],
        sample_chunk(a, 1, "data: x\n\n"),
        "chunk bytes survive the store"
    );
    assert!(must(store.read_request("nope").await, "read_request").is_empty());
}

/// Every record appears in exactly one unit, and all records of a request in the same one.
async fn units_split_requests_whole(store: &dyn Store) {
    let units = store.units();
    assert!(!units.is_empty(), "a feed has at least one unit");
    let mut positions = Vec::new();
    for unit in &units {
        let mut position = None;
        loop {
            let page = must(store.read(unit, position.as_deref(), 1000).await, "drain");
            if page.records.is_empty() {
                break;
            }
            position = page.position;
        }
        positions.push(position);
    }
    let batch: Vec<RawRecord> = (0..40)
        .flat_map(|i| {
            let id = format!("split{i}");
            [
                sample_request(&id),
                sample_chunk(&id, 1, "data: y\n\n"),
                sample_end(&id, 2),
            ]
        })
        .collect();
    must(store.append(&batch).await, "append split");
    let mut seen: std::collections::BTreeMap<String, (String, usize)> = Default::default();
    for (unit, position) in units.iter().zip(positions) {
        let page = must(
            store.read(unit, position.as_deref(), 1000).await,
            "read unit",
        );
        for r in &page.records {
            let entry = seen
                .entry(r.request_id().to_owned())
                .or_insert((unit.clone(), 0));
            assert_eq!(&entry.0, unit, "a request's records are in one unit");
            entry.1 += 1;
        }
    }
    assert_eq!(seen.len(), 40, "every request is in some unit");
    assert!(
        seen.values().all(|(_, n)| *n == 3),
        "each record is read once"
    );
}

async fn leases_are_exclusive_and_carry_the_checkpoint(store: &dyn Store) {
    use crate::lease;
    let unit = store.units()[0].clone();
    let ttl = Duration::seconds(60);
    assert_eq!(
        must(crate::load_checkpoint(store, "g", &unit).await, "load"),
        None
    );
    let held = some(
        must(
            lease::acquire(store, "g", &unit, "one", ttl).await,
            "acquire",
        ),
        "a unit nobody holds is taken",
    );
    assert!(
        must(
            lease::acquire(store, "g", &unit, "two", ttl).await,
            "contend"
        )
        .is_none(),
        "a held lease is not taken by another reader"
    );
    let cp = Checkpoint {
        position: Some("42".into()),
        pending: vec![PendingRequest {
            request_id: "x".into(),
            first_seen: Utc::now(),
            end_seen: true,
        }],
    };
    let held = must(lease::renew(store, &held, &cp, ttl).await, "renew");
    assert_eq!(
        must(crate::load_checkpoint(store, "g", &unit).await, "load"),
        Some(cp.clone())
    );
    assert_eq!(
        must(
            crate::load_checkpoint(store, "other", &unit).await,
            "other group"
        ),
        None,
        "groups keep their own checkpoints"
    );

    // A hand-over request survives the owner's next renewal, which then sees it.
    assert!(must(
        lease::request(store, "g", &unit, "two").await,
        "request"
    ));
    let held = must(
        lease::renew(store, &held, &cp, ttl).await,
        "renew after request",
    );
    assert!(held.requested(), "the owner sees the request");
    let replicas = must(lease::owners(store, "g").await, "owners");
    assert!(
        replicas
            .iter()
            .any(|(r, units)| r == "two" && units.is_empty()),
        "a replica that asked counts as live before it holds anything: {replicas:?}"
    );

    // Released: the next reader goes on from the saved checkpoint.
    let mut cp2 = cp.clone();
    cp2.position = Some("43".into());
    must(lease::release(store, &held, &cp2).await, "release");
    assert!(
        must(
            lease::acquire(store, "g", &unit, "one", ttl).await,
            "take back"
        )
        .is_none(),
        "a lease handed over on request is kept for the replica that asked"
    );
    let second = some(
        must(
            lease::acquire(store, "g", &unit, "two", ttl).await,
            "take over",
        ),
        "a released lease is free",
    );
    assert_eq!(second.checkpoint(), &cp2);
    assert!(!second.requested(), "taking a lease clears the request");

    // The old holder's renewal fails: it must stop reading the unit.
    match lease::renew(store, &held, &cp, ttl).await {
        Err(StoreError::LeaseLost { .. }) => {}
        other => panic!("a taken lease cannot be renewed by its old owner: {other:?}"),
    }
    // An expired lease is free without asking.
    let expired = must(
        lease::renew(store, &second, &cp2, Duration::zero()).await,
        "expire",
    );
    let third = must(
        lease::acquire(store, "g", &unit, "three", ttl).await,
        "after expiry",
    );
    assert!(third.is_some(), "an expired lease is taken");
    assert!(matches!(
        lease::renew(store, &expired, &cp2, ttl).await,
        Err(StoreError::LeaseLost { .. })
    ));
    let owners = must(lease::owners(store, "g").await, "owners");
    assert_eq!(owners.len(), 1);
    assert_eq!(owners[0].0, "three");
}

async fn dead_letters_are_kept_once(store: &dyn Store) {
    assert!(must(store.dead_letters(10).await, "list").is_empty());
    let letter = DeadLetter {
        position: "7".into(),
        record_id: Some("q:3".into()),
        error: "expected value".into(),
        document: "{not json".into(),
    };
    must(
        store.dead_letter(std::slice::from_ref(&letter)).await,
        "dead letter",
    );
    must(
        store.dead_letter(std::slice::from_ref(&letter)).await,
        "again",
    );
    assert_eq!(must(store.dead_letters(10).await, "list"), vec![letter]);
}

async fn upsert_is_idempotent_and_usage_groups(store: &dyn Store) {
    let recs = vec![
        sample_consolidated("r1", "alice", 1, 100),
        sample_consolidated("r2", "alice", 1, 50),
        sample_consolidated("r3", "bob", 2, 7),
    ];
    must(store.upsert(&recs).await, "upsert");
    must(store.upsert(&recs).await, "upsert again");
    let mut changed = sample_consolidated("r2", "alice", 1, 60);
    changed.status = Some(429);
    // Its model has no price: counted apart, not as a cost of zero.
    changed.unpriced = true;
    must(store.upsert(&[changed.clone()]).await, "upsert changed");
    assert_eq!(must(store.get("r2").await, "get"), Some(changed));

    let all = must(store.list(&RecordQuery::default()).await, "list");
    assert_eq!(all.len(), 3, "upserts never duplicate");
    assert_eq!(all[0].id, "r3", "newest first");

    // A 200 whose answer was cut, and one that never completed, are errors too.
    let mut cut = sample_consolidated("r4", "bob", 2, 7);
    cut.truncated = true;
    let mut unfinished = sample_consolidated("r5", "bob", 2, 7);
    unfinished.complete = false;
    // Costs sum exactly: 0.1 + 0.2 is 0.30000000000000004 in binary floats.
    let mut r3 = sample_consolidated("r3", "bob", 2, 7);
    r3.cost = Some(sample_cost(100_000_000));
    cut.cost = Some(sample_cost(200_000_000));
    // Usage quality is counted per kind.
    let quality = |quality| {
        Some(UsageQualityInfo {
            quality,
            reason: None,
        })
    };
    r3.usage_quality = quality(UsageQuality::ReportedAfterInjection);
    if let Some(u) = r3.usage.as_mut() {
        u.reasoning_tokens = 4;
    }
    cut.usage_quality = quality(UsageQuality::LowerBound);
    unfinished.usage_quality = quality(UsageQuality::Unknown);
    must(store.upsert(&[r3, cut, unfinished]).await, "upsert cut");

    let rows = must(store.usage(&RecordQuery::default()).await, "usage");
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0].consumer.as_str(), rows[0].requests), ("alice", 2));
    assert_eq!(rows[0].input_tokens, 160);
    assert_eq!(rows[0].total_tokens, 180);
    assert_eq!(rows[0].errors, 1);
    assert_eq!(rows[0].throttled_requests, 1, "r2's 429");
    assert_eq!(rows[0].unpriced_requests, 1);
    assert_eq!(rows[1].consumer, "bob");
    assert_eq!(rows[1].unpriced_requests, 0);
    assert_eq!((rows[1].requests, rows[1].errors), (3, 2));
    assert_eq!(rows[1].throttled_requests, 0, "errors, none a 429");
    assert_eq!(rows[1].cost, Money::from_nanos(300_000_000));
    assert_eq!(rows[1].cost.to_string(), "0.300000000");
    assert_eq!(
        (
            rows[1].injected_requests,
            rows[1].lower_bound_requests,
            rows[1].unknown_usage_requests,
            rows[1].estimated_requests
        ),
        (1, 1, 1, 0)
    );
    assert_eq!(rows[1].reasoning_tokens, 4);

    let day2 = Utc
        .with_ymd_and_hms(2026, 11, 2, 0, 0, 0)
        .single()
        .unwrap_or_default();
    let q = RecordQuery {
        from: Some(day2),
        to: Some(day2 + Duration::days(1)),
        ..Default::default()
    };
    let rows = must(store.usage(&q).await, "usage window");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].consumer, "bob");
    let q = RecordQuery {
        consumer: Some("alice".into()),
        ..Default::default()
    };
    assert_eq!(must(store.list(&q).await, "list by consumer").len(), 2);
}

/// The endpoint of a Cosmos DB test server for this test process: `TOLLGATE_TEST_COSMOS` if
/// set, otherwise `../shared/cosmos-test-server` (or `TOLLGATE_COSMOS_TEST_SERVER_DIR`) started
/// once on a free port. The server is tied to this process: a shell holds it and stops it when
/// the process's end closes the shell's input, so no test run leaves a server behind.
pub fn cosmos_test_server() -> String {
    static SERVER: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    match SERVER.get_or_init(start_cosmos_test_server) {
        Ok(url) => url.clone(),
        Err(e) => panic!("Cosmos DB test server: {e}"),
    }
}

fn start_cosmos_test_server() -> Result<String, String> {
    use std::io::BufRead;
    if let Ok(url) = std::env::var("TOLLGATE_TEST_COSMOS") {
        return Ok(url);
    }
    let dir = std::env::var("TOLLGATE_COSMOS_TEST_SERVER_DIR").map_or_else(
        |_| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../../shared/cosmos-test-server")
        },
        std::path::PathBuf::from,
    );
    let script = dir.join("start.sh");
    if !script.is_file() {
        return Err(format!(
            "{} not found; set TOLLGATE_COSMOS_TEST_SERVER_DIR or TOLLGATE_TEST_COSMOS",
            script.display()
        ));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"pid=$("$0" "$1" --no-ssl) || exit 1; echo ready; cat >/dev/null; kill "$pid""#)
        .arg(&script)
        .arg(port.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.trim() != "ready" {
        return Err(format!("{} did not start a server", script.display()));
    }
    // Kept for the life of the process: its input closes when the process ends.
    std::mem::forget(child);
    Ok(format!("http://127.0.0.1:{port}/"))
}

/// A Cosmos configuration for the test server, with a database of its own so tests sharing the
/// server do not see each other's records.
pub fn cosmos_test_config(database: &str) -> crate::CosmosConfig {
    // The emulator's well-known key (the test server checks none), in a file as a deployment
    // mounts a secret.
    const EMULATOR_KEY: &str =
        "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw==";
    let key_file =
        std::env::temp_dir().join(format!("tollgate-test-cosmos-{}.key", std::process::id()));
    if let Err(e) = std::fs::write(&key_file, EMULATOR_KEY) {
        panic!("cannot write {}: {e}", key_file.display());
    }
    crate::CosmosConfig {
        endpoint: cosmos_test_server(),
        database: database.to_owned(),
        auth: crate::CosmosAuth::Key {
            key_env: String::new(),
            key_file: Some(key_file),
        },
        region: "East US".into(),
        create_if_missing: true,
        containers: crate::CosmosContainers::default(),
        raw_shards: 4,
        raw_ttl_days: 0,
        http2: false,
        binary_encoding: false,
        write_concurrency: 4,
    }
}

/// `config` as the `[store]` section of a Tollgate configuration file, for tests that run the
/// `tollgate` binary on the Cosmos test server.
pub fn cosmos_toml(config: &crate::CosmosConfig) -> String {
    let key_file = match &config.auth {
        crate::CosmosAuth::Key {
            key_file: Some(f), ..
        } => f.display().to_string(),
        _ => panic!("the test configuration authenticates with a key file"),
    };
    format!(
        "[store]\ntype = \"cosmos\"\nendpoint = \"{}\"\ndatabase = \"{}\"\nraw_shards = {}\n\
         raw_ttl_days = {}\ncreate_if_missing = {}\nhttp2 = false\nbinary_encoding = false\n\
         [store.auth]\nkind = \"key\"\nkey_file = \"{key_file}\"\n",
        config.endpoint,
        config.database,
        config.raw_shards,
        config.raw_ttl_days,
        config.create_if_missing,
    )
}
