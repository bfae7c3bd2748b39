//! The JSON pieces responses share (content-filter results, `usage`, `created`) and the one
//! stream plan chat and completions fill in, which owns AOAI's SSE framing and stream ending.

use axum::body::Bytes;
use serde_json::{Value, json};

/// One SSE event, already framed (`data: …\n\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) bytes: Bytes,
    /// Carries generated content: delivery paces these by the inter-token delay.
    pub(crate) paced: bool,
}

const DONE: &[u8] = b"data: [DONE]\n\n";

fn sse(value: &Value, paced: bool) -> Frame {
    Frame {
        bytes: Bytes::from(format!("data: {value}\n\n")),
        paced,
    }
}

/// A completion's content-filter results when the filter stopped it.
pub(crate) fn flagged_results() -> Value {
    let safe = json!({"filtered": false, "severity": "safe"});
    json!({"hate": safe, "self_harm": safe, "sexual": safe,
           "violence": {"filtered": true, "severity": "medium"}})
}

/// Content-filter results that flag nothing: the prompt's form (`prompt`) or a completion's.
pub(crate) fn filter_results(prompt: bool) -> Value {
    let safe = json!({"filtered": false, "severity": "safe"});
    if prompt {
        json!({"hate": safe, "jailbreak": {"filtered": false, "detected": false},
               "self_harm": safe, "sexual": safe, "violence": safe})
    } else {
        json!({"hate": safe, "protected_material_code": {"filtered": false, "detected": false},
               "protected_material_text": {"filtered": false, "detected": false},
               "self_harm": safe, "sexual": safe, "violence": safe})
    }
}

pub(crate) fn prompt_filter_results(prompts: usize) -> Value {
    Value::Array(
        (0..prompts)
            .map(|i| json!({"prompt_index": i, "content_filter_results": filter_results(true)}))
            .collect(),
    )
}

/// A request's token figures, as its `usage` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Figures {
    pub(crate) prompt: u64,
    /// Visible completion plus `reasoning`.
    pub(crate) completion: u64,
    /// Of `prompt`, served from the prompt cache.
    pub(crate) cached: u64,
    /// Of `completion`, the reasoning a reasoning model billed and never sent.
    pub(crate) reasoning: u64,
}

impl Figures {
    pub(crate) fn new(prompt: u64, completion: u64) -> Figures {
        Figures {
            prompt,
            completion,
            ..Figures::default()
        }
    }
}

pub(crate) fn usage_json(f: &Figures) -> Value {
    json!({
        "completion_tokens": f.completion,
        "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0,
                                      "reasoning_tokens": f.reasoning, "rejected_prediction_tokens": 0},
        "prompt_tokens": f.prompt,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": f.cached},
        "total_tokens": f.prompt + f.completion,
    })
}

/// Seconds since the Unix epoch, for `created`.
pub(crate) fn created_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How an operation's chunks carry a choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// `chat.completion.chunk`: a `delta` object per choice, opened by a role frame.
    Chat,
    /// `text_completion`: a `text` string per choice, no role frame.
    Completion,
}

/// One step of a choice's generated output.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Piece {
    /// Generated text (chat's `delta.content`, completions' `text`); carries the completion's
    /// content-filter results.
    Text(String),
    /// Any other chat delta (tool-call or function-call fragments), sent as is without filter
    /// results.
    Delta(Value),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StreamChoice {
    /// The choice answers with text, so chat's role frame opens `content` with `""` (else null).
    pub(crate) has_text: bool,
    pub(crate) pieces: Vec<Piece>,
    pub(crate) finish_reason: &'static str,
}

/// A streamed answer: which frames AOAI sends, in its order. [`StreamPlan::into_frames`]
/// renders the prompt-annotation frame, role frames (chat), content frames interleaved by
/// choice index, finish frames, the usage frame only when `include_usage`, then
/// `data: [DONE]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StreamPlan {
    pub(crate) shape: Shape,
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) system_fingerprint: Option<String>,
    /// Prompts the annotation frame reports filter results for.
    pub(crate) prompts: usize,
    /// `stream_options.include_usage`: every chunk then carries `"usage": null` and a final
    /// empty-choices chunk carries the usage.
    pub(crate) include_usage: bool,
    pub(crate) choices: Vec<StreamChoice>,
}

