//! The usage exporter: one OTLP log record per consolidated record, sent with an awaited,
//! checked result, and the usage metrics counted only after the collector accepted the log
//! record.
//!
//! Why not the SDK's logger: its batch processor exports on its own thread, drops records past
//! its queue, and `force_flush` reports only part of what happened; its HTTP exporter logs a
//! `partial_success` instead of failing. The parser may advance its checkpoint only when the
//! collector took every record, so this module builds the `ExportLogsServiceRequest` itself and
//! POSTs it (OTLP/HTTP, `application/x-protobuf`): a 2xx whose body reports no rejected records
//! is the acknowledgement; any other status, a transport error, a timeout or rejected records
//! fail the whole call. There is no retry here: the parser delivers the batch again.
//!
//! A batch is split into requests of at most `max_records_per_request` records, sent in order;
//! the call fails at the first request that fails, and records of the requests acknowledged
//! before it are counted (see [`crate::ledger`]) and not sent again when the batch returns.
//!
//! Metrics stay with the SDK's periodic reader: they are cumulative, so an export that fails
//! is made good by the next one, and nothing is counted twice by a retry.
//!
//! Residual double counting: the ledger lives in memory. After a restart of the process, a
//! batch that was acknowledged but whose checkpoint was not saved yet (a crash in between, or
//! another sink failing) is exported and counted again, and a complete record superseding an
//! incomplete one exported before the restart counts the request a second time. The log
//! records carry `tollgate.record.revision`, so queries over logs keep one record per request
//! (queries/kql); the metrics can over-count in those cases only.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue as ProtoKeyValue, any_value,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use prost::Message as _;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use tollgate_records::ConsolidatedRecord;

use crate::ledger::{Delta, Ledger};
use crate::{OtlpConfig, TelemetryError, genai_attributes, metric_attributes};

const PROTOBUF: &str = "application/x-protobuf";
/// Name of the instrumentation scope of the usage log records and metrics.
const SCOPE: &str = "tollgate";
/// How much of a failed response's body goes into the error message.
const ERROR_BODY_CHARS: usize = 300;

struct Instruments {
    tokens: Histogram<u64>,
    duration: Histogram<f64>,
    cost: Counter<f64>,
    requests: Counter<u64>,
}

/// Exports one OTLP log record per request plus token, duration and cost metrics.
pub struct UsageExporter {
    http: reqwest::Client,
    logs_endpoint: reqwest::Url,
    max_records_per_request: usize,
    max_response_bytes: usize,
    resource: ProtoResource,
    metrics: SdkMeterProvider,
    instruments: Instruments,
    ledger: Mutex<Ledger>,
}

