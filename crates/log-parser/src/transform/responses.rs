//! Stitches Responses API answers (`/openai/v1/responses`, `/openai/responses`). A stream is a
//! sequence of typed events rather than chat chunks: text arrives as
//! `response.output_text.delta`, function calls as `response.output_item.added` plus
//! `response.function_call_arguments.delta`, and the usage, model and id only in the final
//! `response.completed` (or `.incomplete` / `.failed`) event's `response`. A non-stream answer
//! is that same `response` object. Both become one assistant choice.

use std::collections::BTreeMap;

use serde_json::Value;
use tollgate_records::{Choice, ToolCall};

use super::sse::SseEvent;
use super::stitch::Stitched;

/// Whether a body is a Responses API answer (errors have the usual `error` shape).
pub fn is_response(body: &Value) -> bool {
    body.get("object").and_then(Value::as_str) == Some("response")
}

/// The fields of a `response` object: its output as one choice, usage, model, id.
pub fn from_body(response: &Value) -> Stitched {
    let mut out = header(response);
    let mut choice = Choice {
        role: Some("assistant".into()),
        ..Default::default()
    };
    for item in response
        .get("output")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                for part in item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    match part.get("type").and_then(Value::as_str) {
                        Some("output_text") => push(&mut choice.content, part.get("text")),
                        Some("refusal") => push(&mut choice.refusal, part.get("refusal")),
                        _ => {}
                    }
                }
            }
            Some("function_call") => {
                let index = choice.tool_calls.len() as u32;
                choice.tool_calls.push(call(index, item));
            }
            _ => {}
        }
    }
    choice.finish_reason = finish_reason(response, !choice.tool_calls.is_empty());
    out.choices = vec![choice];
    out
}

/// A stream's events; the final `response` wins where it arrived, the deltas where the stream
/// was cut before it.
pub fn stitch_events(events: &[SseEvent]) -> Stitched {
    let mut text: Option<String> = None;
    let mut calls: BTreeMap<u64, ToolCall> = BTreeMap::new();
    let mut last_response: Option<Value> = None;
    let mut error = None;
    let mut malformed = 0;
    for e in events {
        let Ok(event) = serde_json::from_str::<Value>(e.data.trim()) else {
            malformed += 1;
            continue;
        };
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .or(e.event.as_deref())
            .unwrap_or("");
        let output_index = event
            .get("output_index")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        match kind {
            "response.output_text.delta" => push(&mut text, event.get("delta")),
            "response.output_item.added"
                if event.pointer("/item/type").and_then(Value::as_str) == Some("function_call") =>
            {
                let index = calls.len() as u32;
                let item = event.get("item").unwrap_or(&Value::Null);
                calls.insert(output_index, call(index, item));
            }
            "response.function_call_arguments.delta" => {
                if let Some(c) = calls.get_mut(&output_index) {
                    c.arguments
                        .push_str(event.get("delta").and_then(Value::as_str).unwrap_or(""));
                }
            }
            "error" => error = Some(event.clone()),
            _ => {
                if let Some(r) = event.get("response").filter(|r| r.is_object()) {
                    last_response = Some(r.clone());
                }
            }
        }
    }
    let complete = last_response.as_ref().is_some_and(|r| {
        r.get("output")
            .and_then(Value::as_array)
            .is_some_and(|o| !o.is_empty())
    });
    let mut out = match &last_response {
        Some(r) if complete => from_body(r),
        other => {
            let mut out = other.as_ref().map(header).unwrap_or_default();
            let tool_calls: Vec<ToolCall> = calls.into_values().collect();
            out.choices = vec![Choice {
                role: Some("assistant".into()),
                content: text,
                finish_reason: other
                    .as_ref()
                    .and_then(|r| finish_reason(r, !tool_calls.is_empty())),
                tool_calls,
                ..Default::default()
            }];
            out
        }
    };
    out.malformed_frames = malformed;
    out.error = out.error.or(error);
    // A Responses stream has no `[DONE]`: its terminal event is what ends it.
    out.done = last_response
        .as_ref()
        .and_then(|r| r.get("status"))
        .and_then(Value::as_str)
        .is_some_and(|s| matches!(s, "completed" | "incomplete" | "failed"));
    out
}

