use std::sync::Arc;

use async_trait::async_trait;
use tollgate_records::ConsolidatedRecord;
use tollgate_telemetry::UsageExporter;

use super::RecordSink;
use crate::error::ParserError;

/// Exports through the telemetry crate's OTLP exporter and waits for the export to finish
/// before acknowledging. OTLP has no idempotency key: a replayed batch is exported again, and
/// `tollgate.request.id` lets queries deduplicate (queries/kql does).
pub struct OtlpSink {
    exporter: Arc<UsageExporter>,
}

impl OtlpSink {
    pub fn new(exporter: Arc<UsageExporter>) -> Self {
        OtlpSink { exporter }
    }
}

#[async_trait]
impl RecordSink for OtlpSink {
    fn name(&self) -> &'static str {
        "otlp"
    }

    async fn write(&self, records: &[ConsolidatedRecord]) -> Result<(), ParserError> {
        if records.is_empty() {
            return Ok(());
        }
        for r in records {
            self.exporter.export(r);
        }
        let exporter = self.exporter.clone();
        tokio::task::spawn_blocking(move || exporter.flush())
            .await
            .map_err(|e| ParserError::Sink {
                sink: "otlp",
                detail: e.to_string(),
            })?
            .map_err(|e| ParserError::Sink {
                sink: "otlp",
                detail: e.to_string(),
            })
    }
}