impl UsageExporter {
    pub fn new(config: &OtlpConfig) -> Result<Self, TelemetryError> {
        if config.max_records_per_request == 0 {
            return Err(TelemetryError::Config(
                "max_records_per_request must be greater than 0".into(),
            ));
        }
        let logs_endpoint = reqwest::Url::parse(&config.logs_endpoint).map_err(|e| {
            TelemetryError::Config(format!("logs endpoint {}: {e}", config.logs_endpoint))
        })?;
        let mut headers = HeaderMap::new();
        for (k, v) in &config.headers {
            let name = HeaderName::try_from(k.as_str())
                .map_err(|e| TelemetryError::Config(format!("header name {k:?}: {e}")))?;
            // The value is not echoed: headers usually carry credentials.
            let mut value = HeaderValue::try_from(v.as_str())
                .map_err(|e| TelemetryError::Config(format!("header {k:?} value: {e}")))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_millis(config.timeout_ms))
            .build()
            .map_err(|e| TelemetryError::Build(e.to_string()))?;

        let metrics_config = config.clone();
        // The blocking HTTP client of the metric exporter owns a runtime of its own, which must
        // not be created (or later dropped) on a tokio worker; building on a plain thread avoids
        // both.
        let metric_exporter = std::thread::spawn(move || {
            opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(metrics_config.metrics_endpoint.clone())
                .with_headers(metrics_config.headers.clone())
                .with_timeout(Duration::from_millis(metrics_config.timeout_ms))
                .build()
                .map_err(|e| TelemetryError::Build(e.to_string()))
        })
        .join()
        .map_err(|_| TelemetryError::Build("exporter thread panicked".into()))??;
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let reader = PeriodicReader::builder(metric_exporter)
            .with_interval(Duration::from_millis(config.metrics_interval_ms))
            .build();
        let metrics = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(reader)
            .build();
        let meter = metrics.meter(SCOPE);
        let instruments = Instruments {
            tokens: meter
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Tokens used per request, by gen_ai.token.type.")
                .build(),
            duration: meter
                .f64_histogram("gen_ai.client.operation.duration")
                .with_unit("s")
                .with_description("Duration of each request as seen by Tollgate.")
                .build(),
            cost: meter
                .f64_counter("tollgate.cost")
                .with_description("Cost of requests, in the price table's currency.")
                .build(),
            requests: meter
                .u64_counter("tollgate.requests")
                .with_description("Requests recorded.")
                .build(),
        };
        Ok(UsageExporter {
            http,
            logs_endpoint,
            max_records_per_request: config.max_records_per_request,
            max_response_bytes: config.max_response_bytes,
            resource: ProtoResource {
                attributes: vec![proto_kv(KeyValue::new(
                    "service.name",
                    config.service_name.clone(),
                ))],
                ..Default::default()
            },
            metrics,
            instruments,
            ledger: Mutex::new(crate::ledger::Ledger::new(config.ledger)),
        })
    }

