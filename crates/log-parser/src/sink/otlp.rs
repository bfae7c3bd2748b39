use std::sync::Arc;

use async_trait::async_trait;
use tollgate_records::ConsolidatedRecord;
use tollgate_telemetry::UsageExporter;

use super::RecordSink;
use crate::error::ParserError;

/// Exports through the telemetry crate's usage exporter, which returns only once the collector
/// accepted every log record of the batch (a non-2xx answer, a timeout or a `partial_success`
/// with rejected records fail the write, and the parser keeps its checkpoint and delivers the
/// batch again). The exporter counts each request's metrics after its log record was accepted
/// and remembers what it counted, so a batch delivered again is neither re-sent nor re-counted;
/// each log record carries `tollgate.record.revision` so queries keep one per request
/// (queries/kql). What the exporter cannot remember across a restart is in its module doc.
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
        self.exporter
            .export(records)
            .await
            .map_err(|e| ParserError::Sink {
                sink: "otlp",
                detail: e.to_string(),
            })
    }
}
