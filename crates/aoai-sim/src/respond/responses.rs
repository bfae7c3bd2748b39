//! The Responses API (`POST /openai/v1/responses`, `/openai/responses`): `input` (a string or
//! a list of messages) and `instructions` in, one assistant message out. Non-stream, the
//! `response` object; streamed, typed events (`event: response.created` … `response.completed`)
//! with the text as `response.output_text.delta` and the usage only in the final event, and no
//! `[DONE]`.

use bytes::Bytes;
use serde_json::{Value, json};
use tollgate_tokens::Encoding;

use super::frames::{self, Figures, Frame};
use super::{Answer, Reply};
use crate::config::{SimConfig, SimDeployment};
use crate::error::AoaiError;
use crate::generate;

use super::params;

/// The request's input as chat messages, for counting: `instructions` as a system message,
/// a string `input` as one user message.
fn as_messages(body: &Value) -> Result<Vec<Value>, AoaiError> {
    let mut messages = Vec::new();
    if let Some(i) = body.get("instructions").and_then(Value::as_str) {
        messages.push(json!({"role": "system", "content": i}));
    }
    match body.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for item in items {
                let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                let content = match item.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join(""),
                    _ => String::new(),
                };
                messages.push(json!({"role": role, "content": content}));
            }
        }
        _ => {
            return Err(AoaiError::invalid_request(
                "'input' is a required property",
                Some("input"),
            ));
        }
    }
    Ok(messages)
}

/// The functions a `tool_choice: "required"` request calls (at most four), else none: the
/// answer is then text.
fn functions_to_call(body: &Value) -> Vec<Value> {
    let required = body.get("tool_choice").and_then(Value::as_str) == Some("required");
    if !required {
        return Vec::new();
    }
    body.get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
        .take(4)
        .cloned()
        .collect()
}

/// The Responses tools in chat form, so their definitions are counted as chat tools are.
fn as_chat_tools(body: &Value) -> Vec<Value> {
    body.get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
        .map(|t| {
            json!({"type": "function", "function": {"name": t.get("name"),
                   "description": t.get("description"), "parameters": t.get("parameters")}})
        })
        .collect()
}

