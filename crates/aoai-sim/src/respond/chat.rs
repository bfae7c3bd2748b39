//! `chat/completions`: text answers, tool calls and legacy function calls, as a
//! `chat.completion` body or stream.

use serde_json::{Value, json};
use tollgate_tokens::{CompletionParts, Encoding};

use super::frames::{self, Piece, Shape, StreamChoice, StreamPlan};
use super::{Answer, Reply, params};
use crate::config::{SimConfig, SimDeployment};
use crate::error::AoaiError;
use crate::generate;

/// Most tools one `tool_choice: "required"` answer calls.
const MAX_PARALLEL_CALLS: usize = 3;

/// What one chat choice produced.
struct ChatChoice {
    text: Option<String>,
    finish_reason: &'static str,
    /// (id, name, arguments)
    calls: Vec<(String, String, String)>,
    legacy_function: bool,
}

/// The tools the request asks the model to call, if it asks: `tool_choice` "required" calls
/// every tool (up to three, one when `parallel_tool_calls` is false); a named choice calls that
/// function; `auto`/`none` answer with text. Legacy `functions` with a named `function_call`
/// produce a `function_call`.
fn tools_to_call(body: &Value) -> (Vec<Value>, bool) {
    let tools: Vec<Value> = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(|t| t.get("function").cloned())
                .collect()
        })
        .unwrap_or_default();
    let by_name = |list: &[Value], name: &str| {
        list.iter()
            .filter(|f| f.get("name").and_then(Value::as_str) == Some(name))
            .cloned()
            .collect()
    };
    if !tools.is_empty() {
        let parallel = body
            .get("parallel_tool_calls")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        return match body.get("tool_choice") {
            Some(Value::String(s)) if s == "required" => {
                let n = if parallel {
                    tools.len().min(MAX_PARALLEL_CALLS)
                } else {
                    1
                };
                (tools.into_iter().take(n).collect(), false)
            }
            Some(Value::Object(choice)) => {
                let name = choice
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str);
                (name.map(|n| by_name(&tools, n)).unwrap_or_default(), false)
            }
            _ => (Vec::new(), false),
        };
    }
    let functions: Vec<Value> = body
        .get("functions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    match body.get("function_call") {
        Some(Value::Object(fc)) => match fc.get("name").and_then(Value::as_str) {
            Some(name) => (
                by_name(&functions, name).into_iter().take(1).collect(),
                true,
            ),
            None => (Vec::new(), true),
        },
        _ => (Vec::new(), true),
    }
}

