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
    let prompt = tollgate_tokens::count_chat_prompt(&d.model, &json!({"messages": messages}));
    params::within_context(d, prompt)?;
    let mut rng = generate::rng(seed);
    let id = format!("resp_{}", generate::alnum_id(&mut rng, 48));
    let message_id = format!("msg_{}", generate::alnum_id(&mut rng, 48));
    let target = params::target_len(config, &mut rng);
    let text = generate::text(enc, &mut rng, target, cap);
    let reasoning = params::reasoning_tokens(d, &mut rng);
    let figures = Figures {
        prompt,
        completion: enc.count(&text.text) + reasoning,
        cached: 0,
        reasoning,
    };
    let (status, incomplete) = if text.finish_reason == "length" {
        ("incomplete", json!({"reason": "max_output_tokens"}))
    } else {
        ("completed", Value::Null)
    };
    let created = frames::created_now();
    let message = |text: &str, status: &str| {
        json!({"type": "message", "id": message_id, "status": status, "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]})
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
    let done = response(status, vec![message(&text.text, "completed")], usage);
    let reply = if stream {
        let event = |value: &Value, paced: bool| {
            let kind = value["type"].as_str().unwrap_or("");
            Frame {
                bytes: Bytes::from(format!("event: {kind}\ndata: {value}\n\n")),
                paced,
            }
        };
        let mut events = vec![
            event(
                &json!({"type": "response.created", "response": response("in_progress", vec![], Value::Null)}),
                false,
            ),
            event(
                &json!({"type": "response.output_item.added", "output_index": 0, "item": message("", "in_progress")}),
                false,
            ),
        ];
        for piece in generate::deltas(enc, &text.text, config.tokens_per_delta) {
            events.push(event(
                &json!({"type": "response.output_text.delta", "item_id": message_id,
                        "output_index": 0, "content_index": 0, "delta": piece}),
                true,
            ));
        }
        events.push(event(
            &json!({"type": "response.output_text.done", "item_id": message_id,
                    "output_index": 0, "content_index": 0, "text": text.text}),
            false,
        ));
        events.push(event(
            &json!({"type": "response.output_item.done", "output_index": 0, "item": message(&text.text, "completed")}),
            false,
        ));
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