fn header(response: &Value) -> Stitched {
    let text = |key: &str| {
        response
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    Stitched {
        id: text("id"),
        model: text("model"),
        usage: response.get("usage").filter(|u| u.is_object()).cloned(),
        error: response.get("error").filter(|e| !e.is_null()).cloned(),
        ..Default::default()
    }
}

fn push(slot: &mut Option<String>, piece: Option<&Value>) {
    if let Some(piece) = piece.and_then(Value::as_str) {
        slot.get_or_insert_with(String::new).push_str(piece);
    }
}

fn call(index: u32, item: &Value) -> ToolCall {
    let text = |key: &str| {
        item.get(key)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    ToolCall {
        index,
        id: item
            .get("call_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        kind: Some("function".into()),
        name: text("name"),
        arguments: text("arguments"),
    }
}

/// The chat-style finish reason of a response's status.
fn finish_reason(response: &Value, calls: bool) -> Option<String> {
    let reason = match response.get("status").and_then(Value::as_str)? {
        "completed" if calls => "tool_calls",
        "completed" => "stop",
        "incomplete" => match response
            .pointer("/incomplete_details/reason")
            .and_then(Value::as_str)
        {
            Some("max_output_tokens") => "length",
            Some("content_filter") => "content_filter",
            _ => "incomplete",
        },
        other => other,
    };
    Some(reason.to_owned())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::transform::sse::SseParser;

    /// A response as the Responses API reference shows it.
    fn response(status: &str) -> Value {
        json!({"id": "resp_1", "object": "response", "status": status, "model": "gpt-4o-2024-08-06",
            "output": [
                {"type": "message", "id": "msg_1", "role": "assistant",
                 "content": [{"type": "output_text", "text": "Hello there", "annotations": []}]},
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "lookup",
                 "arguments": "{\"q\":1}"}
            ],
            "usage": {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": 21}})
    }

    fn sse(events: &[Value]) -> Vec<SseEvent> {
        let text: String = events
            .iter()
            .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
            .collect();
        let mut p = SseParser::new();
        let mut out = p.push(text.as_bytes());
        out.extend(p.finish());
        out
    }

    #[test]
    fn a_body_becomes_one_choice_with_its_usage() {
        let s = from_body(&response("completed"));
        assert_eq!(s.model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(s.usage.as_ref().unwrap()["input_tokens"], 12);
        let c = &s.choices[0];
        assert_eq!(c.content.as_deref(), Some("Hello there"));
        assert_eq!(c.tool_calls[0].name, "lookup");
        assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn a_stream_takes_its_usage_from_the_completed_event() {
        let events = sse(&[
            json!({"type": "response.created", "response": {"id": "resp_1", "object": "response", "status": "in_progress", "model": "gpt-4o-2024-08-06", "output": []}}),
            json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "Hello"}),
            json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": " there"}),
            json!({"type": "response.completed", "response": response("completed")}),
        ]);
        let s = stitch_events(&events);
        assert!(s.done);
        assert_eq!(s.usage.as_ref().unwrap()["output_tokens"], 9);
        assert_eq!(s.choices[0].content.as_deref(), Some("Hello there"));
    }

    #[test]
    fn a_cut_stream_keeps_its_deltas_and_has_no_usage() {
        let events = sse(&[
            json!({"type": "response.created", "response": {"id": "resp_1", "object": "response", "status": "in_progress", "model": "gpt-4o-2024-08-06", "output": []}}),
            json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "Hel"}),
            json!({"type": "response.output_item.added", "output_index": 1, "item": {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": ""}}),
            json!({"type": "response.function_call_arguments.delta", "output_index": 1, "delta": "{\"q\""}),
        ]);
        let s = stitch_events(&events);
        assert!(!s.done && s.usage.is_none());
        assert_eq!(s.model.as_deref(), Some("gpt-4o-2024-08-06"));
        let c = &s.choices[0];
        assert_eq!(c.content.as_deref(), Some("Hel"));
        assert_eq!(c.tool_calls[0].arguments, "{\"q\"");
    }
}