impl Shape {
    fn object(self) -> &'static str {
        match self {
            Shape::Chat => "chat.completion.chunk",
            Shape::Completion => "text_completion",
        }
    }

    fn choice(self, index: usize, payload: Value, finish: Option<&str>, filters: Value) -> Value {
        let mut c = json!({"content_filter_results": filters, "finish_reason": finish,
                           "index": index, "logprobs": null});
        let key = match self {
            Shape::Chat => "delta",
            Shape::Completion => "text",
        };
        c[key] = payload;
        c
    }

    fn role(self, index: usize, has_text: bool) -> Option<Value> {
        match self {
            Shape::Chat => {
                let content = if has_text { json!("") } else { Value::Null };
                let delta = json!({"content": content, "refusal": null, "role": "assistant"});
                Some(self.choice(index, delta, None, json!({})))
            }
            Shape::Completion => None,
        }
    }

    fn content(self, index: usize, piece: Piece) -> Value {
        match (self, piece) {
            (Shape::Chat, Piece::Text(t)) => {
                self.choice(index, json!({"content": t}), None, filter_results(false))
            }
            (Shape::Completion, Piece::Text(t)) => {
                self.choice(index, json!(t), None, filter_results(false))
            }
            (_, Piece::Delta(delta)) => self.choice(index, delta, None, json!({})),
        }
    }

    fn finish(self, index: usize, reason: &str) -> Value {
        let empty = match self {
            Shape::Chat => json!({}),
            Shape::Completion => json!(""),
        };
        let filters = if reason == "content_filter" {
            flagged_results()
        } else {
            json!({})
        };
        self.choice(index, empty, Some(reason), filters)
    }
}

