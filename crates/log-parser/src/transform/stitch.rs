//! Stitches AOAI responses into choices: chat streams (role, content, refusal, tool calls by
//! index with concatenated arguments, legacy `function_call`, finish reasons, `n > 1`, content
//! filter results, the `include_usage` frame), legacy completions streams, and the same fields
//! from non-stream bodies.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use tollgate_records::{Choice, FunctionCall, ToolCall};

use super::sse::SseEvent;

/// What a response said, whichever way it was sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stitched {
    pub id: Option<String>,
    pub model: Option<String>,
    pub system_fingerprint: Option<String>,
    pub choices: Vec<Choice>,
    pub usage: Option<Value>,
    pub prompt_filter_results: Option<Value>,
    /// The stream ended with `data: [DONE]`.
    pub done: bool,
    /// Frames that were not JSON (and not `[DONE]`).
    pub malformed_frames: usize,
    /// An `error` object sent in the stream or body.
    pub error: Option<Value>,
}

fn non_empty(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn append(slot: &mut Option<String>, piece: Option<&Value>) {
    if let Some(piece) = piece.and_then(Value::as_str) {
        slot.get_or_insert_with(String::new).push_str(piece);
    }
}

/// Merges content-filter annotations: later frames (asynchronous filter annotations) add or
/// update categories; empty objects change nothing.
fn merge_filters(slot: &mut Option<Value>, update: Option<&Value>) {
    let Some(Value::Object(update)) = update else {
        return;
    };
    if update.is_empty() {
        return;
    }
    let target = slot.get_or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(t) = target {
        for (k, v) in update {
            t.insert(k.clone(), v.clone());
        }
    }
}

/// A frame's choices with their indexes.
fn choices(frame: &Value) -> impl Iterator<Item = (u32, &Value)> {
    frame
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c.get("index").and_then(Value::as_u64).unwrap_or(0) as u32,
                c,
            )
        })
}

/// The parts of a choice every shape carries: its finish reason and filter annotations.
fn close(choice: &mut Choice, c: &Value) {
    if let Some(reason) = non_empty(c.get("finish_reason")) {
        choice.finish_reason = Some(reason);
    }
    merge_filters(
        &mut choice.content_filter_results,
        c.get("content_filter_results"),
    );
}

#[derive(Default)]
struct Builder {
    out: Stitched,
    choices: BTreeMap<u32, Choice>,
    tool_calls: BTreeMap<(u32, u32), ToolCall>,
}

impl Builder {
    fn header(&mut self, frame: &Value) {
        if self.out.id.is_none() {
            self.out.id = non_empty(frame.get("id"));
        }
        if self.out.model.is_none() {
            self.out.model = non_empty(frame.get("model"));
        }
        if self.out.system_fingerprint.is_none() {
            self.out.system_fingerprint = non_empty(frame.get("system_fingerprint"));
        }
        for key in ["prompt_filter_results", "prompt_annotations"] {
            if let Some(v) = frame.get(key).filter(|v| !v.is_null()) {
                self.out.prompt_filter_results = Some(v.clone());
            }
        }
        if let Some(u) = frame.get("usage").filter(|u| u.is_object()) {
            self.out.usage = Some(u.clone());
        }
        if let Some(e) = frame.get("error").filter(|e| !e.is_null()) {
            self.out.error = Some(e.clone());
        }
    }

    fn choice(&mut self, index: u32) -> &mut Choice {
        self.choices.entry(index).or_insert_with(|| Choice {
            index,
            ..Default::default()
        })
    }

    fn chat_chunk(&mut self, frame: &Value) {
        self.header(frame);
        for (index, c) in choices(frame) {
            let choice = self.choice(index);
            if let Some(delta) = c.get("delta") {
                if let Some(role) = non_empty(delta.get("role")) {
                    choice.role = Some(role);
                }
                append(&mut choice.content, delta.get("content"));
                append(&mut choice.refusal, delta.get("refusal"));
                if let Some(fc) = delta.get("function_call") {
                    let f = choice
                        .function_call
                        .get_or_insert_with(FunctionCall::default);
                    f.name
                        .push_str(fc.get("name").and_then(Value::as_str).unwrap_or(""));
                    f.arguments
                        .push_str(fc.get("arguments").and_then(Value::as_str).unwrap_or(""));
                }
                for call in delta
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let call_index = call.get("index").and_then(Value::as_u64).unwrap_or(0) as u32;
                    let t = self
                        .tool_calls
                        .entry((index, call_index))
                        .or_insert_with(|| ToolCall {
                            index: call_index,
                            id: None,
                            kind: None,
                            name: String::new(),
                            arguments: String::new(),
                        });
                    if let Some(id) = non_empty(call.get("id")) {
                        t.id = Some(id);
                    }
                    if let Some(kind) = non_empty(call.get("type")) {
                        t.kind = Some(kind);
                    }
                    let f = call.get("function");
                    t.name.push_str(
                        f.and_then(|f| f.get("name"))
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                    );
                    t.arguments.push_str(
                        f.and_then(|f| f.get("arguments"))
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                    );
                }
            }
            let choice = self.choice(index);
            close(choice, c);
        }
    }

    fn completions_chunk(&mut self, frame: &Value) {
        self.header(frame);
        for (index, c) in choices(frame) {
            let choice = self.choice(index);
            append(&mut choice.content, c.get("text"));
            close(choice, c);
        }
    }

    fn finish(mut self) -> Stitched {
        for ((choice, _), call) in std::mem::take(&mut self.tool_calls) {
            self.choice(choice).tool_calls.push(call);
        }
        self.out.choices = self.choices.into_values().collect();
        self.out
    }
}

