use tollgate_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ParserError {
    #[error("invalid parser configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error("price table {path}: {detail}")]
    PriceTable { path: String, detail: String },
    #[error("change feed failed: {0}")]
    Feed(#[from] StoreError),
    #[error("sink `{sink}` failed: {detail}")]
    Sink { sink: &'static str, detail: String },
}
