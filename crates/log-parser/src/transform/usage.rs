//! Usage: AOAI's own figures when the response carried them, otherwise a count with the
//! model's tokenizer under the rules of `tollgate-tokens`, marked `estimated`.

use serde_json::Value;
use tollgate_records::{Usage, UsageSource};
use tollgate_tokens::CompletionParts;

use super::stitch::Stitched;

/// AOAI's `usage` object (chat/completions/embeddings shape, or the Responses API shape).
pub fn reported(usage: &Value) -> Option<Usage> {
    let n = |path: &str| usage.pointer(path).and_then(Value::as_u64);
    let input = n("/prompt_tokens").or_else(|| n("/input_tokens"))?;
    let output = n("/completion_tokens")
        .or_else(|| n("/output_tokens"))
        .unwrap_or(0);
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: n("/total_tokens").unwrap_or(input + output),
        cached_input_tokens: n("/prompt_tokens_details/cached_tokens")
            .or_else(|| n("/input_tokens_details/cached_tokens"))
            .unwrap_or(0),
        reasoning_tokens: n("/completion_tokens_details/reasoning_tokens")
            .or_else(|| n("/output_tokens_details/reasoning_tokens"))
            .unwrap_or(0),
        audio_input_tokens: n("/prompt_tokens_details/audio_tokens").unwrap_or(0),
        audio_output_tokens: n("/completion_tokens_details/audio_tokens").unwrap_or(0),
        source: UsageSource::Reported,
    })
}

/// Counts what was sent and received; `None` for operations Tollgate cannot count.
pub fn estimate(
    operation: &str,
    model: &str,
    request: Option<&Value>,
    stitched: &Stitched,
) -> Option<Usage> {
    let request = request?;
    let calls: Vec<Vec<(&str, &str)>> = stitched
        .choices
        .iter()
        .map(|c| {
            let mut calls: Vec<(&str, &str)> = c
                .tool_calls
                .iter()
                .map(|t| (t.name.as_str(), t.arguments.as_str()))
                .collect();
            if let Some(f) = &c.function_call {
                calls.push((f.name.as_str(), f.arguments.as_str()));
            }
            calls
        })
        .collect();
    let parts: Vec<CompletionParts<'_>> = stitched
        .choices
        .iter()
        .zip(&calls)
        .map(|(c, calls)| CompletionParts {
            content: c.content.as_deref(),
            refusal: c.refusal.as_deref(),
            calls,
        })
        .collect();
    let (input, output) = match operation {
        "chat.completions" => (
            tollgate_tokens::count_chat_prompt(model, request),
            tollgate_tokens::count_completion(model, &parts),
        ),
        "completions" => (
            tollgate_tokens::count_completions_prompt(model, request.get("prompt")?),
            tollgate_tokens::count_completion(model, &parts),
        ),
        "embeddings" => (
            tollgate_tokens::count_embeddings_input(model, request.get("input")?),
            0,
        ),
        _ => return None,
    };
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: input + output,
        cached_input_tokens: 0,
        reasoning_tokens: 0,
        audio_input_tokens: 0,
        audio_output_tokens: 0,
        source: UsageSource::Estimated,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reported_reads_details() {
        let u = reported(
            &json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 3},
            "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 1}}),
        )
        .unwrap();
        assert_eq!((u.audio_input_tokens, u.audio_output_tokens), (3, 1));
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.total_tokens),
            (10, 5, 15)
        );
        assert_eq!((u.cached_input_tokens, u.reasoning_tokens), (4, 2));
        assert_eq!(u.source, UsageSource::Reported);
        let r = reported(&json!({"input_tokens": 3, "output_tokens": 4})).unwrap();
        assert_eq!(r.total_tokens, 7);
        assert!(reported(&json!({})).is_none());
    }
}