/// Which response shape a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Chat,
    Completions,
}

pub fn stitch_stream(kind: StreamKind, events: &[SseEvent]) -> Stitched {
    let mut b = Builder::default();
    for e in events {
        let data = e.data.trim();
        if data == "[DONE]" {
            b.out.done = true;
            continue;
        }
        let Ok(frame) = serde_json::from_str::<Value>(data) else {
            b.out.malformed_frames += 1;
            continue;
        };
        match kind {
            StreamKind::Chat => b.chat_chunk(&frame),
            StreamKind::Completions => b.completions_chunk(&frame),
        }
    }
    b.finish()
}

/// The same fields from a non-stream chat, completions or embeddings body.
pub fn from_body(body: &Value) -> Stitched {
    let mut b = Builder::default();
    b.header(body);
    for (index, c) in choices(body) {
        let choice = b.choice(index);
        if let Some(m) = c.get("message") {
            choice.role = non_empty(m.get("role"));
            choice.content = m.get("content").and_then(Value::as_str).map(str::to_owned);
            choice.refusal = m.get("refusal").and_then(Value::as_str).map(str::to_owned);
            if let Some(fc) = m.get("function_call") {
                choice.function_call = Some(FunctionCall {
                    name: fc
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    arguments: fc
                        .get("arguments")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                });
            }
            for (i, call) in m
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let f = call.get("function");
                choice.tool_calls.push(ToolCall {
                    index: i as u32,
                    id: non_empty(call.get("id")),
                    kind: non_empty(call.get("type")),
                    name: f
                        .and_then(|f| f.get("name"))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    arguments: f
                        .and_then(|f| f.get("arguments"))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                });
            }
        } else {
            choice.content = c.get("text").and_then(Value::as_str).map(str::to_owned);
        }
        close(choice, c);
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::transform::sse::SseParser;

    fn events(frames: &[Value]) -> Vec<SseEvent> {
        let mut text: String = frames.iter().map(|f| format!("data: {f}\n\n")).collect();
        text.push_str("data: [DONE]\n\n");
        let mut p = SseParser::new();
        let mut out = p.push(text.as_bytes());
        out.extend(p.finish());
        out
    }

    #[test]
    fn chat_stream_with_tool_calls_n2_filters_and_usage() {
        let f = [
            json!({"choices": [], "id": "", "model": "", "prompt_filter_results": [{"prompt_index": 0}]}),
            json!({"id": "c1", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            json!({"id": "c1", "choices": [{"index": 1, "delta": {"role": "assistant", "content": "B"}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get", "arguments": ""}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "call_2", "type": "function", "function": {"name": "put", "arguments": "{\"b\""}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "function": {"arguments": ":2}"}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 1, "delta": {"content": "ye"}, "content_filter_results": {"hate": {"filtered": false}}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"id": "c1", "choices": [{"index": 1, "delta": {}, "finish_reason": "stop", "content_filter_results": {}}]}),
            json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}),
        ];
        let s = stitch_stream(StreamKind::Chat, &events(&f));
        assert!(s.done);
        assert_eq!(s.id.as_deref(), Some("c1"));
        assert_eq!(s.model.as_deref(), Some("gpt-4o"));
        assert!(s.prompt_filter_results.is_some());
        assert_eq!(s.usage.as_ref().unwrap()["total_tokens"], 12);
        assert_eq!(s.choices.len(), 2);
        let c0 = &s.choices[0];
        assert_eq!(c0.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(c0.tool_calls.len(), 2);
        assert_eq!(c0.tool_calls[0].arguments, "{\"a\":1}");
        assert_eq!(c0.tool_calls[1].arguments, "{\"b\":2}");
        assert_eq!(c0.tool_calls[1].id.as_deref(), Some("call_2"));
        let c1 = &s.choices[1];
        assert_eq!(c1.content.as_deref(), Some("Bye"));
        assert_eq!(
            c1.content_filter_results.as_ref().unwrap()["hate"]["filtered"],
            false
        );
    }

    #[test]
    fn legacy_function_call_and_refusal() {
        let f = [
            json!({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "function_call": {"name": "f", "arguments": ""}}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"function_call": {"arguments": "{}"}}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"refusal": "No"}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"refusal": "pe"}, "finish_reason": "function_call"}]}),
        ];
        let s = stitch_stream(StreamKind::Chat, &events(&f));
        let c = &s.choices[0];
        assert_eq!(c.function_call.as_ref().unwrap().arguments, "{}");
        assert_eq!(c.refusal.as_deref(), Some("Nope"));
    }

    #[test]
    fn completions_stream_and_garbage_frames() {
        let mut ev = events(&[
            json!({"id": "x", "choices": [{"index": 0, "text": "Hel"}]}),
            json!({"id": "x", "choices": [{"index": 0, "text": "lo", "finish_reason": "length"}]}),
        ]);
        ev.insert(
            0,
            SseEvent {
                event: None,
                data: "not json".into(),
            },
        );
        let s = stitch_stream(StreamKind::Completions, &ev);
        assert_eq!(s.choices[0].content.as_deref(), Some("Hello"));
        assert_eq!(s.choices[0].finish_reason.as_deref(), Some("length"));
        assert_eq!(s.malformed_frames, 1);
    }

    #[test]
    fn non_stream_body() {
        let body = json!({"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "tool_calls",
            "message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}});
        let s = from_body(&body);
        assert_eq!(s.choices[0].tool_calls[0].name, "f");
        assert_eq!(s.usage.unwrap()["completion_tokens"], 2);
    }
}
