//! The OTLP export, received by an in-process OTLP/HTTP receiver that can refuse log posts
//! (503) or answer them with a `partial_success`, to check that the parser's checkpoint waits
//! for the collector's acknowledgement and that metrics count each request once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use prost::Message;
use serde_json::json;
use tollgate_log_parser::{OtlpSink, Parser, ParserConfig, RecordSink, StoreSink};
use tollgate_records::{ConsolidatedRecord, RawRecord};
use tollgate_store::{ChangeFeed, RequestStore};
use tollgate_telemetry::{OtlpConfig, UsageExporter};

use crate::harness::{self, Stack, request_id};

/// How the receiver answers a log post.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Accept,
    Unavailable,
    /// 200 with a `partial_success` rejecting this many records.
    Reject(i64),
}

#[derive(Default)]
struct Received {
    /// Accepted log posts only: what a collector would have passed on.
    logs: Vec<ExportLogsServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    /// Answers to the next log posts; accept once it is empty.
    script: VecDeque<Answer>,
    log_posts: usize,
}

type Shared = Arc<Mutex<Received>>;

async fn logs(State(r): State<Shared>, body: Bytes) -> (StatusCode, Vec<u8>) {
    let request = ExportLogsServiceRequest::decode(body).expect("valid OTLP logs");
    let mut r = r.lock().unwrap();
    r.log_posts += 1;
    match r.script.pop_front().unwrap_or(Answer::Accept) {
        Answer::Accept => {
            r.logs.push(request);
            (
                StatusCode::OK,
                ExportLogsServiceResponse::default().encode_to_vec(),
            )
        }
        Answer::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            b"collector overloaded".to_vec(),
        ),
        Answer::Reject(n) => (
            StatusCode::OK,
            ExportLogsServiceResponse {
                partial_success: Some(ExportLogsPartialSuccess {
                    rejected_log_records: n,
                    error_message: "rejected by test".into(),
                }),
            }
            .encode_to_vec(),
        ),
    }
}

async fn metrics(State(r): State<Shared>, body: Bytes) -> Vec<u8> {
    r.lock()
        .unwrap()
        .metrics
        .push(ExportMetricsServiceRequest::decode(body).expect("valid OTLP metrics"));
    ExportMetricsServiceResponse::default().encode_to_vec()
}

/// Starts a receiver answering log posts with `script`, and an exporter pointed at it.
async fn receiver(script: &[Answer]) -> (Shared, Arc<UsageExporter>) {
    let received: Shared = Arc::new(Mutex::new(Received {
        script: script.iter().copied().collect(),
        ..Received::default()
    }));
    let app = Router::new()
        .route("/v1/logs", post(logs))
        .route("/v1/metrics", post(metrics))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = OtlpConfig::from_env(
        |k| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| format!("http://{addr}")),
        "tollgate-test",
    )
    .unwrap()
    .expect("endpoint set");
    let exporter = Arc::new(UsageExporter::new(&config).expect("exporter"));
    (received, exporter)
}

/// Pushes the metrics counted so far (the exporter's blocking metric client needs a blocking
/// thread).
async fn flush_metrics(exporter: &Arc<UsageExporter>) {
    let e = exporter.clone();
    tokio::task::spawn_blocking(move || e.flush())
        .await
        .unwrap()
        .unwrap();
}

async fn shutdown(exporter: Arc<UsageExporter>) {
    tokio::task::spawn_blocking(move || exporter.shutdown())
        .await
        .unwrap()
        .unwrap();
}

