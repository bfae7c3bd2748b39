//! The logging proxy: serves Azure OpenAI's HTTP surface to apps, authenticates consumers (keys
//! or Entra ID tokens), holds them to their limits, forwards to a deployment's pool of AOAI
//! backends without buffering, and records every request and response as raw records
//! (`request`, `chunks`, `end`) through a batching writer with an on-disk spool.
//!
//! Must not: count tokens on the request path beyond the limits phase's estimate for a
//! consumer with a token limit (billing is the parser's), wait on the store in a request task,
//! depend on the log parser, or let credentials reach a record or a log line.

mod admin;
mod app;
mod auth;
pub mod backend_auth;
pub mod config;
pub mod consumers;
mod context;
pub mod entra_callers;
mod error;
mod exchange;
mod headers;
mod layers;
mod live;
mod path;
mod peek;
mod phases;
mod pool;
mod probe;
pub mod quota;
pub mod recorder;
mod reject;
mod server;
mod stall;
mod stream_usage;
mod tee;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_store::RawWriter;

pub use config::ProxyConfig;
pub use context::REQUEST_ID_HEADER;
pub use error::ProxyError;
pub use probe::{Probe, probe_backends};
pub use recorder::{Recorder, RecorderStats};

/// Runs after an admin flush, e.g. to let the parser catch up in `tollgate up`.
pub type FlushHook = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// How long the recorder's last records may take to reach the store at shutdown when the
/// grace period is already over (see [`Proxy::shutdown`]).
const DRAIN_AT_LEAST: std::time::Duration = std::time::Duration::from_secs(2);

pub struct ProxyDeps {
    pub store: Arc<dyn RawWriter>,
    /// The store the consumer registry (`consumers/registry.rs`) and the month-to-date cost of
    /// budgeted consumers (`quota/budget.rs`) are read from; `None`: only the file's
    /// consumers, and budgets are not enforced.
    pub registry: Option<Arc<dyn tollgate_store::Store>>,
    /// Default parent of the spool and journal directories.
    pub data_dir: PathBuf,
    pub after_flush: Option<FlushHook>,
    pub reload: Option<ReloadHook>,
}

/// Reads the configuration again (the binary knows where it came from), for
/// `POST /tollgate/admin/reload`.
pub type ReloadHook = Arc<dyn Fn() -> Result<ProxyConfig, String> + Send + Sync>;

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reloaded {
    pub consumers: usize,
    pub backends_added: Vec<String>,
    pub backends_removed: Vec<String>,
    pub deployments: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyBuildError {
    #[error("invalid proxy configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error("spool could not be opened: {0}")]
    Spool(String),
    #[error("HTTP client could not be built: {0}")]
    Client(String),
    #[error(
        "a reload may change consumers, backends and stream_usage only; restart to apply the other sections"
    )]
    NeedsRestart,
}

/// The proxy's own counters (the recorder has its own): what it refused without recording.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Requests shed because `max_concurrent_requests` were in progress.
    pub shed: AtomicU64,
    /// Refused requests (no key, bad path, headers too large) not recorded because the spool
    /// was in use.
    pub refusals_unrecorded: AtomicU64,
    /// Connections closed on accept by `max_connections` / `max_connections_per_ip`.
    pub connections_refused: AtomicU64,
}

pub(crate) struct AppState {
    pub config: config::Fixed,
    /// Consumers and backends: replaced whole by a reload (see `live.rs`).
    pub live: arc_swap::ArcSwap<live::Live>,
    /// Re-reads the configuration for the admin reload call; `None`: reload is not offered.
    pub reload: Option<ReloadHook>,
    /// Held through a reload: two at once (SIGHUP and the admin call) would both build on the
    /// same old configuration and the second would drop the first's new backends' state.
    pub reloading: std::sync::Mutex<()>,
    pub client: reqwest::Client,
    pub recorder: Recorder,
    /// Exchanges with backends and the drains after client disconnects; shutdown waits for
    /// them before stopping the writer.
    pub requests: TaskTracker,
    /// `max_concurrent_requests` slots.
    pub slots: Arc<Semaphore>,
    /// Fires when shutdown's grace is over: exchanges and drains still running stop and
    /// record what they have.
    pub abort: CancellationToken,
    pub stats: Arc<ProxyStats>,
    pub after_flush: Option<FlushHook>,
    /// The clock and breaker settings backends' states are read against.
    pub pools: pool::Pools,
    /// Every consumer's limit counters (`quota.rs`); kept across reloads.
    pub counters: Arc<quota::Counters>,
    /// Entra ID callers' token validation and the tenants' signing keys.
    pub callers: entra_callers::Callers,
    /// Every consumer the request path knows: the file's and the registry's (`consumers/`).
    pub directory: arc_swap::ArcSwap<consumers::Directory>,
    /// The registry's consumers as last read, and the versions read.
    pub registered: std::sync::Mutex<(consumers::poll::Seen, Arc<Vec<config::ConsumerConfig>>)>,
    pub registry: Option<Arc<dyn tollgate_store::Store>>,
    pub registry_status: RegistryStatus,
    /// Held from a registry read to its swap (`consumers/poll.rs`).
    pub registry_reads: tokio::sync::Mutex<()>,
    /// Budgeted consumers' month-to-date cost (`quota/budget.rs`).
    pub spend: quota::budget::Spend,
}