impl StreamPlan {
    fn chunk(&self, choices: Vec<Value>) -> Value {
        let mut v = json!({"choices": choices, "created": self.created, "id": self.id,
                           "model": self.model, "object": self.shape.object()});
        if let Some(fp) = &self.system_fingerprint {
            v["system_fingerprint"] = json!(fp);
        }
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The frames, `usage` reporting the given counts.
    pub(crate) fn into_frames(mut self, figures: &Figures) -> Vec<Frame> {
        let mut frames = vec![sse(
            &json!({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                    "prompt_filter_results": prompt_filter_results(self.prompts)}),
            false,
        )];
        for (i, c) in self.choices.iter().enumerate() {
            if let Some(role) = self.shape.role(i, c.has_text) {
                frames.push(sse(&self.chunk(vec![role]), false));
            }
        }
        let finish_reasons: Vec<&str> = self.choices.iter().map(|c| c.finish_reason).collect();
        // AOAI interleaves `n > 1` choices: one piece of each choice in index order, per step.
        let mut pieces: Vec<_> = std::mem::take(&mut self.choices)
            .into_iter()
            .map(|c| c.pieces.into_iter())
            .collect();
        loop {
            let mut sent = false;
            for (i, rest) in pieces.iter_mut().enumerate() {
                if let Some(piece) = rest.next() {
                    let choice = self.shape.content(i, piece);
                    frames.push(sse(&self.chunk(vec![choice]), true));
                    sent = true;
                }
            }
            if !sent {
                break;
            }
        }
        for (i, reason) in finish_reasons.into_iter().enumerate() {
            let finish = self.shape.finish(i, reason);
            frames.push(sse(&self.chunk(vec![finish]), false));
        }
        if self.include_usage {
            let mut last = self.chunk(Vec::new());
            last["usage"] = usage_json(figures);
            frames.push(sse(&last, false));
        }
        frames.push(Frame {
            bytes: Bytes::from_static(DONE),
            paced: false,
        });
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(shape: Shape, include_usage: bool) -> StreamPlan {
        let text = |pieces: &[&str]| StreamChoice {
            has_text: true,
            pieces: pieces
                .iter()
                .map(|p| Piece::Text((*p).to_owned()))
                .collect(),
            finish_reason: "stop",
        };
        StreamPlan {
            shape,
            id: "id-1".into(),
            created: 7,
            model: "m".into(),
            system_fingerprint: None,
            prompts: 1,
            include_usage,
            choices: vec![text(&["a", "b", "c"]), text(&["x"])],
        }
    }

    fn parsed(frames: &[Frame]) -> Vec<Value> {
        frames
            .iter()
            .map(|f| std::str::from_utf8(&f.bytes).unwrap())
            .map(|s| {
                s.strip_prefix("data: ")
                    .unwrap()
                    .strip_suffix("\n\n")
                    .unwrap()
            })
            .take_while(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    /// The text each content frame carries, as (choice index, text), whichever the shape.
    fn content_order(frames: &[Value]) -> Vec<(u64, String)> {
        frames
            .iter()
            .filter_map(|f| {
                let c = f["choices"].get(0)?;
                let text = c["delta"]["content"].as_str().or(c["text"].as_str())?;
                (!text.is_empty() && c["finish_reason"].is_null())
                    .then(|| (c["index"].as_u64().unwrap(), text.to_owned()))
            })
            .collect()
    }

    #[test]
    fn both_shapes_interleave_choices_by_index_and_pace_only_content() {
        for shape in [Shape::Chat, Shape::Completion] {
            let frames = plan(shape, false).into_frames(&Figures::new(3, 4));
            let order = content_order(&parsed(&frames));
            let expected = [(0, "a"), (1, "x"), (0, "b"), (0, "c")]
                .map(|(i, t)| (i, t.to_owned()))
                .to_vec();
            assert_eq!(order, expected, "{shape:?}");
            assert_eq!(frames.iter().filter(|f| f.paced).count(), 4, "{shape:?}");
            let finishes: Vec<u64> = parsed(&frames)
                .iter()
                .filter(|f| f["choices"][0]["finish_reason"] == "stop")
                .map(|f| f["choices"][0]["index"].as_u64().unwrap())
                .collect();
            assert_eq!(finishes, [0, 1], "{shape:?}");
        }
    }

    #[test]
    fn both_shapes_end_with_usage_only_when_asked_then_done() {
        for shape in [Shape::Chat, Shape::Completion] {
            let with = plan(shape, true).into_frames(&Figures::new(3, 4));
            assert_eq!(with.last().unwrap().bytes.as_ref(), DONE, "{shape:?}");
            let f = parsed(&with);
            let usage = f.last().unwrap();
            assert_eq!(usage["choices"], json!([]), "{shape:?}");
            assert_eq!(usage["usage"], usage_json(&Figures::new(3, 4)), "{shape:?}");
            // The opening annotation frame is not a chunk; every chunk before the usage frame
            // carries `"usage": null`.
            assert!(
                f[1..f.len() - 1]
                    .iter()
                    .all(|c| c["usage"].is_null() && c.as_object().unwrap().contains_key("usage")),
                "{shape:?}"
            );

            let without = plan(shape, false).into_frames(&Figures::new(3, 4));
            assert_eq!(without.last().unwrap().bytes.as_ref(), DONE, "{shape:?}");
            let f = parsed(&without);
            assert!(f.iter().all(|c| c.get("usage").is_none()), "{shape:?}");
            assert_eq!(f.last().unwrap()["choices"][0]["finish_reason"], "stop");
            assert_eq!(with.len(), without.len() + 1, "{shape:?}");
        }
    }

    #[test]
    fn only_chat_opens_with_role_frames() {
        let chat = parsed(&plan(Shape::Chat, false).into_frames(&Figures::default()));
        assert_eq!(chat[1]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chat[2]["choices"][0]["index"], 1);
        assert_eq!(chat[2]["choices"][0]["delta"]["role"], "assistant");
        let completion = parsed(&plan(Shape::Completion, false).into_frames(&Figures::default()));
        assert_eq!(completion[1]["choices"][0]["text"], "a");
        assert!(completion[1]["choices"][0].get("delta").is_none());
    }
}
