use std::sync::Arc;

use async_trait::async_trait;
use tollgate_records::ConsolidatedRecord;
use tollgate_store::{RequestStore, StoreError};

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

    /// A record the store refuses for good (too large for a Cosmos DB item: a prompt of
    /// several images) is written again without its content, so the feed moves on with the
    /// request billed and measured; it is logged. Anything else fails the batch (retried).
    async fn write(&self, records: &[ConsolidatedRecord]) -> Result<(), ParserError> {
        let fail = |e: StoreError| ParserError::Sink {
            sink: "store",
            detail: e.to_string(),
        };
        let mut records = std::borrow::Cow::Borrowed(records);
        // Each round can only clear a record's content once: bounded by the batch.
        for _ in 0..=records.len() {
            match self.store.upsert(&records).await {
                Err(StoreError::Rejected { id, detail }) => {
                    let Some(r) = records
                        .to_mut()
                        .iter_mut()
                        .find(|r| r.id == id && (r.prompt.is_some() || has_content(r)))
                    else {
                        return Err(fail(StoreError::Rejected { id, detail }));
                    };
                    tracing::warn!(request_id = %id, %detail, "The store refused a consolidated record; it is stored without its prompt and answer.");
                    r.drop_content();
                }
                other => return other.map_err(fail),
            }
        }
        Err(fail(StoreError::Unavailable(
            "records refused after their content was dropped".into(),
        )))
    }
}

fn has_content(r: &ConsolidatedRecord) -> bool {
    r.choices.iter().any(|c| {
        c.content.is_some()
            || c.refusal.is_some()
            || c.tool_calls.iter().any(|t| !t.arguments.is_empty())
            || c.function_call
                .as_ref()
                .is_some_and(|f| !f.arguments.is_empty())
    })
}
