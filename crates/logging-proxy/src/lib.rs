//! The logging proxy: serves Azure OpenAI's HTTP surface to apps, authenticates consumers,
//! forwards to the configured AOAI backend without buffering, and records every request and
//! response as raw records (`request`, `chunks`, `end`) through a batching writer with an
//! on-disk spool.
//!
//! Must not: parse or count tokens on the request path, wait on the store in a request task,
//! depend on the log parser, or let credentials reach a record or a log line.

mod app;
mod auth;
pub mod config;
mod error;
mod forward;
pub mod recorder;
mod tee;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_store::RawWriter;

pub use config::ProxyConfig;
pub use error::ProxyError;
pub use forward::REQUEST_ID_HEADER;
pub use recorder::{Recorder, RecorderStats};

/// Runs after an admin flush, e.g. to let the parser catch up in `tollgate up`.
pub type FlushHook = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

pub struct ProxyDeps {
    pub store: Arc<dyn RawWriter>,
    /// Default parent of the spool directory.
    pub data_dir: PathBuf,
    pub after_flush: Option<FlushHook>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyBuildError {
    #[error("invalid proxy configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error("spool could not be opened: {0}")]
    Spool(String),
    #[error("HTTP client could not be built: {0}")]
    Client(String),
}

pub(crate) struct AppState {
    pub config: config::Validated,
    pub client: reqwest::Client,
    pub recorder: Recorder,
    /// Response pumps; shutdown waits for them before stopping the writer.
    pub requests: TaskTracker,
    pub after_flush: Option<FlushHook>,
}

/// A built proxy: its router plus handles to flush and shut down the recorder.
pub struct Proxy {
    state: Arc<AppState>,
    writer: TaskTracker,
    cancel: CancellationToken,
}

impl Proxy {
    pub fn build(config: &ProxyConfig, deps: ProxyDeps) -> Result<Proxy, ProxyBuildError> {
        let validated = config.validate().map_err(ProxyBuildError::Config)?;
        let r = &validated.recorder;
        let settings = recorder::RecorderSettings {
            queue_capacity: r.queue_capacity,
            queue_max_bytes: r.queue_max_bytes,
            max_batch_records: r.max_batch_records,
            flush_interval: Duration::from_millis(r.flush_interval_ms),
            spool_dir: r
                .spool_dir
                .clone()
                .unwrap_or_else(|| deps.data_dir.join("spool")),
            spool_max_bytes: r.spool_max_bytes,
            spool_file_max_bytes: r.spool_file_max_bytes,
            spool_buffer_max_bytes: r.spool_buffer_max_bytes,
            spool_fsync: r.spool_fsync,
            dead_letter_max_bytes: r.dead_letter_max_bytes,
            retry_interval: Duration::from_millis(r.retry_interval_ms),
        };
        let mut client = reqwest::Client::builder()
            .connect_timeout(validated.connect_timeout())
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true);
        if !validated.use_env_proxy {
            client = client.no_proxy();
        }
        let client = client
            .build()
            .map_err(|e| ProxyBuildError::Client(e.to_string()))?;
        let writer = TaskTracker::new();
        let cancel = CancellationToken::new();
        let recorder = Recorder::start(settings, deps.store, &writer, cancel.clone())
            .map_err(|e| ProxyBuildError::Spool(e.to_string()))?;
        let state = Arc::new(AppState {
            config: validated,
            client,
            recorder,
            requests: TaskTracker::new(),
            after_flush: deps.after_flush,
        });
        Ok(Proxy {
            state,
            writer,
            cancel,
        })
    }

    pub fn router(&self) -> Router {
        app::router(self.state.clone())
    }

    pub fn recorder(&self) -> &Recorder {
        &self.state.recorder
    }

    /// See [`Recorder::flush`].
    pub async fn flush(&self) {
        self.state.recorder.flush().await;
    }

    /// Waits for every response pump, then drains the recorder into the store (or spool).
    /// Call after the HTTP server stopped accepting connections.
    pub async fn shutdown(self) {
        self.state.requests.close();
        self.state.requests.wait().await;
        self.cancel.cancel();
        self.writer.close();
        self.writer.wait().await;
    }
}
