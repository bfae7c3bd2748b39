//! Telemetry for Tollgate's processes: `tracing` setup for our own logs, the OTLP exporter for
//! usage records, and the one mapping from a consolidated record to OpenTelemetry GenAI
//! semantic-convention attributes.
//!
//! Export is over OTLP/HTTP with protobuf (the OTLP default protocol), configured from the
//! standard `OTEL_EXPORTER_OTLP_*` variables; with none set, export is off. Log records are
//! sent with a checked, awaited result and metrics counted once per request after their log
//! record was accepted (`export`, `ledger`).
//!
//! Must not: depend on the services; read the environment except through
//! [`OtlpConfig::from_env`] with a caller-supplied lookup.

mod export;
mod ledger;

use std::collections::HashMap;

use opentelemetry::KeyValue;
use tollgate_records::{ConsolidatedRecord, UsageSource};

pub use export::UsageExporter;
pub use ledger::LedgerLimits;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP configuration is invalid: {0}")]
    Config(String),
    #[error("OTLP exporter could not be built: {0}")]
    Build(String),
    #[error("OTLP export failed: {0}")]
    Export(String),
}

/// Where usage records are exported.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// Full URL for logs, e.g. `http://collector:4318/v1/logs`.
    pub logs_endpoint: String,
    /// Full URL for metrics, e.g. `http://collector:4318/v1/metrics`.
    pub metrics_endpoint: String,
    pub headers: HashMap<String, String>,
    pub service_name: String,
    /// How often metrics are pushed.
    pub metrics_interval_ms: u64,
    /// Timeout of one export request (connect to answer).
    pub timeout_ms: u64,
    /// Log records per export request; a larger batch is sent as several requests.
    pub max_records_per_request: usize,
    /// Largest collector answer read; a larger one fails the export.
    pub max_response_bytes: usize,
    /// How many requests the exporter remembers to keep metrics from counting one twice.
    pub ledger: LedgerLimits,
}

/// Defaults of the limits [`OtlpConfig::from_env`] reads.
pub mod defaults {
    /// The OTLP exporters' default timeout.
    pub const TIMEOUT_MS: u64 = 10_000;
    /// The SDK batch log processor's default export batch size.
    pub const MAX_RECORDS_PER_REQUEST: usize = 512;
    /// An OTLP answer is a small protobuf message; this is ample.
    pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
    pub const METRICS_INTERVAL_MS: u64 = 60_000;
}

/// Names of the variables [`OtlpConfig::from_env`] reads.
pub mod env {
    pub const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    pub const LOGS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT";
    pub const METRICS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT";
    pub const PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
    pub const HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
    pub const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
    pub const METRIC_EXPORT_INTERVAL: &str = "OTEL_METRIC_EXPORT_INTERVAL";
    pub const TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
    pub const LOGS_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT";
    /// The standard batch-size variable of the SDK's log processor, read with the same meaning:
    /// the most log records sent in one export request.
    pub const MAX_EXPORT_BATCH_SIZE: &str = "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE";
    /// Tollgate's own: requests remembered after a complete / an incomplete record was
    /// exported (see [`crate::LedgerLimits`]).
    pub const LEDGER_COMPLETE: &str = "TOLLGATE_OTLP_LEDGER_COMPLETE_REQUESTS";
    pub const LEDGER_INCOMPLETE: &str = "TOLLGATE_OTLP_LEDGER_INCOMPLETE_REQUESTS";
}

/// A positive number from `lookup(name)`, or `default` when unset or empty.
fn positive<T: std::str::FromStr + PartialOrd + Default>(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: T,
) -> Result<T, TelemetryError> {
    match lookup(name).filter(|v| !v.trim().is_empty()) {
        None => Ok(default),
        Some(v) => match v.trim().parse::<T>() {
            Ok(n) if n > T::default() => Ok(n),
            _ => Err(TelemetryError::Config(format!(
                "{name} must be a whole number greater than 0, not {v:?}"
            ))),
        },
    }
}