/// Whether the last read of the registry worked, and the failed reads so far.
#[derive(Debug, Default)]
pub(crate) struct RegistryStatus {
    pub up: std::sync::atomic::AtomicBool,
    pub errors: AtomicU64,
}

/// A built proxy: its router plus handles to flush and shut down the recorder.
pub struct Proxy {
    state: Arc<AppState>,
    writer: TaskTracker,
    cancel: CancellationToken,
}

impl Proxy {
    pub fn build(config: &ProxyConfig, deps: ProxyDeps) -> Result<Proxy, ProxyBuildError> {
        let config::Validated {
            fixed: validated,
            live: live_config,
        } = config.validate().map_err(ProxyBuildError::Config)?;
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
            journal_dir: r
                .journal_dir
                .clone()
                .unwrap_or_else(|| deps.data_dir.join("journal")),
            journal_file_max_bytes: r.journal_file_max_bytes,
            journal_max_bytes: r.journal_max_bytes,
            journal_buffer_max_bytes: r.journal_buffer_max_bytes,
            journal_fsync: r.journal_fsync,
        };
        let client = validated
            .backend_client()
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ProxyBuildError::Client(e.to_string()))?;
        let mut problems = Vec::new();
        let url = config.limits_store.url(&mut problems);
        let counters = Arc::new(
            quota::Counters::new(&config.limits_store, url.as_deref())
                .map_err(|e| ProxyBuildError::Config(vec![e]))?,
        );
        let writer = TaskTracker::new();
        let cancel = CancellationToken::new();
        let recorder = Recorder::start(settings, deps.store, &writer, cancel.clone())
            .map_err(|e| ProxyBuildError::Spool(e.to_string()))?;
        let state = Arc::new(AppState {
            slots: Arc::new(Semaphore::new(validated.limits.max_concurrent_requests)),
            pools: pool::Pools::new(
                validated.limits.breaker_failures,
                validated.limits.breaker_cooldown_ms,
            ),
            directory: arc_swap::ArcSwap::from_pointee(live_config.consumers.clone()),
            registered: std::sync::Mutex::new(Default::default()),
            registry: deps.registry,
            registry_status: RegistryStatus::default(),
            registry_reads: tokio::sync::Mutex::new(()),
            spend: quota::budget::Spend::default(),
            live: arc_swap::ArcSwap::from_pointee(live::Live::new(live_config, None)),
            reload: deps.reload,
            reloading: std::sync::Mutex::new(()),
            counters,
            callers: entra_callers::Callers::new(validated.entra_callers.clone(), client.clone()),
            config: validated,
            client,
            recorder,
            requests: TaskTracker::new(),
            abort: CancellationToken::new(),
            stats: Arc::new(ProxyStats::default()),
            after_flush: deps.after_flush,
        });
        if let Some(store) = state.registry.clone() {
            writer.spawn(consumers::poll::run(
                state.clone(),
                store.clone(),
                cancel.clone(),
            ));
            writer.spawn(consumers::poll::spend(state.clone(), store, cancel.clone()));
        } else if config
            .consumers
            .iter()
            .any(|c| c.limits.cost_per_month.is_some())
        {
            tracing::warn!(
                "Cost budgets are configured but this proxy reads no store: they are not enforced."
            );
        }
        Ok(Proxy {
            state,
            writer,
            cancel,
        })
    }

    /// Reads the consumer registry once now (before serving, so registered consumers work
    /// from the first request); the poll goes on reading it.
    pub async fn load_registry(&self) -> Result<(), tollgate_store::StoreError> {
        if let Some(store) = &self.state.registry {
            consumers::poll::refresh(&self.state, store.as_ref()).await?;
        }
        // A caller rule may name a consumer the registry holds; one that names no consumer at
        // all is a typo more likely than a consumer still to be made.
        let directory = self.state.directory.load();
        let callers = &self.state.config.entra_callers;
        for c in callers
            .rules
            .iter()
            .map(|r| &r.consumer)
            .chain(callers.default_consumer.iter())
        {
            if !directory.ids.contains(c) {
                tracing::warn!(consumer = %c, "An Entra ID caller rule names a consumer that neither the configuration file nor the registry has: its callers get 403 until it is created.");
            }
        }
        Ok(())
    }

    /// The admin API (consumers, keys, audit, and the admin endpoints), for its own
    /// listener (`[proxy.admin] listen`).
    pub fn admin_router(&self) -> Router {
        admin::router(self.state.clone())
    }

    /// Where the admin listener should listen, if anywhere.
    pub fn admin_listen(&self) -> Option<std::net::SocketAddr> {
        self.state.config.admin.listen
    }

    pub fn router(&self) -> Router {
        app::router(self.state.clone())
    }

    pub fn recorder(&self) -> &Recorder {
        &self.state.recorder
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.state.stats
    }

    /// Serves the router on `listener` with the connection limits of `[proxy.limits]` until
    /// `stop` fires; then lets open connections finish for up to `grace` and closes the rest.
    pub async fn serve(
        &self,
        listener: TcpListener,
        stop: CancellationToken,
        grace: Duration,
    ) -> std::io::Result<()> {
        let l = &self.state.config.limits;
        let limits = server::ServeLimits {
            header_read_timeout: Duration::from_millis(l.header_read_timeout_ms),
            client_write_timeout: Duration::from_millis(l.client_write_timeout_ms),
            max_connections: l.max_connections,
            max_connections_per_ip: l.max_connections_per_ip,
        };
        server::serve(
            listener,
            self.router(),
            limits,
            self.state.stats.clone(),
            stop,
            grace,
        )
        .await
    }

    /// Applies a new configuration's consumers, backends and `stream_usage` without a
    /// restart: requests already forwarded keep the backends they started with (a removed
    /// backend finishes its streams); a backend kept by name and endpoint keeps its state.
    /// Refused, changing nothing, when the configuration is invalid or changes a section that
    /// needs a restart.
    pub fn reload(&self, config: &ProxyConfig) -> Result<Reloaded, ProxyBuildError> {
        reload(&self.state, config)
    }

    /// See [`Recorder::flush`].
    pub async fn flush(&self) {
        self.state.recorder.flush().await;
    }

    /// Waits for every exchange and drain until `deadline`, then stops those still running
    /// (each records what it has, marked truncated), then drains the recorder into the store
    /// until `deadline` and into the spool after it. Call once the HTTP server has stopped (no connection is left to start new
    /// work).
    pub async fn shutdown(&self, deadline: Instant) {
        self.state.requests.close();
        if tokio::time::timeout_at(deadline, self.state.requests.wait())
            .await
            .is_err()
        {
            tracing::warn!("Requests outlived the shutdown grace period; recording them as cut.");
            self.state.abort.cancel();
            self.state.requests.wait().await;
        }
        // The records still queued get what is left of the grace to reach the store, and at
        // least a moment, which a healthy store needs for the last batch; the rest are
        // spooled.
        self.state
            .recorder
            .drain_until(deadline.max(Instant::now() + DRAIN_AT_LEAST));
        self.cancel.cancel();
        self.writer.close();
        self.writer.wait().await;
    }
}

