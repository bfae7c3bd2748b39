//! Sinks receive consolidated records; the parser advances its checkpoint only after every
//! sink acknowledged a batch, and every sink must tolerate a batch delivered again.

mod otlp;
mod store;

use async_trait::async_trait;
use tollgate_records::ConsolidatedRecord;

pub use otlp::OtlpSink;
pub use store::StoreSink;

use crate::error::ParserError;

#[async_trait]
pub trait RecordSink: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Returns once the records are durably delivered.
    async fn write(&self, records: &[ConsolidatedRecord]) -> Result<(), ParserError>;
}
