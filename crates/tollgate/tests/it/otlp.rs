//! The OTLP export, received by an in-process OTLP/HTTP receiver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric;
use prost::Message;
use serde_json::json;
use tollgate_log_parser::OtlpSink;
use tollgate_telemetry::{OtlpConfig, UsageExporter};

use crate::harness::{self, request_id};

#[derive(Default)]
struct Received {
    logs: Vec<ExportLogsServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
}

type Shared = Arc<Mutex<Received>>;

async fn logs(State(r): State<Shared>, body: Bytes) -> Vec<u8> {
    r.lock()
        .unwrap()
        .logs
        .push(ExportLogsServiceRequest::decode(body).expect("valid OTLP logs"));
    ExportLogsServiceResponse::default().encode_to_vec()
}

async fn metrics(State(r): State<Shared>, body: Bytes) -> Vec<u8> {
    r.lock()
        .unwrap()
        .metrics
        .push(ExportMetricsServiceRequest::decode(body).expect("valid OTLP metrics"));
    ExportMetricsServiceResponse::default().encode_to_vec()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_records_are_exported_as_genai_logs_and_metrics() {
    let received: Shared = Arc::default();
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
    let s =
        harness::start_with_sinks(|_| {}, vec![Arc::new(OtlpSink::new(exporter.clone()))]).await;

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

    let chat_rec = s.record(&chat_id).await;
    let stream_rec = s.record(&stream_id).await;
    assert_export(
        &received.lock().unwrap(),
        &chat_id,
        &stream_id,
        &chat_rec,
        &stream_rec,
    );
    tokio::task::spawn_blocking(move || exporter.shutdown())
        .await
        .unwrap()
        .unwrap();
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