pub(crate) fn reload(state: &AppState, config: &ProxyConfig) -> Result<Reloaded, ProxyBuildError> {
    let validated = config.validate().map_err(ProxyBuildError::Config)?;
    if validated.fixed != state.config {
        return Err(ProxyBuildError::NeedsRestart);
    }
    let _one_at_a_time = state
        .reloading
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let old = state.live.load_full();
    let new = live::Live::new(validated.live, Some(&old));
    let registered = state
        .registered
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .1
        .clone();
    let directory = new.config.consumers.with_registered(&registered);
    let names = |l: &live::Live| -> std::collections::BTreeSet<String> {
        l.config.backends.iter().map(|b| b.name.clone()).collect()
    };
    let (before, after) = (names(&old), names(&new));
    let reloaded = Reloaded {
        consumers: new.config.consumers.ids.len(),
        backends_added: after.difference(&before).cloned().collect(),
        backends_removed: before.difference(&after).cloned().collect(),
        deployments: new.config.routes.len(),
    };
    state.live.store(Arc::new(new));
    state.directory.store(Arc::new(directory));
    tracing::info!(
        consumers = reloaded.consumers,
        deployments = reloaded.deployments,
        added = ?reloaded.backends_added,
        removed = ?reloaded.backends_removed,
        "Configuration reloaded."
    );
    Ok(reloaded)
}
