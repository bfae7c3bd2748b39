//! Telemetry for Tollgate's processes: `tracing` setup for our own logs, the OTLP exporter for
//! usage records, and the one mapping from a consolidated record to OpenTelemetry GenAI
//! semantic-convention attributes.
//!
//! Export is over OTLP/HTTP with protobuf (the OTLP default protocol), configured from the
//! standard `OTEL_EXPORTER_OTLP_*` variables; with none set, export is off.
//!
//! Must not: depend on the services; read the environment except through
//! [`OtlpConfig::from_env`] with a caller-supplied lookup.

use std::collections::HashMap;
use std::time::SystemTime;

use opentelemetry::KeyValue;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::{SdkLogger, SdkLoggerProvider};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use tollgate_records::{ConsolidatedRecord, UsageSource};

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
            None => 60_000,
        };
        Ok(Some(OtlpConfig {
            logs_endpoint: signal(logs, "v1/logs")?,
            metrics_endpoint: signal(metrics, "v1/metrics")?,
            headers,
            service_name: lookup(env::SERVICE_NAME).unwrap_or_else(|| default_service.to_owned()),
            metrics_interval_ms: interval,
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
fn metric_attributes(r: &ConsolidatedRecord) -> Vec<KeyValue> {
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
    attrs.push(KeyValue::new(
        "tollgate.client.disconnected",
        r.client_disconnected,
    ));
    if let Some(k) = &r.consumer.key_id {
        attrs.push(KeyValue::new("tollgate.consumer.key_id", k.clone()));
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
    if let Some(c) = &r.cost {
        attrs.push(KeyValue::new("tollgate.cost.total", c.total));
        attrs.push(KeyValue::new("tollgate.cost.currency", c.currency.clone()));
        attrs.push(KeyValue::new(
            "tollgate.cost.price_table_version",
            c.price_table_version.clone(),
        ));
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

/// Exports one OTLP log record per request plus token, duration and cost metrics.
pub struct UsageExporter {
    logs: SdkLoggerProvider,
    logger: SdkLogger,
    metrics: SdkMeterProvider,
    tokens: Histogram<u64>,
    duration: Histogram<f64>,
    cost: Counter<f64>,
    requests: Counter<u64>,
}

impl UsageExporter {
    pub fn new(config: &OtlpConfig) -> Result<Self, TelemetryError> {
        let config = config.clone();
        // The blocking HTTP client owns a runtime of its own, which must not be created (or
        // later dropped) on a tokio worker; building on a plain thread avoids both.
        let built = std::thread::spawn(move || {
            let logs = opentelemetry_otlp::LogExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(config.logs_endpoint.clone())
                .with_headers(config.headers.clone())
                .build()
                .map_err(|e| TelemetryError::Build(e.to_string()))?;
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(config.metrics_endpoint.clone())
                .with_headers(config.headers.clone())
                .build()
                .map_err(|e| TelemetryError::Build(e.to_string()))?;
            Ok::<_, TelemetryError>((config, logs, metrics))
        })
        .join()
        .map_err(|_| TelemetryError::Build("exporter thread panicked".into()))??;
        let (config, log_exporter, metric_exporter) = built;
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let logs = SdkLoggerProvider::builder()
            .with_resource(resource.clone())
            .with_batch_exporter(log_exporter)
            .build();
        let reader = PeriodicReader::builder(metric_exporter)
            .with_interval(std::time::Duration::from_millis(config.metrics_interval_ms))
            .build();
        let metrics = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(reader)
            .build();
        let meter = metrics.meter("tollgate");
        let logger = logs.logger("tollgate");
        Ok(UsageExporter {
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
            logs,
            logger,
            metrics,
        })
    }

    /// Queues the record's log record and metric points.
    pub fn export(&self, r: &ConsolidatedRecord) {
        let mut log = self.logger.create_log_record();
        log.set_event_name("tollgate.request");
        log.set_timestamp(SystemTime::from(r.time));
        log.set_observed_timestamp(SystemTime::now());
        let failed = r.error.is_some() || r.status.is_none_or(|s| s >= 400);
        log.set_severity_number(if failed {
            Severity::Warn
        } else {
            Severity::Info
        });
        log.set_severity_text(if failed { "WARN" } else { "INFO" });
        log.set_body(AnyValue::from(format!(
            "{} {} by {} -> {}",
            r.operation,
            r.deployment.as_deref().unwrap_or("-"),
            r.consumer.id,
            r.status
                .map_or_else(|| "incomplete".to_owned(), |s| s.to_string())
        )));
        for kv in genai_attributes(r) {
            log.add_attribute(kv.key, any_value(kv.value));
        }
        self.logger.emit(log);

        let attrs = metric_attributes(r);
        self.requests.add(1, &attrs);
        if let Some(u) = &r.usage {
            let mut input = attrs.clone();
            input.push(KeyValue::new("gen_ai.token.type", "input"));
            self.tokens.record(u.input_tokens, &input);
            let mut output = attrs.clone();
            output.push(KeyValue::new("gen_ai.token.type", "output"));
            self.tokens.record(u.output_tokens, &output);
        }
        if let Some(l) = &r.latency {
            self.duration.record(l.total_ms / 1000.0, &attrs);
        }
        if let Some(c) = &r.cost {
            self.cost.add(c.total, &attrs);
        }
    }

    /// Blocks until queued logs and metrics were sent. Call from a blocking context.
    pub fn flush(&self) -> Result<(), TelemetryError> {
        self.logs
            .force_flush()
            .map_err(|e| TelemetryError::Export(e.to_string()))?;
        self.metrics
            .force_flush()
            .map_err(|e| TelemetryError::Export(e.to_string()))
    }

    /// Flushes and stops the exporters. Call from a blocking context.
    pub fn shutdown(&self) -> Result<(), TelemetryError> {
        let logs = self
            .logs
            .shutdown()
            .map_err(|e| TelemetryError::Export(e.to_string()));
        let metrics = self
            .metrics
            .shutdown()
            .map_err(|e| TelemetryError::Export(e.to_string()));
        logs.and(metrics)
    }
}

fn any_value(v: opentelemetry::Value) -> AnyValue {
    match v {
        opentelemetry::Value::Bool(b) => AnyValue::Boolean(b),
        opentelemetry::Value::I64(i) => AnyValue::Int(i),
        opentelemetry::Value::F64(f) => AnyValue::Double(f),
        opentelemetry::Value::String(s) => AnyValue::String(s),
        opentelemetry::Value::Array(opentelemetry::Array::String(items)) => {
            AnyValue::ListAny(Box::new(items.into_iter().map(AnyValue::String).collect()))
        }
        other => AnyValue::String(other.to_string().into()),
    }
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
}