impl OtlpConfig {
    /// Reads the standard variables through `lookup` (so tests need no process environment).
    /// `Ok(None)` when no endpoint is set: export is off.
    pub fn from_env(
        lookup: impl Fn(&str) -> Option<String>,
        default_service: &str,
    ) -> Result<Option<Self>, TelemetryError> {
        let base = lookup(env::ENDPOINT).filter(|s| !s.is_empty());
        let logs = lookup(env::LOGS_ENDPOINT).filter(|s| !s.is_empty());
        let metrics = lookup(env::METRICS_ENDPOINT).filter(|s| !s.is_empty());
        if base.is_none() && logs.is_none() && metrics.is_none() {
            return Ok(None);
        }
        if let Some(p) = lookup(env::PROTOCOL).filter(|p| !p.is_empty())
            && p != "http/protobuf"
        {
            return Err(TelemetryError::Config(format!(
                "{}={p} is not supported; use http/protobuf (port 4318 on a Collector)",
                env::PROTOCOL
            )));
        }
        let signal = |explicit: Option<String>, path: &str| -> Result<String, TelemetryError> {
            match (explicit, &base) {
                (Some(url), _) => Ok(url),
                (None, Some(b)) => Ok(format!("{}/{path}", b.trim_end_matches('/'))),
                (None, None) => Err(TelemetryError::Config(format!(
                    "{} is needed when only one signal endpoint is set",
                    env::ENDPOINT
                ))),
            }
        };
        let headers = lookup(env::HEADERS)
            .map(|h| {
                h.split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let interval = match lookup(env::METRIC_EXPORT_INTERVAL) {
            Some(v) => v.parse().map_err(|_| {
                TelemetryError::Config(format!(
                    "{} must be milliseconds",
                    env::METRIC_EXPORT_INTERVAL
                ))
            })?,
            None => defaults::METRICS_INTERVAL_MS,
        };
        let timeout_ms = match lookup(env::LOGS_TIMEOUT).filter(|v| !v.trim().is_empty()) {
            Some(_) => positive(&lookup, env::LOGS_TIMEOUT, defaults::TIMEOUT_MS)?,
            None => positive(&lookup, env::TIMEOUT, defaults::TIMEOUT_MS)?,
        };
        let limits = LedgerLimits::default();
        Ok(Some(OtlpConfig {
            logs_endpoint: signal(logs, "v1/logs")?,
            metrics_endpoint: signal(metrics, "v1/metrics")?,
            headers,
            service_name: lookup(env::SERVICE_NAME).unwrap_or_else(|| default_service.to_owned()),
            metrics_interval_ms: interval,
            timeout_ms,
            max_records_per_request: positive(
                &lookup,
                env::MAX_EXPORT_BATCH_SIZE,
                defaults::MAX_RECORDS_PER_REQUEST,
            )?,
            max_response_bytes: defaults::MAX_RESPONSE_BYTES,
            ledger: LedgerLimits {
                complete_requests: positive(
                    &lookup,
                    env::LEDGER_COMPLETE,
                    limits.complete_requests,
                )?,
                incomplete_requests: positive(
                    &lookup,
                    env::LEDGER_INCOMPLETE,
                    limits.incomplete_requests,
                )?,
            },
        }))
    }
}

/// GenAI provider name for Azure OpenAI in the semantic conventions.
pub const PROVIDER_NAME: &str = "azure.ai.openai";

/// `gen_ai.operation.name` for a Tollgate operation.
pub fn genai_operation(operation: &str) -> &str {
    match operation {
        "chat.completions" => "chat",
        "completions" => "text_completion",
        "embeddings" => "embeddings",
        "images.generations" => "image_generation",
        "responses" => "chat",
        other => other,
    }
}

/// Attributes shared by the usage log record and the metrics (low cardinality only).
pub(crate) fn metric_attributes(r: &ConsolidatedRecord) -> Vec<KeyValue> {
    let mut attrs = vec![
        KeyValue::new(
            "gen_ai.operation.name",
            genai_operation(&r.operation).to_owned(),
        ),
        KeyValue::new("gen_ai.provider.name", PROVIDER_NAME),
        KeyValue::new("tollgate.consumer.id", r.consumer.id.clone()),
    ];
    if let Some(d) = &r.deployment {
        attrs.push(KeyValue::new("gen_ai.request.model", d.clone()));
    }
    if let Some(m) = &r.model {
        attrs.push(KeyValue::new("gen_ai.response.model", m.clone()));
    }
    if let Some(e) = &r.error {
        attrs.push(KeyValue::new("error.type", e.code.clone()));
    }
    attrs
}

/// The one mapping from a consolidated record to OpenTelemetry attributes: GenAI semantic
/// convention names where one exists, `tollgate.*` for the rest.
pub fn genai_attributes(r: &ConsolidatedRecord) -> Vec<KeyValue> {
    let mut attrs = metric_attributes(r);
    attrs.push(KeyValue::new("tollgate.request.id", r.id.clone()));
    attrs.push(KeyValue::new("tollgate.stream", r.stream));
    attrs.push(KeyValue::new("tollgate.complete", r.complete));
    // A reader keeps the highest revision of a request (a complete record outranks every
    // incomplete one); revisions fit in an i64 (the complete bit is bit 32).
    attrs.push(KeyValue::new(
        "tollgate.record.revision",
        i64::try_from(r.revision).unwrap_or(i64::MAX),
    ));
    attrs.push(KeyValue::new("tollgate.truncated", r.truncated));
    attrs.push(KeyValue::new(
        "tollgate.client.disconnected",
        r.client_disconnected,
    ));
    if let Some(k) = &r.consumer.key_id {
        attrs.push(KeyValue::new("tollgate.consumer.key_id", k.clone()));
    }
    // An Entra ID caller: charge-back per user or service principal, and per calling app.
    if let Some(subject) = &r.consumer.subject {
        attrs.push(KeyValue::new("tollgate.consumer.subject", subject.clone()));
    }
    if let Some(app) = &r.consumer.app_id {
        attrs.push(KeyValue::new("tollgate.consumer.app_id", app.clone()));
    }
    if let Some(s) = r.status {
        attrs.push(KeyValue::new("http.response.status_code", i64::from(s)));
    }
    if let Some(b) = &r.backend {
        attrs.push(KeyValue::new("tollgate.backend", b.clone()));
    }
    if let Some(id) = &r.response_id {
        attrs.push(KeyValue::new("gen_ai.response.id", id.clone()));
    }
    let reasons: Vec<String> = r
        .choices
        .iter()
        .filter_map(|c| c.finish_reason.clone())
        .collect();
    if !reasons.is_empty() {
        attrs.push(KeyValue::new(
            "gen_ai.response.finish_reasons",
            opentelemetry::Value::Array(
                reasons
                    .into_iter()
                    .map(Into::into)
                    .collect::<Vec<opentelemetry::StringValue>>()
                    .into(),
            ),
        ));
    }
    if let Some(u) = &r.usage {
        attrs.push(KeyValue::new(
            "gen_ai.usage.input_tokens",
            u.input_tokens as i64,
        ));
        attrs.push(KeyValue::new(
            "gen_ai.usage.output_tokens",
            u.output_tokens as i64,
        ));
        attrs.push(KeyValue::new(
            "tollgate.usage.total_tokens",
            u.total_tokens as i64,
        ));
        attrs.push(KeyValue::new(
            "tollgate.usage.cached_input_tokens",
            u.cached_input_tokens as i64,
        ));
        attrs.push(KeyValue::new(
            "tollgate.usage.reasoning_tokens",
            u.reasoning_tokens as i64,
        ));
        let source = match u.source {
            UsageSource::Reported => "reported",
            UsageSource::Estimated => "estimated",
        };
        attrs.push(KeyValue::new("tollgate.usage.source", source));
    }
    if let Some(q) = &r.usage_quality {
        attrs.push(KeyValue::new("tollgate.usage.quality", q.quality.as_str()));
        if let Some(reason) = &q.reason {
            attrs.push(KeyValue::new(
                "tollgate.usage.quality_reason",
                reason.clone(),
            ));
        }
    }
    if let Some(c) = &r.cost {
        attrs.push(KeyValue::new("tollgate.cost.total", c.total.as_f64()));
        // The exact amount, for sums that must not drift (KQL `sum(tolong(...))`).
        attrs.push(KeyValue::new("tollgate.cost.total_nanos", c.total.nanos()));
        attrs.push(KeyValue::new("tollgate.cost.currency", c.currency.clone()));
        attrs.push(KeyValue::new(
            "tollgate.cost.price_table_version",
            c.price_table_version.clone(),
        ));
    }
    if r.unpriced {
        attrs.push(KeyValue::new("tollgate.cost.unpriced", true));
    }
    if let Some(l) = &r.latency {
        if let Some(t) = l.ttfb_ms {
            attrs.push(KeyValue::new("tollgate.latency.ttfb_ms", t));
        }
        attrs.push(KeyValue::new("tollgate.latency.total_ms", l.total_ms));
    }
    if let Some(ip) = &r.client_ip {
        attrs.push(KeyValue::new("client.address", ip.clone()));
    }
    if let Some(v) = &r.api_version {
        attrs.push(KeyValue::new("tollgate.api_version", v.clone()));
    }
    attrs
}

/// Our own processes' logs: human-readable by default, JSON with `json = true`.
#[derive(Debug, Clone, Default)]
pub struct TracingConfig {
    /// `RUST_LOG`-style filter; default `info`.
    pub filter: Option<String>,
    pub json: bool,
}

/// Installs the global subscriber (to stderr); a second call is a no-op.
pub fn init_tracing(config: &TracingConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(config.filter.as_deref().unwrap_or("info"))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a container's log collector would keep the
    // escape codes in every line.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = if config.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// An Entra ID caller's subject and app id reach the export, so KQL can charge per app.
    #[test]
    fn an_entra_callers_subject_and_app_are_exported() {
        let r: ConsolidatedRecord = serde_json::from_value(serde_json::json!({
            "schemaVersion": 1, "id": "r", "time": "2026-11-02T10:00:00Z",
            "consumer": {"id": "team-a", "authKind": "entraId", "subject": "oid-1",
                         "appId": "app-1"},
            "operation": "chat.completions", "path": "/", "stream": false, "status": 200,
            "choices": [], "clientDisconnected": false, "complete": true
        }))
        .unwrap();
        let attrs = genai_attributes(&r);
        let get = |k: &str| {
            attrs
                .iter()
                .find(|a| a.key.as_str() == k)
                .map(|a| a.value.to_string())
        };
        assert_eq!(get("tollgate.consumer.subject").as_deref(), Some("oid-1"));
        assert_eq!(get("tollgate.consumer.app_id").as_deref(), Some("app-1"));
    }

    #[test]
    fn env_resolution() {
        assert_eq!(OtlpConfig::from_env(lookup(&[]), "s").unwrap(), None);
        let c = OtlpConfig::from_env(lookup(&[(env::ENDPOINT, "http://c:4318/")]), "svc")
            .unwrap()
            .unwrap();
        assert_eq!(c.logs_endpoint, "http://c:4318/v1/logs");
        assert_eq!(c.metrics_endpoint, "http://c:4318/v1/metrics");
        assert_eq!(c.service_name, "svc");
        let c = OtlpConfig::from_env(
            lookup(&[
                (env::ENDPOINT, "http://c:4318"),
                (env::LOGS_ENDPOINT, "http://l/x"),
                (env::HEADERS, "a=1, b=2"),
            ]),
            "svc",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.logs_endpoint, "http://l/x");
        assert_eq!(c.headers.get("b").map(String::as_str), Some("2"));
        assert!(
            OtlpConfig::from_env(
                lookup(&[(env::ENDPOINT, "http://c"), (env::PROTOCOL, "grpc")]),
                "s"
            )
            .is_err()
        );
    }

    #[test]
    fn export_limits_have_explicit_defaults_and_read_the_standard_variables() {
        let c = OtlpConfig::from_env(lookup(&[(env::ENDPOINT, "http://c")]), "s")
            .unwrap()
            .unwrap();
        assert_eq!(c.timeout_ms, defaults::TIMEOUT_MS);
        assert_eq!(c.max_records_per_request, defaults::MAX_RECORDS_PER_REQUEST);
        assert_eq!(c.max_response_bytes, defaults::MAX_RESPONSE_BYTES);
        assert_eq!(c.ledger, LedgerLimits::default());
        let c = OtlpConfig::from_env(
            lookup(&[
                (env::ENDPOINT, "http://c"),
                (env::TIMEOUT, "3000"),
                (env::LOGS_TIMEOUT, "2000"),
                (env::MAX_EXPORT_BATCH_SIZE, "50"),
                (env::LEDGER_COMPLETE, "10"),
                (env::LEDGER_INCOMPLETE, "20"),
            ]),
            "s",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.timeout_ms, 2000, "the logs-specific timeout wins");
        assert_eq!(c.max_records_per_request, 50);
        assert_eq!(
            c.ledger,
            LedgerLimits {
                complete_requests: 10,
                incomplete_requests: 20
            }
        );
        let c = OtlpConfig::from_env(
            lookup(&[(env::ENDPOINT, "http://c"), (env::TIMEOUT, "3000")]),
            "s",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.timeout_ms, 3000);
        for bad in [
            env::TIMEOUT,
            env::MAX_EXPORT_BATCH_SIZE,
            env::LEDGER_COMPLETE,
            env::LEDGER_INCOMPLETE,
        ] {
            for value in ["0", "many"] {
                assert!(
                    OtlpConfig::from_env(lookup(&[(env::ENDPOINT, "http://c"), (bad, value)]), "s")
                        .is_err(),
                    "{bad}={value}"
                );
            }
        }
    }
}
