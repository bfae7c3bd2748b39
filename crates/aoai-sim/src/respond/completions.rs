//! Legacy `completions`: one text per prompt and choice, as a `text_completion` body or stream.

use serde_json::{Value, json};
use tollgate_tokens::{CompletionParts, Encoding};

use super::frames::{self, Piece, Shape, StreamChoice, StreamPlan};
use super::{Answer, Reply, params};
use crate::config::{SimConfig, SimDeployment};
use crate::error::AoaiError;
use crate::generate;

/// AOAI's default cap when the request sets no `max_tokens`.
const DEFAULT_MAX_TOKENS: usize = 16;

pub(crate) fn answer(
    config: &SimConfig,
    d: &SimDeployment,
    body: &Value,
    seed: u64,
) -> Result<Answer, AoaiError> {
    let prompt = body.get("prompt").ok_or_else(|| {
        AoaiError::invalid_request("'prompt' is a required property", Some("prompt"))
    })?;
    let streaming = params::streaming(body)?;
    let n = params::n_choices(body)?;
    let cap = params::max_tokens(body)?.or(Some(DEFAULT_MAX_TOKENS));
    let enc = Encoding::for_model(&d.model);
    let prompts = tollgate_tokens::split_inputs(prompt).len().max(1);
    let prompt_tokens = tollgate_tokens::count_completions_prompt(&d.model, prompt);
    params::within_context(d, prompt_tokens)?;
    let mut rng = generate::rng(seed);
    let id = format!("cmpl-{}", generate::alnum_id(&mut rng, 29));
    let texts: Vec<generate::Text> = (0..n * prompts)
        .map(|_| {
            let target = params::target_len(config, &mut rng);
            generate::text(enc, &mut rng, target, cap)
        })
        .collect();
    let parts: Vec<CompletionParts<'_>> = texts
        .iter()
        .map(|t| CompletionParts {
            content: Some(&t.text),
            ..Default::default()
        })
        .collect();
    let completion_tokens = tollgate_tokens::count_completion(&d.model, &parts);
    let created = frames::created_now();

    let reply = if streaming.stream {
        Reply::Stream(StreamPlan {
            shape: Shape::Completion,
            id,
            created,
            model: d.model.clone(),
            system_fingerprint: None,
            prompts,
            include_usage: streaming.include_usage,
            choices: texts
                .into_iter()
                .map(|t| StreamChoice {
                    has_text: true,
                    pieces: generate::deltas(enc, &t.text, config.tokens_per_delta)
                        .into_iter()
                        .map(Piece::Text)
                        .collect(),
                    finish_reason: t.finish_reason,
                })
                .collect(),
        })
    } else {
        let choices: Vec<Value> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                json!({"text": t.text, "index": i, "finish_reason": t.finish_reason,
                       "logprobs": null, "content_filter_results": frames::filter_results(false)})
            })
            .collect();
        Reply::Json(
            json!({"id": id, "object": "text_completion", "created": created, "model": d.model,
                   "choices": choices, "prompt_filter_results": frames::prompt_filter_results(prompts),
                   "usage": frames::usage_json(&frames::Figures::new(prompt_tokens, completion_tokens))}),
        )
    };
    Ok(Answer {
        reply,
        figures: frames::Figures::new(prompt_tokens, completion_tokens),
    })
}
