use std::sync::Arc;

use async_trait::async_trait;
use tollgate_records::ConsolidatedRecord;
use tollgate_store::RequestStore;

use super::RecordSink;
use crate::error::ParserError;

/// Upserts records by request id, so replays never duplicate.
pub struct StoreSink {
    store: Arc<dyn RequestStore>,
}

impl StoreSink {
    pub fn new(store: Arc<dyn RequestStore>) -> Self {
        StoreSink { store }
    }
}

#[async_trait]
impl RecordSink for StoreSink {
    fn name(&self) -> &'static str {
        "store"
    }

    async fn write(&self, records: &[ConsolidatedRecord]) -> Result<(), ParserError> {
        self.store
            .upsert(records)
            .await
            .map_err(|e| ParserError::Sink {
                sink: "store",
                detail: e.to_string(),
            })
    }
}
