//! The parser against the embedded store: restarts, incomplete requests, ordering.
#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::sync::Arc;

use serde_json::json;
use tollgate_log_parser::{Parser, ParserConfig, RecordSink, StoreSink};
use tollgate_records::{Body, RawRecord, UsageSource};
use tollgate_store::conformance::{sample_chunk, sample_end, sample_request};
use tollgate_store::{ChangeFeed, RequestStore, Store, StoreConfig};

async fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = tollgate_store::open(&StoreConfig::embedded(dir.path()))
        .await
        .unwrap();
    (dir, store)
}

fn parser(store: &Arc<dyn Store>, config: ParserConfig) -> Parser {
    let sinks: Vec<Arc<dyn RecordSink>> = vec![Arc::new(StoreSink::new(
        store.clone() as Arc<dyn RequestStore>
    ))];
    Parser::new(config, store.clone() as Arc<dyn ChangeFeed>, sinks).unwrap()
}

fn chat_request(id: &str) -> RawRecord {
    let RawRecord::Request(mut r) = sample_request(id) else {
        unreachable!()
    };
    r.body = Body::json(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}));
    RawRecord::Request(r)
}

fn sse_end(id: &str, segments: u32) -> RawRecord {
    let RawRecord::End(mut e) = sample_end(id, segments + 1) else {
        unreachable!()
    };
    e.content_type = Some("text/event-stream".into());
    RawRecord::End(e)
}

const FRAME_A: &str = "data: {\"id\":\"c\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"}}]}\n\n";
const FRAME_B: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";

#[tokio::test]
async fn a_restarted_parser_finishes_requests_it_saw_start() {
    let (_dir, store) = store().await;
    store
        .append(&[chat_request("r1"), sample_chunk("r1", 1, FRAME_A)])
        .await
        .unwrap();
    let first = parser(&store, ParserConfig::default());
    first.catch_up().await.unwrap();
    assert!(
        store.get("r1").await.unwrap().is_none(),
        "not finished without its end"
    );
    let cp = store.load_checkpoint("log-parser").await.unwrap().unwrap();
    assert_eq!(
        cp.pending.len(),
        1,
        "the unfinished request is in the checkpoint"
    );
    drop(first);

    // The rest arrives while no parser runs; a new one picks up from the checkpoint.
    store
        .append(&[sample_chunk("r1", 2, FRAME_B), sse_end("r1", 2)])
        .await
        .unwrap();
    let second = parser(&store, ParserConfig::default());
    second.catch_up().await.unwrap();
    let r = store
        .get("r1")
        .await
        .unwrap()
        .expect("consolidated after restart");
    assert!(r.complete);
    assert_eq!(r.choices[0].content.as_deref(), Some("Hello"));
    assert_eq!(r.usage.unwrap().source, UsageSource::Estimated);
    assert_eq!(second.stats().consolidated, 1);
    assert!(
        store
            .load_checkpoint("log-parser")
            .await
            .unwrap()
            .unwrap()
            .pending
            .is_empty()
    );
}

#[tokio::test]
async fn end_before_a_segment_waits_for_the_segment() {
    let (_dir, store) = store().await;
    // A spool replay can land the end before one of the segments.
    store
        .append(&[
            chat_request("r2"),
            sample_chunk("r2", 1, FRAME_A),
            sse_end("r2", 2),
        ])
        .await
        .unwrap();
    let p = parser(&store, ParserConfig::default());
    p.catch_up().await.unwrap();
    assert!(
        store.get("r2").await.unwrap().is_none(),
        "a missing segment holds the request back"
    );
    store
        .append(&[sample_chunk("r2", 2, FRAME_B)])
        .await
        .unwrap();
    p.catch_up().await.unwrap();
    let r = store.get("r2").await.unwrap().unwrap();
    assert!(r.complete);
    assert_eq!(r.choices[0].content.as_deref(), Some("Hello"));
}

#[tokio::test]
async fn requests_without_an_end_are_recorded_incomplete_after_the_deadline() {
    let (_dir, store) = store().await;
    store
        .append(&[chat_request("r3"), sample_chunk("r3", 1, FRAME_A)])
        .await
        .unwrap();
    let p = parser(
        &store,
        ParserConfig {
            incomplete_after_ms: 0,
            ..ParserConfig::default()
        },
    );
    p.catch_up().await.unwrap();
    // The deadline is checked on every pass, including the empty one that ends a catch-up.
    p.run_once().await.unwrap();
    let r = store
        .get("r3")
        .await
        .unwrap()
        .expect("recorded as incomplete");
    assert!(!r.complete);
    assert_eq!(r.status, None);
    assert_eq!(r.error.as_ref().unwrap().code, "Incomplete");
    assert_eq!(
        r.choices[0].content.as_deref(),
        Some("Hel"),
        "what arrived is kept"
    );
    assert_eq!(p.stats().incomplete, 1);

    // If the end turns up after all, the full record replaces the incomplete one.
    store
        .append(&[sample_chunk("r3", 2, FRAME_B), sse_end("r3", 2)])
        .await
        .unwrap();
    p.catch_up().await.unwrap();
    let r = store.get("r3").await.unwrap().unwrap();
    assert!(r.complete);
    assert_eq!(r.choices[0].content.as_deref(), Some("Hello"));
}

#[tokio::test]
async fn replaying_the_feed_does_not_double_count() {
    let (_dir, store) = store().await;
    store
        .append(&[
            chat_request("r4"),
            sample_chunk("r4", 1, FRAME_A),
            sample_chunk("r4", 2, FRAME_B),
            sse_end("r4", 2),
        ])
        .await
        .unwrap();
    parser(&store, ParserConfig::default())
        .catch_up()
        .await
        .unwrap();
    // A parser with a fresh checkpoint name replays everything from the beginning.
    let replay = parser(
        &store,
        ParserConfig {
            checkpoint_name: "other".into(),
            ..ParserConfig::default()
        },
    );
    replay.catch_up().await.unwrap();
    let rows = store.usage(&Default::default()).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.requests).sum::<u64>(), 1);
}