pub(crate) fn answer(
    config: &SimConfig,
    d: &SimDeployment,
    body: &Value,
    seed: u64,
    cache: &super::PromptCache,
    completion_filter: bool,
) -> Result<Answer, AoaiError> {
    let messages = body.get("messages").ok_or_else(|| {
        AoaiError::invalid_request("'messages' is a required property", Some("messages"))
    })?;
    if messages.as_array().is_none_or(|m| m.is_empty()) {
        return Err(AoaiError::invalid_request(
            "[] is too short - 'messages'",
            Some("messages"),
        ));
    }
    let streaming = params::streaming(body)?;
    let n = params::n_choices(body)?;
    let cap = params::max_tokens(body)?;
    let enc = Encoding::for_model(&d.model);
    let prompt_tokens = tollgate_tokens::count_chat_prompt(&d.model, body);
    params::within_context(d, prompt_tokens)?;
    let (functions, legacy) = tools_to_call(body);

    let mut rng = generate::rng(seed);
    let id = format!("chatcmpl-{}", generate::alnum_id(&mut rng, 29));
    let fingerprint = format!(
        "fp_{:010x}",
        generate::stable_hash(&[d.model.as_bytes()]) >> 24
    );
    // A reasoning model thinks before it answers (billed as output, never sent), within the
    // same cap: a cap its reasoning uses up leaves an empty answer cut for `length`.
    let reasoning = match (params::reasoning_tokens(d, &mut rng), cap) {
        (r, Some(cap)) => r.min(cap as u64),
        (r, None) => r,
    };
    let cap = cap.map(|c| c - reasoning as usize);
    let choices: Vec<ChatChoice> = (0..n)
        .map(|_| {
            if functions.is_empty() {
                let target = params::target_len(config, &mut rng);
                let mut t = match cap {
                    Some(0) => generate::Text {
                        text: String::new(),
                        finish_reason: "length",
                    },
                    _ => generate::text(enc, &mut rng, target, cap),
                };
                if completion_filter {
                    t = generate::filtered(enc, &t.text);
                }
                ChatChoice {
                    text: Some(t.text),
                    finish_reason: t.finish_reason,
                    calls: vec![],
                    legacy_function: false,
                }
            } else {
                let calls = functions
                    .iter()
                    .map(|f| generate::call(&mut rng, f))
                    .collect();
                ChatChoice {
                    text: None,
                    finish_reason: if legacy {
                        "function_call"
                    } else {
                        "tool_calls"
                    },
                    calls,
                    legacy_function: legacy,
                }
            }
        })
        .collect();
    let call_refs: Vec<Vec<(&str, &str)>> = choices
        .iter()
        .map(|c| {
            c.calls
                .iter()
                .map(|(_, n, a)| (n.as_str(), a.as_str()))
                .collect()
        })
        .collect();
    let parts: Vec<CompletionParts<'_>> = choices
        .iter()
        .zip(&call_refs)
        .map(|(c, calls)| CompletionParts {
            content: c.text.as_deref(),
            refusal: None,
            calls,
        })
        .collect();
    let figures = frames::Figures {
        prompt: prompt_tokens,
        completion: tollgate_tokens::count_completion(&d.model, &parts) + reasoning,
        cached: cache.cached_tokens(&d.name, enc, messages, prompt_tokens),
        reasoning,
    };
    let created = frames::created_now();

    let reply = if streaming.stream {
        Reply::Stream(StreamPlan {
            shape: Shape::Chat,
            id,
            created,
            model: d.model.clone(),
            system_fingerprint: Some(fingerprint),
            prompts: 1,
            include_usage: streaming.include_usage,
            choices: choices
                .iter()
                .map(|c| stream_choice(enc, config.tokens_per_delta, c))
                .collect(),
        })
    } else {
        Reply::Json(json!({
            "choices": choices.iter().enumerate().map(|(i, c)| json_choice(i, c)).collect::<Vec<_>>(),
            "created": created, "id": id, "model": d.model, "object": "chat.completion",
            "prompt_filter_results": frames::prompt_filter_results(1),
            "system_fingerprint": fingerprint,
            "usage": frames::usage_json(&figures),
        }))
    };
    Ok(Answer { reply, figures })
}

fn json_choice(index: usize, c: &ChatChoice) -> Value {
    let mut message =
        json!({"annotations": [], "content": c.text, "refusal": null, "role": "assistant"});
    if c.legacy_function {
        if let Some((_, name, args)) = c.calls.first() {
            message["function_call"] = json!({"name": name, "arguments": args});
        }
    } else if !c.calls.is_empty() {
        message["tool_calls"] = Value::Array(
            c.calls
                .iter()
                .map(|(id, name, args)| {
                    json!({"id": id, "type": "function",
                           "function": {"name": name, "arguments": args}})
                })
                .collect(),
        );
    }
    let filters = if c.finish_reason == "content_filter" {
        frames::flagged_results()
    } else {
        frames::filter_results(false)
    };
    json!({"content_filter_results": filters, "finish_reason": c.finish_reason,
           "index": index, "logprobs": null, "message": message})
}

/// The choice's deltas after its role frame: text pieces, then per call its name and its
/// arguments in fragments of at least two tokens.
fn stream_choice(enc: Encoding, tokens_per_delta: usize, c: &ChatChoice) -> StreamChoice {
    let mut pieces = Vec::new();
    if let Some(text) = &c.text {
        pieces.extend(
            generate::deltas(enc, text, tokens_per_delta)
                .into_iter()
                .map(Piece::Text),
        );
    }
    for (ci, (call_id, name, args)) in c.calls.iter().enumerate() {
        let fragments = generate::deltas(enc, args, tokens_per_delta.max(2));
        if c.legacy_function {
            pieces.push(Piece::Delta(
                json!({"function_call": {"name": name, "arguments": ""}}),
            ));
            pieces.extend(
                fragments
                    .into_iter()
                    .map(|p| Piece::Delta(json!({"function_call": {"arguments": p}}))),
            );
        } else {
            pieces.push(Piece::Delta(
                json!({"tool_calls": [{"index": ci, "id": call_id, "type": "function",
                                       "function": {"name": name, "arguments": ""}}]}),
            ));
            pieces.extend(fragments.into_iter().map(|p| {
                Piece::Delta(json!({"tool_calls": [{"index": ci, "function": {"arguments": p}}]}))
            }));
        }
    }
    StreamChoice {
        has_text: c.text.is_some(),
        pieces,
        finish_reason: c.finish_reason,
    }
}
