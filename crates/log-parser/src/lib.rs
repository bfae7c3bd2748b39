//! The log parser: consumes the raw-record change feed, assembles each request, stitches
//! streams, takes AOAI's usage or estimates it with the model's tokenizer, prices it, and
//! emits one consolidated record per request to its sinks (the store; OTLP).
//!
//! Must not: depend on the logging proxy; lose a request on restart (see `pipeline`).

pub mod config;
pub mod error;
pub mod pipeline;
pub mod sink;
pub mod transform;
mod units;

pub use config::ParserConfig;
pub use error::ParserError;
pub use pipeline::{Parser, ParserStats};
pub use sink::{OtlpSink, RecordSink, StoreSink};
