//! An Azure OpenAI simulator, used by Tollgate's tests, benchmarks and the `tollgate up` demo.
//!
//! It serves `chat/completions`, `completions` and `embeddings` on the deployment-scoped
//! (`/openai/deployments/{d}/…?api-version=…`) and v1 (`/openai/v1/…`) surfaces, and the
//! Responses API (`/openai/v1/responses`, `/openai/responses`; typed events, usage in the final
//! one), with AOAI's status codes, error bodies, headers and SSE framing (prompt-annotation
//! frame, role frame, content frames, finish frame, the `include_usage` frame only when asked,
//! `data: [DONE]`), a prompt cache (`cached_tokens`), reasoning tokens for reasoning models,
//! and 400 `context_length_exceeded` past the deployment's context window.
//! Output is deterministic for a given deployment and request body, made of real tokens of the
//! deployment model's encoding, and its `usage` is the exact count of what it sent under the
//! counting rules of `tollgate-tokens`.
//!
//! Must not: depend on the proxy or parser; keep unbounded state (limit windows are per
//! deployment and fixed in size; the prompt cache is emptied past a fixed number of entries).

mod config;
mod error;
pub mod fault;
mod generate;
mod respond;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

pub use config::{DeploymentKind, SimConfig, SimDeployment, default_deployments};
pub use error::AoaiError;

/// API versions the simulator accepts on deployment-scoped routes; anything else gets AOAI's
/// "API version not supported".
pub const API_VERSIONS: &[&str] = &[
    "2022-12-01",
    "2023-05-15",
    "2023-06-01-preview",
    "2023-07-01-preview",
    "2023-08-01-preview",
    "2023-09-01-preview",
    "2023-10-01-preview",
    "2023-12-01-preview",
    "2024-02-01",
    "2024-02-15-preview",
    "2024-03-01-preview",
    "2024-04-01-preview",
    "2024-05-01-preview",
    "2024-06-01",
    "2024-07-01-preview",
    "2024-08-01-preview",
    "2024-09-01-preview",
    "2024-10-01-preview",
    "2024-10-21",
    "2024-12-01-preview",
    "2025-01-01-preview",
    "2025-02-01-preview",
    "2025-03-01-preview",
    "2025-04-01-preview",
    "2025-05-01-preview",
    "2025-06-01",
    "preview",
    "latest",
];

/// A running simulator's shared state; cheap to clone.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

struct Inner {
    config: SimConfig,
    deployments: HashMap<String, SimDeployment>,
    default_fault: Option<fault::Fault>,
    windows: respond::windows::Windows,
    requests: HashMap<String, AtomicU64>,
    total_requests: AtomicU64,
    prompt_cache: respond::PromptCache,
    files: respond::Files,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid simulator configuration: {}", .0.join("; "))]
pub struct SimConfigError(pub Vec<String>);

impl Simulator {
    pub fn new(config: SimConfig) -> Result<Self, SimConfigError> {
        config.validate().map_err(SimConfigError)?;
        tollgate_tokens::Encoding::warm_up();
        let default_fault = match &config.fault {
            Some(spec) => {
                Some(fault::Fault::parse(spec).map_err(|e| SimConfigError(vec![e.to_string()]))?)
            }
            None => None,
        };
        let deployments: HashMap<_, _> = config
            .deployments
            .iter()
            .map(|d| (d.name.clone(), d.clone()))
            .collect();
        let windows = respond::windows::Windows::new(deployments.keys());
        let requests = deployments
            .keys()
            .map(|k| (k.clone(), AtomicU64::new(0)))
            .collect();
        Ok(Simulator {
            inner: Arc::new(Inner {
                config,
                deployments,
                default_fault,
                windows,
                requests,
                total_requests: AtomicU64::new(0),
                prompt_cache: respond::PromptCache::default(),
                files: respond::Files::default(),
            }),
        })
    }

    /// The HTTP surface.
    pub fn router(&self) -> Router {
        // Multipart uploads (the Files API) are read whole; axum's default 2 MB cap would
        // refuse files AOAI takes.
        Router::new()
            .fallback(handle)
            .layer(axum::extract::DefaultBodyLimit::max(
                self.inner.config.max_body_bytes,
            ))
            .with_state(self.clone())
    }

    /// Requests that reached `deployment` (including those answered with an injected fault),
    /// so tests can assert exactly how many attempts a client or proxy made.
    pub fn requests_to(&self, deployment: &str) -> u64 {
        self.inner
            .requests
            .get(deployment)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Every request received, valid or not.
    pub fn total_requests(&self) -> u64 {
        self.inner.total_requests.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }
}

/// Shorthand for `Simulator::new(config)?.router()`.
pub fn router(config: SimConfig) -> Result<Router, SimConfigError> {
    Ok(Simulator::new(config)?.router())
}

async fn handle(State(sim): State<Simulator>, request: Request<Body>) -> Response {
    sim.inner.total_requests.fetch_add(1, Ordering::Relaxed);
    match respond::handle(&sim, request).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}
