//! The body parameters chat and completions share (`stream`, `stream_options`, `n`, the
//! completion-length caps) and how long an uncapped answer runs.

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::Value;

use crate::config::{SimConfig, SimDeployment};
use crate::error::AoaiError;

/// How the answer is to be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Streaming {
    pub(crate) stream: bool,
    /// `stream_options.include_usage`; only allowed on a streamed request.
    pub(crate) include_usage: bool,
}

pub(crate) fn streaming(body: &Value) -> Result<Streaming, AoaiError> {
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(_) if !stream => {
            return Err(AoaiError::invalid_request(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                Some("stream_options"),
            ));
        }
        Some(opts) => opts
            .get("include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    Ok(Streaming {
        stream,
        include_usage,
    })
}

pub(crate) fn n_choices(body: &Value) -> Result<usize, AoaiError> {
    match body.get("n") {
        None | Some(Value::Null) => Ok(1),
        Some(v) => match v.as_u64() {
            Some(n @ 1..=128) => Ok(n as usize),
            _ => Err(AoaiError::invalid_request(
                format!("{v} is not valid for 'n': it must be an integer from 1 to 128."),
                Some("n"),
            )),
        },
    }
}

/// `max_completion_tokens`, else `max_tokens`; `None` when neither is set.
pub(crate) fn max_tokens(body: &Value) -> Result<Option<usize>, AoaiError> {
    for key in ["max_completion_tokens", "max_tokens"] {
        match body.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => return Ok(Some(n as usize)),
                _ => {
                    return Err(AoaiError::invalid_request(
                        format!(
                            "Invalid '{key}': integer below minimum value. Expected a value >= 1, but got {v} instead."
                        ),
                        Some(key),
                    ));
                }
            },
        }
    }
    Ok(None)
}

/// How many words an answer aims for, within the configured completion range.
pub(crate) fn target_len(config: &SimConfig, rng: &mut StdRng) -> usize {
    rng.random_range(config.min_completion_tokens..=config.max_completion_tokens)
}

/// AOAI's 400 for a prompt over the deployment's context window.
pub(crate) fn within_context(d: &SimDeployment, prompt_tokens: u64) -> Result<(), AoaiError> {
    let window = d.context_window();
    if prompt_tokens > window as u64 {
        return Err(AoaiError::context_length_exceeded(window, prompt_tokens));
    }
    Ok(())
}

/// Tokens a reasoning model thinks before it answers (billed as output, never sent); none for
/// other models.
pub(crate) fn reasoning_tokens(d: &SimDeployment, rng: &mut StdRng) -> u64 {
    if tollgate_tokens::is_reasoning_model(&d.model) {
        rng.random_range(16..=256)
    } else {
        0
    }
}