    /// Exports the records' log records and returns `Ok` only once the collector accepted every
    /// one of them; each record's metrics are counted as soon as its log record was accepted.
    /// Records already acknowledged at the same or a later revision are skipped, so a batch
    /// delivered again neither duplicates log records nor inflates metrics.
    pub async fn export(&self, records: &[ConsolidatedRecord]) -> Result<(), TelemetryError> {
        let fresh: Vec<&ConsolidatedRecord> = {
            let ledger = self.ledger();
            records.iter().filter(|r| ledger.needs_export(r)).collect()
        };
        for chunk in fresh.chunks(self.max_records_per_request) {
            self.post(self.request(chunk)).await?;
            let deltas: Vec<(&ConsolidatedRecord, Delta)> = {
                let mut ledger = self.ledger();
                chunk
                    .iter()
                    .filter_map(|r| Some((*r, ledger.acknowledge(r)?)))
                    .collect()
            };
            for (r, delta) in deltas {
                self.count(r, delta);
            }
        }
        Ok(())
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // The ledger is left consistent at every step, so a poisoned lock is still usable.
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request(&self, records: &[&ConsolidatedRecord]) -> ExportLogsServiceRequest {
        let observed = nanos(SystemTime::now());
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(self.resource.clone()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: SCOPE.to_owned(),
                        ..Default::default()
                    }),
                    log_records: records.iter().map(|r| log_record(r, observed)).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    async fn post(&self, request: ExportLogsServiceRequest) -> Result<(), TelemetryError> {
        let sent = request
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .map(|s| s.log_records.len())
            .sum::<usize>();
        let mut response = self
            .http
            .post(self.logs_endpoint.clone())
            .header(CONTENT_TYPE, PROTOBUF)
            .body(request.encode_to_vec())
            .send()
            .await
            .map_err(|e| TelemetryError::Export(format!("logs export: {}", causes(&e))))?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| TelemetryError::Export(format!("logs export response: {}", causes(&e))))?
        {
            if body.len() + chunk.len() > self.max_response_bytes {
                return Err(TelemetryError::Export(format!(
                    "logs export: the collector's response ({status}) exceeds {} bytes",
                    self.max_response_bytes
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let text: String = String::from_utf8_lossy(&body)
                .chars()
                .take(ERROR_BODY_CHARS)
                .collect();
            return Err(TelemetryError::Export(format!(
                "logs export of {sent} records: the collector answered {status}: {text}"
            )));
        }
        // An empty body is the default message: everything accepted.
        let answer = ExportLogsServiceResponse::decode(body.as_slice()).map_err(|e| {
            TelemetryError::Export(format!(
                "logs export: the collector's {status} response is not an OTLP protobuf answer: {e}"
            ))
        })?;
        if let Some(partial) = answer.partial_success
            && partial.rejected_log_records != 0
        {
            return Err(TelemetryError::Export(format!(
                "logs export: the collector rejected {} of {sent} records: {}",
                partial.rejected_log_records, partial.error_message
            )));
        }
        Ok(())
    }

    fn count(&self, r: &ConsolidatedRecord, delta: Delta) {
        let attrs = metric_attributes(r);
        let i = &self.instruments;
        if delta.request {
            i.requests.add(1, &attrs);
        }
        for (kind, tokens) in [
            ("input", delta.input_tokens),
            ("output", delta.output_tokens),
        ] {
            if let Some(tokens) = tokens {
                let mut a = attrs.clone();
                a.push(KeyValue::new("gen_ai.token.type", kind));
                i.tokens.record(tokens, &a);
            }
        }
        if let Some(s) = delta.duration_s {
            i.duration.record(s, &attrs);
        }
        if let Some(c) = delta.cost {
            // The counter is a double; each increase is an exact amount.
            i.cost.add(c.as_f64(), &attrs);
        }
    }

    /// Blocks until the metrics counted so far were pushed. Log records need no flush: `export`
    /// returns only after the collector answered. Call from a blocking context.
    pub fn flush(&self) -> Result<(), TelemetryError> {
        self.metrics
            .force_flush()
            .map_err(|e| TelemetryError::Export(e.to_string()))
    }

    /// Pushes the metrics a last time and stops the reader. Call from a blocking context.
    pub fn shutdown(&self) -> Result<(), TelemetryError> {
        self.metrics
            .shutdown()
            .map_err(|e| TelemetryError::Export(e.to_string()))
    }
}

/// The error and its sources: reqwest's own message omits the cause (refused, timed out, ...).
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn log_record(r: &ConsolidatedRecord, observed: u64) -> LogRecord {
    let failed = r.error.is_some() || r.status.is_none_or(|s| s >= 400);
    let (severity, text) = if failed {
        (SeverityNumber::Warn, "WARN")
    } else {
        (SeverityNumber::Info, "INFO")
    };
    LogRecord {
        time_unix_nano: nanos(SystemTime::from(r.time)),
        observed_time_unix_nano: observed,
        severity_number: severity as i32,
        severity_text: text.to_owned(),
        event_name: "tollgate.request".to_owned(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(format!(
                "{} {} by {} -> {}",
                r.operation,
                r.deployment.as_deref().unwrap_or("-"),
                r.consumer.id,
                r.status
                    .map_or_else(|| "incomplete".to_owned(), |s| s.to_string())
            ))),
        }),
        attributes: genai_attributes(r).into_iter().map(proto_kv).collect(),
        ..Default::default()
    }
}

fn proto_kv(kv: KeyValue) -> ProtoKeyValue {
    ProtoKeyValue {
        key: kv.key.as_str().to_owned(),
        value: Some(proto_value(kv.value)),
        ..Default::default()
    }
}

fn proto_value(v: opentelemetry::Value) -> AnyValue {
    use opentelemetry::{Array, Value};
    let string = |s: String| any_value::Value::StringValue(s);
    let array = |values: Vec<any_value::Value>| {
        any_value::Value::ArrayValue(ArrayValue {
            values: values
                .into_iter()
                .map(|v| AnyValue { value: Some(v) })
                .collect(),
        })
    };
    let value = match v {
        Value::Bool(b) => any_value::Value::BoolValue(b),
        Value::I64(i) => any_value::Value::IntValue(i),
        Value::F64(f) => any_value::Value::DoubleValue(f),
        Value::String(s) => string(s.to_string()),
        Value::Array(Array::String(items)) => {
            array(items.into_iter().map(|s| string(s.to_string())).collect())
        }
        Value::Array(Array::I64(items)) => {
            array(items.into_iter().map(any_value::Value::IntValue).collect())
        }
        Value::Array(Array::F64(items)) => array(
            items
                .into_iter()
                .map(any_value::Value::DoubleValue)
                .collect(),
        ),
        Value::Array(Array::Bool(items)) => {
            array(items.into_iter().map(any_value::Value::BoolValue).collect())
        }
        other => string(other.to_string()),
    };
    AnyValue { value: Some(value) }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap as AxumHeaders, StatusCode};
    use axum::routing::post;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsPartialSuccess;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::ledger::tests::record;

    #[derive(Clone, Copy)]
    enum Answer {
        Accept,
        Status(u16),
        Reject(i64),
    }

    #[derive(Default)]
    struct Receiver {
        /// Answers to the next posts; accept once it is empty.
        script: VecDeque<Answer>,
        posts: usize,
        /// Request ids of every accepted post, one list per post.
        accepted: Vec<Vec<String>>,
        tokens: Vec<Option<String>>,
    }

    type Shared = Arc<Mutex<Receiver>>;

    async fn logs(
        State(r): State<Shared>,
        headers: AxumHeaders,
        body: Bytes,
    ) -> (StatusCode, Vec<u8>) {
        let req = ExportLogsServiceRequest::decode(body).unwrap();
        let ids: Vec<String> = req
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .flat_map(|s| &s.log_records)
            .map(|l| {
                let id = l
                    .attributes
                    .iter()
                    .find(|kv| kv.key == "tollgate.request.id")
                    .and_then(|kv| kv.value.clone())
                    .and_then(|v| v.value);
                match id {
                    Some(any_value::Value::StringValue(s)) => s,
                    other => panic!("request id attribute: {other:?}"),
                }
            })
            .collect();
        let mut r = r.lock().unwrap();
        r.posts += 1;
        r.tokens.push(
            headers
                .get("x-token")
                .map(|v| v.to_str().unwrap().to_owned()),
        );
        match r.script.pop_front().unwrap_or(Answer::Accept) {
            Answer::Accept => {
                r.accepted.push(ids);
                (
                    StatusCode::OK,
                    ExportLogsServiceResponse::default().encode_to_vec(),
                )
            }
            Answer::Status(s) => (
                StatusCode::from_u16(s).unwrap(),
                b"collector unavailable".to_vec(),
            ),
            Answer::Reject(n) => (
                StatusCode::OK,
                ExportLogsServiceResponse {
                    partial_success: Some(ExportLogsPartialSuccess {
                        rejected_log_records: n,
                        error_message: "attribute too long".into(),
                    }),
                }
                .encode_to_vec(),
            ),
        }
    }

    async fn receiver(script: &[Answer], tasks: &TaskTracker) -> (Shared, OtlpConfig) {
        let shared: Shared = Arc::new(Mutex::new(Receiver {
            script: script.iter().copied().collect(),
            ..Receiver::default()
        }));
        let app = Router::new()
            .route("/v1/logs", post(logs))
            .route("/v1/metrics", post(|| async { StatusCode::OK }))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tasks.spawn(async move { axum::serve(listener, app).await });
        let config = OtlpConfig::from_env(
            |k| match k {
                crate::env::ENDPOINT => Some(format!("http://{addr}")),
                crate::env::MAX_EXPORT_BATCH_SIZE => Some("2".into()),
                crate::env::HEADERS => Some("x-token=secret".into()),
                _ => None,
            },
            "test",
        )
        .unwrap()
        .unwrap();
        (shared, config)
    }

    async fn stop(exporter: UsageExporter) {
        tokio::task::spawn_blocking(move || exporter.shutdown())
            .await
            .unwrap()
            .unwrap();
    }

    fn batch(n: usize) -> Vec<ConsolidatedRecord> {
        (0..n)
            .map(|i| record(&format!("r{i}"), true, 3, (1, 1)))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_split_and_acknowledged_only_when_every_request_was_accepted() {
        let tasks = TaskTracker::new();
        // Of three requests (2 + 2 + 1 records), the second is refused once.
        let (rx, config) = receiver(&[Answer::Accept, Answer::Status(503)], &tasks).await;
        let exporter = UsageExporter::new(&config).unwrap();
        let records = batch(5);
        let err = exporter.export(&records).await.unwrap_err();
        assert!(err.to_string().contains("503"), "{err}");
        assert_eq!(rx.lock().unwrap().accepted, vec![vec!["r0", "r1"]]);

        // Delivered again: what was accepted is not sent again.
        exporter.export(&records).await.unwrap();
        {
            let r = rx.lock().unwrap();
            assert_eq!(
                r.accepted,
                vec![vec!["r0", "r1"], vec!["r2", "r3"], vec!["r4"]]
            );
            assert_eq!(r.posts, 4);
            assert!(r.tokens.iter().all(|t| t.as_deref() == Some("secret")));
        }
        // And once acknowledged, a third delivery sends nothing.
        exporter.export(&records).await.unwrap();
        assert_eq!(rx.lock().unwrap().posts, 4);
        stop(exporter).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partial_success_with_rejected_records_is_a_failure() {
        let tasks = TaskTracker::new();
        let (rx, config) = receiver(&[Answer::Reject(1)], &tasks).await;
        let exporter = UsageExporter::new(&config).unwrap();
        let records = batch(2);
        let err = exporter.export(&records).await.unwrap_err();
        assert!(
            err.to_string().contains("rejected 1 of 2"),
            "names the rejection: {err}"
        );
        assert!(rx.lock().unwrap().accepted.is_empty());
        exporter.export(&records).await.unwrap();
        assert_eq!(rx.lock().unwrap().accepted, vec![vec!["r0", "r1"]]);
        stop(exporter).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_higher_revision_is_exported_again_a_lower_one_is_not() {
        let tasks = TaskTracker::new();
        let (rx, config) = receiver(&[], &tasks).await;
        let exporter = UsageExporter::new(&config).unwrap();
        let partial = record("a", false, 2, (5, 1));
        let full = record("a", true, 5, (5, 9));
        exporter
            .export(std::slice::from_ref(&partial))
            .await
            .unwrap();
        exporter.export(std::slice::from_ref(&full)).await.unwrap();
        exporter
            .export(std::slice::from_ref(&partial))
            .await
            .unwrap();
        assert_eq!(rx.lock().unwrap().accepted, vec![vec!["a"], vec!["a"]]);
        stop(exporter).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_collector_fails_the_export() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let config = OtlpConfig::from_env(
            |k| (k == crate::env::ENDPOINT).then(|| format!("http://{addr}")),
            "test",
        )
        .unwrap()
        .unwrap();
        let exporter = UsageExporter::new(&config).unwrap();
        let err = exporter.export(&batch(1)).await.unwrap_err().to_string();
        assert!(err.contains("refused"), "the cause is named: {err}");
        // Nothing was acknowledged, so nothing is remembered as exported.
        assert!(exporter.ledger().needs_export(&batch(1)[0]));
        drop(tokio::task::spawn_blocking(move || exporter.shutdown()).await);
    }

    #[test]
    fn log_records_carry_the_revision_and_completeness() {
        let r = record("a", false, 2, (5, 1));
        let log = log_record(&r, 7);
        let attr = |k: &str| {
            log.attributes
                .iter()
                .find(|kv| kv.key == k)
                .and_then(|kv| kv.value.clone())
                .and_then(|v| v.value)
        };
        assert_eq!(
            attr("tollgate.record.revision"),
            Some(any_value::Value::IntValue(2))
        );
        assert_eq!(
            attr("tollgate.complete"),
            Some(any_value::Value::BoolValue(false))
        );
        assert_eq!(log.event_name, "tollgate.request");
        assert_eq!(log.severity_number, SeverityNumber::Warn as i32);
        assert_eq!(log.observed_time_unix_nano, 7);
        assert_eq!(log.time_unix_nano, 1_767_323_045_000_000_000);
    }
}
