//! Simulator configuration (`[sim]` in the Tollgate configuration file).

use serde::{Deserialize, Serialize};

/// What a deployment serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentKind {
    /// `chat/completions` and legacy `completions`.
    Chat,
    Embeddings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SimDeployment {
    /// Deployment name used in `/openai/deployments/{name}/…`.
    pub name: String,
    /// Model reported in responses; it also picks the tokenizer (e.g. `gpt-4o-2024-08-06`).
    pub model: String,
    pub kind: DeploymentKind,
    /// Requests per minute before answering 429; unlimited when absent.
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Tokens per minute (prompt + max_tokens, as AOAI estimates) before answering 429.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Embedding vector length when the request does not ask for `dimensions`.
    #[serde(default = "default_dimensions")]
    pub dimensions: usize,
    /// Most prompt tokens a request may have; more gets AOAI's 400 `context_length_exceeded`.
    /// The model's published context window when absent.
    #[serde(default)]
    pub context_window: Option<usize>,
}

impl SimDeployment {
    /// The configured context window, else the model family's published one (OpenAI model
    /// pages: gpt-4.1 1,047,576; gpt-4o and gpt-4-turbo 128,000; o-series 200,000; gpt-4
    /// 8,192; gpt-35-turbo 16,385; embeddings 8,191 input tokens).
    pub fn context_window(&self) -> usize {
        if let Some(w) = self.context_window {
            return w;
        }
        let m = self.model.as_str();
        if m.starts_with("gpt-4.1") {
            1_047_576
        } else if m.starts_with("gpt-4o") || m.starts_with("gpt-4-turbo") {
            128_000
        } else if m.starts_with('o') {
            200_000
        } else if m.starts_with("gpt-4") {
            8_192
        } else if m.starts_with("gpt-35") || m.starts_with("gpt-3.5") {
            16_385
        } else if m.starts_with("text-embedding") {
            8_191
        } else {
            128_000
        }
    }
}

fn default_dimensions() -> usize {
    1536
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// The key clients must send as `api-key` (or as a Bearer token). When absent, any
    /// non-empty key is accepted; Bearer tokens shaped like a JWT are always accepted, as an
    /// Entra ID token would be.
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default = "default_deployments")]
    pub deployments: Vec<SimDeployment>,
    /// Delay before the response headers (prompt processing), in milliseconds.
    #[serde(default)]
    pub time_to_first_token_ms: u64,
    /// Delay between streamed content frames, in milliseconds (for non-stream responses the
    /// total is added before the response).
    #[serde(default)]
    pub inter_token_ms: u64,
    /// Tokens per streamed content delta.
    #[serde(default = "default_tokens_per_delta")]
    pub tokens_per_delta: usize,
    /// Completion length range when the request sets no `max_tokens`.
    #[serde(default = "default_min_completion_tokens")]
    pub min_completion_tokens: usize,
    #[serde(default = "default_max_completion_tokens")]
    pub max_completion_tokens: usize,
    /// A fault applied to every request, in the `x-sim-fault` header syntax (see `fault`).
    #[serde(default)]
    pub fault: Option<String>,
    /// Largest request body accepted, in bytes (AOAI rejects larger with 413).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// As a resource with `disableLocalAuth`: keys are refused (403), only Entra ID tokens
    /// are accepted.
    #[serde(default)]
    pub local_auth_disabled: bool,
}

fn default_tokens_per_delta() -> usize {
    1
}
fn default_min_completion_tokens() -> usize {
    16
}
fn default_max_completion_tokens() -> usize {
    64
}
fn default_max_body_bytes() -> usize {
    32 * 1024 * 1024
}

/// The deployments `tollgate up` and the tests get when none are configured.
pub fn default_deployments() -> Vec<SimDeployment> {
    let chat = |name: &str, model: &str| SimDeployment {
        name: name.into(),
        model: model.into(),
        kind: DeploymentKind::Chat,
        requests_per_minute: None,
        tokens_per_minute: None,
        dimensions: default_dimensions(),
        context_window: None,
    };
    vec![
        chat("gpt-4o", "gpt-4o-2024-08-06"),
        chat("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
        chat("gpt-35-turbo", "gpt-35-turbo-0125"),
        // A reasoning model: its usage has reasoning tokens the stream never shows.
        chat("o4-mini", "o4-mini-2025-04-16"),
        SimDeployment {
            name: "text-embedding-3-small".into(),
            model: "text-embedding-3-small".into(),
            kind: DeploymentKind::Embeddings,
            requests_per_minute: None,
            tokens_per_minute: None,
            dimensions: 1536,
            context_window: None,
        },
    ]
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            api_key: None,
            deployments: default_deployments(),
            time_to_first_token_ms: 0,
            inter_token_ms: 0,
            tokens_per_delta: default_tokens_per_delta(),
            min_completion_tokens: default_min_completion_tokens(),
            max_completion_tokens: default_max_completion_tokens(),
            fault: None,
            max_body_bytes: default_max_body_bytes(),
            local_auth_disabled: false,
        }
    }
}

impl SimConfig {
    /// Every problem with the configuration, at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.tokens_per_delta == 0 {
            problems.push("sim.tokens_per_delta must be at least 1".to_owned());
        }
        if self.min_completion_tokens == 0
            || self.min_completion_tokens > self.max_completion_tokens
        {
            problems.push(
                "sim.min_completion_tokens must be >= 1 and <= sim.max_completion_tokens"
                    .to_owned(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.deployments {
            if !seen.insert(d.name.as_str()) {
                problems.push(format!("sim.deployments: `{}` is listed twice", d.name));
            }
        }
        if let Some(spec) = &self.fault
            && let Err(e) = crate::fault::Fault::parse(spec)
        {
            problems.push(format!("sim.fault: {e}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}
