//! The behaviour every store backend must show, written once and run against each backend
//! (`tests/it`). Panics with a message on the first violation.

use chrono::{Duration, TimeZone, Utc};
use tollgate_records::{
    AuthKind, Body, ChunksRecord, ConsolidatedRecord, Consumer, Cost, EndRecord, Money, RawRecord,
    RequestRecord, SCHEMA_VERSION, SegmentData, Usage, UsageQuality, UsageQualityInfo, UsageSource,
};

use crate::{Checkpoint, DeadLetter, PendingRequest, RecordQuery, Store};

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
    checkpoints_round_trip(store).await;
    dead_letters_are_kept_once(store).await;
    upsert_is_idempotent_and_usage_groups(store).await;
}

async fn feed_order_idempotence_and_resume(store: &dyn Store) {
    let first = vec![
        sample_request("a"),
        sample_chunk("a", 1, "data: x\n\n"),
        sample_request("b"),
    ];
    must(store.append(&first).await, "append");
    // Replaying an already-stored batch must not duplicate anything.
    must(store.append(&first).await, "replayed append");
    let page = must(store.read(None, 2).await, "read");
    assert_eq!(page.records.len(), 2, "page size honours max");
    assert_eq!(page.records[0].id(), "a:0");
    assert_eq!(page.records[1].id(), "a:1");
    let rest = must(store.read(page.position.as_deref(), 100).await, "read rest");
    assert_eq!(
        rest.records.iter().map(RawRecord::id).collect::<Vec<_>>(),
        vec!["b:0"]
    );
    let empty = must(
        store.read(rest.position.as_deref(), 100).await,
        "read at end",
    );
    assert!(empty.records.is_empty(), "nothing after the last record");
    assert_eq!(
        empty.position, rest.position,
        "an empty page keeps the position"
    );

    must(store.append(&[sample_end("a", 2)]).await, "append end");
    let next = must(store.read(rest.position.as_deref(), 100).await, "read new");
    assert_eq!(
        next.records.iter().map(RawRecord::id).collect::<Vec<_>>(),
        vec!["a:2"]
    );

    let a = must(store.read_request("a").await, "read_request");
    assert_eq!(
        a.iter().map(RawRecord::seq).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(
        a[1],
        sample_chunk("a", 1, "data: x\n\n"),
        "chunk bytes survive the store"
    );
    assert!(must(store.read_request("nope").await, "read_request").is_empty());
}

async fn checkpoints_round_trip(store: &dyn Store) {
    assert_eq!(must(store.load_checkpoint("p").await, "load"), None);
    let cp = Checkpoint {
        position: Some("42".into()),
        pending: vec![PendingRequest {
            request_id: "x".into(),
            first_seen: Utc::now(),
            end_seen: true,
        }],
    };
    must(store.save_checkpoint("p", &cp).await, "save");
    let mut cp2 = cp.clone();
    cp2.position = Some("43".into());
    must(store.save_checkpoint("p", &cp2).await, "overwrite");
    assert_eq!(must(store.load_checkpoint("p").await, "load"), Some(cp2));
    assert_eq!(
        must(store.load_checkpoint("other").await, "load other"),
        None
    );
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
    assert_eq!(rows[0].unpriced_requests, 1);
    assert_eq!(rows[1].consumer, "bob");
    assert_eq!(rows[1].unpriced_requests, 0);
    assert_eq!((rows[1].requests, rows[1].errors), (3, 2));
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