pub(crate) fn answer(
    config: &SimConfig,
    d: &SimDeployment,
    body: &Value,
    seed: u64,
) -> Result<Answer, AoaiError> {
    let messages = as_messages(body)?;
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let cap = body
        .get("max_output_tokens")
        .and_then(Value::as_u64)
        .map(|n| n as usize);
    let enc = Encoding::for_model(&d.model);
    let tools = as_chat_tools(body);
    let counted = if tools.is_empty() {
        json!({"messages": messages})
    } else {
        json!({"messages": messages, "tools": tools})
    };
    let prompt = tollgate_tokens::count_chat_prompt(&d.model, &counted);
    params::within_context(d, prompt)?;
    let mut rng = generate::rng(seed);
    let id = format!("resp_{}", generate::alnum_id(&mut rng, 48));
    let message_id = format!("msg_{}", generate::alnum_id(&mut rng, 48));
    let functions = functions_to_call(body);
    let calls: Vec<(String, String, String)> = functions
        .iter()
        .map(|f| generate::call(&mut rng, f))
        .collect();
    let text = if calls.is_empty() {
        let target = params::target_len(config, &mut rng);
        Some(generate::text(enc, &mut rng, target, cap))
    } else {
        None
    };
    let reasoning = params::reasoning_tokens(d, &mut rng);
    let call_refs: Vec<(&str, &str)> = calls
        .iter()
        .map(|(_, n, a)| (n.as_str(), a.as_str()))
        .collect();
    let parts = [tollgate_tokens::CompletionParts {
        content: text.as_ref().map(|t| t.text.as_str()),
        refusal: None,
        calls: &call_refs,
    }];
    let figures = Figures {
        prompt,
        completion: tollgate_tokens::count_completion(&d.model, &parts) + reasoning,
        cached: 0,
        reasoning,
    };
    let (status, incomplete) = if text.as_ref().is_some_and(|t| t.finish_reason == "length") {
        ("incomplete", json!({"reason": "max_output_tokens"}))
    } else {
        ("completed", Value::Null)
    };
    let created = frames::created_now();
    let message = |text: &str, status: &str| {
        json!({"type": "message", "id": message_id, "status": status, "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]})
    };
    let call_item =
        |(call_id, name, _): &(String, String, String), arguments: &str, status: &str| {
            json!({"type": "function_call", "id": format!("fc_{call_id}"), "call_id": call_id,
               "name": name, "arguments": arguments, "status": status})
        };
    let response = |status: &str, output: Vec<Value>, usage: Value| {
        json!({"id": id, "object": "response", "created_at": created, "status": status,
               "model": d.model, "output": output, "incomplete_details": incomplete,
               "usage": usage})
    };
    let usage = json!({
        "input_tokens": figures.prompt,
        "input_tokens_details": {"cached_tokens": figures.cached},
        "output_tokens": figures.completion,
        "output_tokens_details": {"reasoning_tokens": figures.reasoning},
        "total_tokens": figures.prompt + figures.completion,
    });
    let output: Vec<Value> = match &text {
        Some(t) => vec![message(&t.text, "completed")],
        None => calls
            .iter()
            .map(|c| call_item(c, &c.2, "completed"))
            .collect(),
    };
    let done = response(status, output, usage);
    let reply = if stream {
        let event = |value: &Value, paced: bool| {
            let kind = value["type"].as_str().unwrap_or("");
            Frame {
                bytes: Bytes::from(format!("event: {kind}\ndata: {value}\n\n")),
                paced,
            }
        };
        let mut events = vec![event(
            &json!({"type": "response.created", "response": response("in_progress", vec![], Value::Null)}),
            false,
        )];
        match &text {
            Some(t) => {
                events.push(event(
                    &json!({"type": "response.output_item.added", "output_index": 0, "item": message("", "in_progress")}),
                    false,
                ));
                for piece in generate::deltas(enc, &t.text, config.tokens_per_delta) {
                    events.push(event(
                        &json!({"type": "response.output_text.delta", "item_id": message_id,
                                "output_index": 0, "content_index": 0, "delta": piece}),
                        true,
                    ));
                }
                events.push(event(
                    &json!({"type": "response.output_text.done", "item_id": message_id,
                            "output_index": 0, "content_index": 0, "text": t.text}),
                    false,
                ));
                events.push(event(
                    &json!({"type": "response.output_item.done", "output_index": 0, "item": message(&t.text, "completed")}),
                    false,
                ));
            }
            None => {
                for (i, c) in calls.iter().enumerate() {
                    let item_id = format!("fc_{}", c.0);
                    events.push(event(
                        &json!({"type": "response.output_item.added", "output_index": i, "item": call_item(c, "", "in_progress")}),
                        false,
                    ));
                    for piece in generate::deltas(enc, &c.2, config.tokens_per_delta.max(2)) {
                        events.push(event(
                            &json!({"type": "response.function_call_arguments.delta", "item_id": item_id,
                                    "output_index": i, "delta": piece}),
                            true,
                        ));
                    }
                    events.push(event(
                        &json!({"type": "response.function_call_arguments.done", "item_id": item_id,
                                "output_index": i, "arguments": c.2}),
                        false,
                    ));
                    events.push(event(
                        &json!({"type": "response.output_item.done", "output_index": i, "item": call_item(c, &c.2, "completed")}),
                        false,
                    ));
                }
            }
        }
        let terminal = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        events.push(event(&json!({"type": terminal, "response": done}), false));
        Reply::Events(events)
    } else {
        Reply::Json(done)
    };
    Ok(Answer { reply, figures })
}