fn value(v: &Option<AnyValue>) -> Option<&any_value::Value> {
    v.as_ref().and_then(|v| v.value.as_ref())
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, any_value::Value> {
    kvs.iter()
        .filter_map(|kv| Some((kv.key.clone(), value(&kv.value)?.clone())))
        .collect()
}

fn int(v: Option<&any_value::Value>) -> i64 {
    match v {
        Some(any_value::Value::IntValue(i)) => *i,
        other => panic!("expected an int attribute, got {other:?}"),
    }
}

fn string(v: Option<&any_value::Value>) -> &str {
    match v {
        Some(any_value::Value::StringValue(s)) => s,
        other => panic!("expected a string attribute, got {other:?}"),
    }
}

fn boolean(v: Option<&any_value::Value>) -> bool {
    match v {
        Some(any_value::Value::BoolValue(b)) => *b,
        other => panic!("expected a bool attribute, got {other:?}"),
    }
}

/// Every accepted log record, in the order received.
fn log_records(got: &Received) -> Vec<&LogRecord> {
    got.logs
        .iter()
        .flat_map(|r| &r.resource_logs)
        .flat_map(|r| &r.scope_logs)
        .flat_map(|s| &s.log_records)
        .collect()
}

/// Accepted log records of one request.
fn logs_of(got: &Received, id: &str) -> Vec<HashMap<String, any_value::Value>> {
    log_records(got)
        .into_iter()
        .map(|l| attrs(&l.attributes))
        .filter(|a| a.get("tollgate.request.id").map(|v| string(Some(v))) == Some(id))
        .collect()
}

/// Totals of the last metrics export (the metrics are cumulative).
struct Totals {
    requests: f64,
    cost: f64,
    input_tokens: f64,
    output_tokens: f64,
    token_samples: u64,
    durations: u64,
}

fn totals(got: &Received) -> Totals {
    let last = got.metrics.last().expect("metrics exported");
    let named = |name: &str| {
        last.resource_metrics
            .iter()
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .find(|m| m.name == name)
    };
    let sum = |name: &str| -> f64 {
        match named(name).and_then(|m| m.data.as_ref()) {
            None => 0.0,
            Some(metric::Data::Sum(s)) => s
                .data_points
                .iter()
                .map(|p| match p.value {
                    Some(number_data_point::Value::AsInt(i)) => i as f64,
                    Some(number_data_point::Value::AsDouble(d)) => d,
                    None => 0.0,
                })
                .sum(),
            Some(other) => panic!("{name} is not a sum: {other:?}"),
        }
    };
    let histogram = |name: &str, kind: Option<&str>| -> (f64, u64) {
        match named(name).and_then(|m| m.data.as_ref()) {
            None => (0.0, 0),
            Some(metric::Data::Histogram(h)) => h
                .data_points
                .iter()
                .filter(|p| {
                    kind.is_none_or(|k| {
                        attrs(&p.attributes)
                            .get("gen_ai.token.type")
                            .map(|v| string(Some(v)))
                            == Some(k)
                    })
                })
                .fold((0.0, 0), |(s, c), p| {
                    (s + p.sum.unwrap_or(0.0), c + p.count)
                }),
            Some(other) => panic!("{name} is not a histogram: {other:?}"),
        }
    };
    let (input_tokens, input_samples) = histogram("gen_ai.client.token.usage", Some("input"));
    let (output_tokens, output_samples) = histogram("gen_ai.client.token.usage", Some("output"));
    Totals {
        requests: sum("tollgate.requests"),
        cost: sum("tollgate.cost"),
        input_tokens,
        output_tokens,
        token_samples: input_samples + output_samples,
        durations: histogram("gen_ai.client.operation.duration", None).1,
    }
}

/// The metrics hold each record exactly once.
fn assert_counted_once(got: &Received, records: &[ConsolidatedRecord]) {
    let t = totals(got);
    let usage = |f: fn(&tollgate_records::Usage) -> u64| -> f64 {
        records
            .iter()
            .filter_map(|r| r.usage.as_ref())
            .map(|u| f(u) as f64)
            .sum()
    };
    assert_eq!(t.requests, records.len() as f64, "one count per request");
    assert_eq!(t.input_tokens, usage(|u| u.input_tokens), "input tokens");
    assert_eq!(t.output_tokens, usage(|u| u.output_tokens), "output tokens");
    let cost: f64 = records
        .iter()
        .filter_map(|r| r.cost.as_ref())
        .map(|c| c.total.as_f64())
        .sum();
    assert!((t.cost - cost).abs() < 1e-9, "cost {} != {cost}", t.cost);
    assert_eq!(
        t.durations,
        records.iter().filter(|r| r.latency.is_some()).count() as u64,
        "one duration per request"
    );
}

/// Sends a plain chat, a stream (usage estimated) and a stream with AOAI's usage frame.
async fn three_requests(s: &Stack) -> Vec<String> {
    let mut ids = Vec::new();
    for (deployment, body) in [
        (
            "gpt-4o",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "gpt-4o-mini",
            json!({"messages": [{"role": "user", "content": "yo"}], "stream": true}),
        ),
        (
            "gpt-4o",
            json!({"messages": [{"role": "user", "content": "hey"}], "stream": true,
                   "stream_options": {"include_usage": true}}),
        ),
    ] {
        let resp = s.post(&s.chat_url(deployment), &body).send().await.unwrap();
        ids.push(request_id(&resp));
        resp.text().await.unwrap();
    }
    ids
}

async fn records(s: &Stack, ids: &[String]) -> Vec<ConsolidatedRecord> {
    let mut out = Vec::new();
    for id in ids {
        out.push(s.record(id).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_records_are_exported_as_genai_logs_and_metrics() {
    let (received, exporter) = receiver(&[]).await;
    let s = harness::start_with_sinks(
        // One of the streams is left to the estimate: both sources are exported.
        |c| c.stream_usage.inject = false,
        vec![Arc::new(OtlpSink::new(exporter.clone()))],
    )
    .await;

    let chat = s
        .post(
            &s.chat_url("gpt-4o"),
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    let chat_id = request_id(&chat);
    chat.text().await.unwrap();
    let stream = s
        .post(
            &s.chat_url("gpt-4o-mini"),
            &json!({"messages": [{"role": "user", "content": "yo"}], "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let stream_id = request_id(&stream);
    stream.text().await.unwrap();
    s.settle().await;
    flush_metrics(&exporter).await;

    let chat_rec = s.record(&chat_id).await;
    let stream_rec = s.record(&stream_id).await;
    assert_export(
        &received.lock().unwrap(),
        &chat_id,
        &stream_id,
        &chat_rec,
        &stream_rec,
    );
    shutdown(exporter).await;
}

fn assert_export(
    got: &Received,
    chat_id: &str,
    stream_id: &str,
    chat_rec: &tollgate_records::ConsolidatedRecord,
    stream_rec: &tollgate_records::ConsolidatedRecord,
) {
    let records: Vec<_> = got
        .logs
        .iter()
        .flat_map(|r| &r.resource_logs)
        .flat_map(|r| &r.scope_logs)
        .flat_map(|s| &s.log_records)
        .collect();
    assert_eq!(records.len(), 2, "one log record per request");
    let attrs_of = |id: &str| {
        records
            .iter()
            .map(|l| (l, attrs(&l.attributes)))
            .find(|(_, a)| a.get("tollgate.request.id").map(|v| string(Some(v))) == Some(id))
            .expect("log record for the request")
    };
    for (id, rec, source) in [
        (chat_id, chat_rec, "reported"),
        (stream_id, stream_rec, "estimated"),
    ] {
        let (log, a) = attrs_of(id);
        assert_eq!(log.event_name, "tollgate.request");
        assert_eq!(string(a.get("tollgate.usage.source")), source);
        let usage = rec.usage.as_ref().unwrap();
        assert_eq!(
            int(a.get("gen_ai.usage.input_tokens")),
            usage.input_tokens as i64
        );
        assert_eq!(
            int(a.get("gen_ai.usage.output_tokens")),
            usage.output_tokens as i64
        );
        assert_eq!(string(a.get("gen_ai.operation.name")), "chat");
        assert_eq!(string(a.get("gen_ai.provider.name")), "azure.ai.openai");
        assert_eq!(
            string(a.get("gen_ai.request.model")),
            rec.deployment.as_deref().unwrap()
        );
        assert_eq!(
            string(a.get("gen_ai.response.model")),
            rec.model.as_deref().unwrap()
        );
        assert_eq!(string(a.get("tollgate.consumer.id")), "tester");
        assert_eq!(int(a.get("http.response.status_code")), 200);
        assert_eq!(int(a.get("tollgate.record.revision")), rec.revision as i64);
        assert!(boolean(a.get("tollgate.complete")));
    }

    // Metrics are cumulative: the last export holds the totals.
    let last = got.metrics.last().expect("metrics exported");
    let metric_named = |name: &str| {
        last.resource_metrics
            .iter()
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .find(|m| m.name == name)
            .expect("metric exported")
    };
    let duration = metric_named("gen_ai.client.operation.duration");
    assert_eq!(duration.unit, "s");
    let Some(metric::Data::Histogram(d)) = &duration.data else {
        panic!("a histogram")
    };
    let seconds: f64 = [chat_rec, stream_rec]
        .iter()
        .map(|r| r.latency.as_ref().unwrap().total_ms / 1000.0)
        .sum();
    assert_eq!(
        d.data_points.iter().map(|p| p.count).sum::<u64>(),
        2,
        "one duration per request"
    );
    let exported: f64 = d.data_points.iter().map(|p| p.sum.unwrap_or(0.0)).sum();
    assert!(
        (exported - seconds).abs() < 1e-9,
        "{exported} s exported, {seconds} s recorded"
    );
    let token_metric = metric_named("gen_ai.client.token.usage");
    assert_eq!(token_metric.unit, "{token}");
    let Some(metric::Data::Histogram(h)) = &token_metric.data else {
        panic!("a histogram")
    };
    let sum_of = |kind: &str| -> f64 {
        h.data_points
            .iter()
            .filter(|p| {
                attrs(&p.attributes)
                    .get("gen_ai.token.type")
                    .map(|v| string(Some(v)))
                    == Some(kind)
            })
            .map(|p| p.sum.unwrap_or(0.0))
            .sum()
    };
    let (cu, su) = (
        chat_rec.usage.clone().unwrap(),
        stream_rec.usage.clone().unwrap(),
    );
    assert_eq!(sum_of("input"), (cu.input_tokens + su.input_tokens) as f64);
    assert_eq!(
        sum_of("output"),
        (cu.output_tokens + su.output_tokens) as f64
    );
}

/// The checkpoint the harness's parser saved (the feed's beginning before it saved one).
async fn checkpoint(s: &Stack) -> tollgate_store::Checkpoint {
    tollgate_store::load_checkpoint(
        s.store.as_ref(),
        &ParserConfig::default().checkpoint_name,
        tollgate_store::embedded::UNIT,
    )
    .await
    .unwrap()
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_outage_holds_the_checkpoint_and_inflates_nothing() {
    const REFUSED: usize = 3;
    let (received, exporter) = receiver(&[Answer::Unavailable; REFUSED]).await;
    let s = harness::start_with_sinks(
        // One of the streams is left to the estimate: both sources are exported.
        |c| c.stream_usage.inject = false,
        vec![Arc::new(OtlpSink::new(exporter.clone()))],
    )
    .await;
    let ids = three_requests(&s).await;
    s.proxy.flush().await;

    let before = checkpoint(&s).await;
    for attempt in 1..=REFUSED {
        let err = s
            .parser
            .run_once()
            .await
            .expect_err("the pass fails while the collector refuses");
        assert!(err.to_string().contains("503"), "{err}");
        assert_eq!(
            checkpoint(&s).await,
            before,
            "the checkpoint stays put after failed pass {attempt}"
        );
    }
    assert_eq!(received.lock().unwrap().log_posts, REFUSED);

    // The collector is back: the same requests are delivered again, and this time taken.
    s.parser.catch_up().await.expect("the parser catches up");
    let after = checkpoint(&s).await;
    assert_ne!(after, before, "a checkpoint is saved");
    assert!(after.pending.is_empty());
    flush_metrics(&exporter).await;

    let recs = records(&s, &ids).await;
    {
        let got = received.lock().unwrap();
        for r in &recs {
            let logs = logs_of(&got, &r.id);
            assert_eq!(logs.len(), 1, "{} delivered once", r.id);
            assert_eq!(
                int(logs[0].get("tollgate.record.revision")),
                r.revision as i64
            );
        }
        assert_counted_once(&got, &recs);
        assert_eq!(
            totals(&got).token_samples,
            6,
            "one sample per request and kind"
        );
    }
    shutdown(exporter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_success_with_rejected_records_fails_the_pass() {
    let (received, exporter) = receiver(&[Answer::Reject(1)]).await;
    let s = harness::start_with_sinks(
        // One of the streams is left to the estimate: both sources are exported.
        |c| c.stream_usage.inject = false,
        vec![Arc::new(OtlpSink::new(exporter.clone()))],
    )
    .await;
    let ids = three_requests(&s).await;
    s.proxy.flush().await;

    let before = checkpoint(&s).await;
    let err = s
        .parser
        .run_once()
        .await
        .expect_err("a rejected record is not an acknowledgement");
    assert!(err.to_string().contains("rejected 1"), "{err}");
    assert_eq!(checkpoint(&s).await, before, "the checkpoint stays put");

    s.parser.catch_up().await.expect("the parser catches up");
    let after = checkpoint(&s).await;
    assert!(after.position.is_some() && after.pending.is_empty());
    flush_metrics(&exporter).await;
    let recs = records(&s, &ids).await;
    {
        let got = received.lock().unwrap();
        assert_eq!(got.log_posts, 2);
        for r in &recs {
            assert_eq!(logs_of(&got, &r.id).len(), 1);
        }
        assert_counted_once(&got, &recs);
    }
    shutdown(exporter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_record_then_its_complete_record_counts_the_request_once() {
    // Real raw records, from a request through the proxy.
    let s = harness::start(|_| {}).await;
    let plain = json!({"messages": [{"role": "user", "content": "hi"}]});
    let resp = s.post(&s.chat_url("gpt-4o"), &plain).send().await.unwrap();
    let plain_id = request_id(&resp);
    resp.text().await.unwrap();
    let usage_frame = json!({"messages": [{"role": "user", "content": "hey"}], "stream": true,
                             "stream_options": {"include_usage": true}});
    let resp = s
        .post(&s.chat_url("gpt-4o"), &usage_frame)
        .send()
        .await
        .unwrap();
    let stream_id = request_id(&resp);
    resp.text().await.unwrap();
    s.proxy.flush().await;
    let ids = [plain_id, stream_id];
    let mut early = Vec::new();
    let mut ends = Vec::new();
    for id in &ids {
        let (end, rest): (Vec<RawRecord>, Vec<RawRecord>) = s
            .raw(id)
            .await
            .into_iter()
            .partition(|r| matches!(r, RawRecord::End(_)));
        assert_eq!(end.len(), 1);
        early.extend(rest);
        ends.extend(end);
    }

    // A parser of its own over a second store, which gets everything but the `end` records
    // first, and gives up waiting for them at once.
    let dir = tempfile::tempdir().unwrap();
    let store = tollgate_store::open(&tollgate_store::StoreConfig::embedded(dir.path()))
        .await
        .unwrap();
    store.append(&early).await.unwrap();
    let (received, exporter) = receiver(&[]).await;
    let sinks: Vec<Arc<dyn RecordSink>> = vec![
        Arc::new(StoreSink::new(store.clone() as Arc<dyn RequestStore>)),
        Arc::new(OtlpSink::new(exporter.clone())),
    ];
    let config = ParserConfig {
        incomplete_after_ms: 0,
        deployment_models: s
            .sim
            .config()
            .deployments
            .iter()
            .map(|d| (d.name.clone(), d.model.clone()))
            .collect(),
        ..ParserConfig::default()
    };
    let parser = Parser::new(config, store.clone() as Arc<dyn ChangeFeed>, sinks).unwrap();
    // The first pass notes the requests as pending; a later one finds them overdue.
    for _ in 0..1000 {
        parser.run_once().await.unwrap();
        if parser.stats().incomplete == 2 {
            break;
        }
    }
    assert_eq!(parser.stats().incomplete, 2, "both recorded as incomplete");
    let mut incomplete = Vec::new();
    for id in &ids {
        let r = store.get(id).await.unwrap().unwrap();
        assert!(!r.complete);
        incomplete.push(r);
    }

    // The `end` records arrive late: the complete records supersede the incomplete ones.
    store.append(&ends).await.unwrap();
    parser.catch_up().await.unwrap();
    // A pass delivered again (here: the same records once more) changes nothing.
    let mut complete = Vec::new();
    for id in &ids {
        let r = store.get(id).await.unwrap().unwrap();
        assert!(r.complete);
        complete.push(r);
    }
    OtlpSink::new(exporter.clone())
        .write(&complete)
        .await
        .unwrap();
    flush_metrics(&exporter).await;

    {
        let got = received.lock().unwrap();
        for (early, late) in incomplete.iter().zip(&complete) {
            let logs = logs_of(&got, &late.id);
            assert_eq!(logs.len(), 2, "the incomplete and the complete record");
            let revisions: Vec<i64> = logs
                .iter()
                .map(|a| int(a.get("tollgate.record.revision")))
                .collect();
            assert_eq!(revisions, vec![early.revision as i64, late.revision as i64]);
            assert!(revisions[0] < revisions[1], "the revision increases");
            assert!(!boolean(logs[0].get("tollgate.complete")));
            assert!(boolean(logs[1].get("tollgate.complete")));
        }
        // The plain request's incomplete record had no usage; the stream's had AOAI's usage
        // frame already: either way the totals are the complete records', counted once.
        assert!(incomplete[0].usage.is_none());
        assert_eq!(incomplete[1].usage, complete[1].usage);
        assert_counted_once(&got, &complete);
    }
    shutdown(exporter).await;
}
