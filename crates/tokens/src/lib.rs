//! Token counting and pricing: model → tokenizer, the chat prompt counting rule (message framing,
//! tool definitions, images), the completion counting rule, and the price table.
//!
//! The simulator and the log parser both count with these functions, so a simulated `usage` and
//! a Tollgate estimate of the same exchange agree exactly; against real AOAI the prompt figure is
//! an estimate (AOAI's framing of tools and reasoning models is not public), which is why records
//! say whether their usage was reported or estimated.
//!
//! Must not: do I/O (the price table is parsed from a string the caller read), or depend on
//! other workspace crates.

mod functions;
mod image;
mod price;

pub use image::{ImageCount, image_tokens, images_of_unknown_size};

pub use price::{
    DEFAULT_PRICE_TABLE, Price, PriceTable, PriceTableError, TokenCost, Tokens, multiplier_per_10k,
};

use serde_json::Value;
use tiktoken_rs::CoreBPE;
use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};

/// The byte-pair encodings AOAI's current models use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    O200kBase,
    Cl100kBase,
}

impl Encoding {
    /// The encoding of a model name as AOAI reports it (`gpt-4o-2024-08-06`, `gpt-35-turbo`, …).
    /// Unknown names — including deployment names — fall back to o200k_base, the encoding of
    /// every current model family.
    pub fn for_model(model: &str) -> Self {
        match get_tokenizer(model) {
            Some(Tokenizer::Cl100kBase) => Encoding::Cl100kBase,
            _ => Encoding::O200kBase,
        }
    }

    fn bpe(self) -> &'static CoreBPE {
        match self {
            Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        }
    }

    /// Loads both tokenizers so the first request does not pay for it (about 0.3 s).
    pub fn warm_up() {
        let _ = Encoding::O200kBase.bpe();
        let _ = Encoding::Cl100kBase.bpe();
    }

    pub fn count(self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        self.bpe().encode_ordinary(text).len() as u64
    }

    pub fn encode(self, text: &str) -> Vec<u32> {
        self.bpe().encode_ordinary(text)
    }

    /// Decodes one token id to its text; `None` if the bytes are not UTF-8 on their own.
    pub fn decode(self, tokens: &[u32]) -> Option<String> {
        let bytes = self.bpe().decode_bytes(tokens).ok()?;
        String::from_utf8(bytes).ok()
    }
}

/// Message framing of the chat counting rule (OpenAI cookbook, "How to count tokens with
/// tiktoken"): gpt-3.5-turbo-0301 framed messages differently from every later model.
struct Framing {
    per_message: i64,
    per_name: i64,
    reply_priming: i64,
}

fn framing(model: &str) -> Framing {
    let legacy_0301 = model.contains("0301");
    Framing {
        per_message: if legacy_0301 { 4 } else { 3 },
        per_name: if legacy_0301 { -1 } else { 1 },
        reply_priming: 3,
    }
}

/// Whether a model reasons before it answers (o1, o3, o4-mini, gpt-5 but not gpt-5-chat): its
/// reasoning tokens are billed as output but never sent, so a count of what was sent is only a
/// lower bound of its output.
pub fn is_reasoning_model(model: &str) -> bool {
    let o_series = model
        .strip_prefix('o')
        .is_some_and(|rest| rest.chars().next().is_some_and(|c| c.is_ascii_digit()));
    o_series || (model.starts_with("gpt-5") && !model.starts_with("gpt-5-chat"))
}

/// Prompt tokens of a chat completions request body (`messages`, `tools` or legacy `functions`).
pub fn count_chat_prompt(model: &str, body: &Value) -> u64 {
    let enc = Encoding::for_model(model);
    let f = framing(model);
    let mut total: i64 = 0;
    // Tool and function definitions are rendered into the system prompt: the first system
    // message gains a newline before them (measured: hmarr/openai-chat-tokens examples).
    let definitions = definitions(body);
    let mut system_padded = definitions.is_empty();
    let mut has_system = false;
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for message in messages {
            total += f.per_message;
            let Some(fields) = message.as_object() else {
                continue;
            };
            let role = fields.get("role").and_then(Value::as_str);
            has_system |= role == Some("system");
            match role {
                // A function result's framing is two tokens shorter than a message's.
                Some("function") => total -= 2,
                // A tool result's is a token longer; its call id is not shown to the model,
                // and a `name` on it costs the name's framing but not its text (published:
                // a call and its result, gpt-3.5-turbo 40 without a name and gpt-4 35 with
                // one, fixtures/published_prompt_tokens.json; with two figures, "a null
                // `content` costs one token" would fit as well as the name's framing).
                Some("tool") => total += 1,
                _ => {}
            }
            if !system_padded
                && role == Some("system")
                && let Some(Value::String(content)) = fields.get("content")
            {
                system_padded = true;
                total += enc.count(&format!("{content}\n")) as i64 - enc.count(content) as i64;
            }
            for (key, value) in fields {
                match (key.as_str(), value) {
                    ("content", Value::Array(parts)) => {
                        total += count_content_parts(model, enc, parts);
                    }
                    ("tool_calls", Value::Array(calls)) => {
                        for call in calls {
                            let function = call.get("function").unwrap_or(&Value::Null);
                            total += count_call(enc, function);
                        }
                    }
                    ("function_call", function) => total += count_call(enc, function),
                    ("tool_call_id", _) => {}
                    ("name", _) if role == Some("tool") => total += f.per_name,
                    (_, Value::String(s)) => {
                        total += enc.count(s) as i64;
                        if key == "name" {
                            total += f.per_name;
                        }
                    }
                    _ => {}
                }
            }
        }
        total += f.reply_priming;
    }
    if !definitions.is_empty() {
        total += count_definitions(enc, &definitions, body, has_system);
    }
    total += count_response_format(enc, body);
    total.max(0) as u64
}

/// A `response_format` JSON schema as the model reads it. No paired measurement is published;
/// the rule is the one measured on the Responses API and published in openai/openai-cookbook
/// issue #2140: the schema as compact JSON without `required`, `additionalProperties` and
/// `$schema` at any depth (the grammar enforces those; the model is not shown them), plus nine
/// tokens of framing (the `# Response Formats` section). `json_object` adds nothing measured.
/// Keys are counted in sorted order, which can move a token boundary against the client's
/// order.
fn count_response_format(enc: Encoding, body: &Value) -> i64 {
    let Some(schema) = body.pointer("/response_format/json_schema/schema") else {
        return 0;
    };
    fn strip(v: &Value) -> Value {
        match v {
            Value::Object(map) => Value::Object(
                map.iter()
                    .filter(|(k, _)| {
                        !matches!(k.as_str(), "required" | "additionalProperties" | "$schema")
                    })
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(strip).collect()),
            other => other.clone(),
        }
    }
    let text = serde_json::to_string(&strip(schema)).unwrap_or_default();
    enc.count(&text) as i64 + 9
}

/// The function definitions of `tools` (type `function`), else of the legacy `functions`.
fn definitions(body: &Value) -> Vec<&Value> {
    match (body.get("tools"), body.get("functions")) {
        (Some(Value::Array(tools)), _) => tools.iter().filter_map(|t| t.get("function")).collect(),
        (_, Some(Value::Array(functions))) => functions.iter().collect(),
        _ => Vec::new(),
    }
}

/// Definitions as the model reads them (`functions.rs`): the rendered text's tokens and their
/// framing, less the four tokens of framing they share with a system message, plus a forced
/// `function_call`. The same rule gives the cookbook's published tool totals (its flat rule's
/// figures) and the measured figures for nested schemas, where the flat rule ran 18–30 low.
fn count_definitions(enc: Encoding, functions: &[&Value], body: &Value, has_system: bool) -> i64 {
    let mut total = enc.count(&functions::render(functions)) as i64 + 9;
    if has_system {
        total -= 4;
    }
    match body.get("function_call") {
        Some(Value::String(s)) if s == "none" => total += 1,
        Some(Value::Object(call)) => {
            let name = call.get("name").and_then(Value::as_str).unwrap_or("");
            total += enc.count(name) as i64 + 4;
        }
        _ => {}
    }
    total
}

fn count_content_parts(model: &str, enc: Encoding, parts: &[Value]) -> i64 {
    parts
        .iter()
        .map(|part| match part.get("type").and_then(Value::as_str) {
            Some("text") => {
                enc.count(part.get("text").and_then(Value::as_str).unwrap_or("")) as i64
            }
            Some("image_url") => {
                let detail = part.pointer("/image_url/detail").and_then(Value::as_str);
                let url = part
                    .pointer("/image_url/url")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                image_tokens(model, url, detail).tokens as i64
            }
            _ => 0,
        })
        .sum()
}

/// A call in the history (a legacy `function_call` or one of `tool_calls`): its name and
/// arguments, and three tokens of framing (measured for function calls; a tool call framed
/// the same gives the published figure for one call and its result).
fn count_call(enc: Encoding, function: &Value) -> i64 {
    let name = function.get("name").and_then(Value::as_str).unwrap_or("");
    let args = function
        .get("arguments")
        .and_then(Value::as_str)
        .unwrap_or("");
    (enc.count(name) + enc.count(args)) as i64 + 3
}

/// What one choice of a completion produced, as counted by [`count_completion`].
#[derive(Debug, Default, Clone, Copy)]
pub struct CompletionParts<'a> {
    pub content: Option<&'a str>,
    pub refusal: Option<&'a str>,
    /// `(name, arguments)` of each tool call or the legacy function call.
    pub calls: &'a [(&'a str, &'a str)],
}

/// Completion tokens: the tokens of each choice's text and refusal, and of its calls as the
/// model wrote them (`count_calls`).
pub fn count_completion(model: &str, choices: &[CompletionParts<'_>]) -> u64 {
    let enc = Encoding::for_model(model);
    choices
        .iter()
        .map(|c| {
            c.content.map_or(0, |t| enc.count(t))
                + c.refusal.map_or(0, |t| enc.count(t))
                + count_calls(enc, c.calls)
        })
        .sum()
}

/// The calls of one answer as the model wrote them (`fixtures/published_completion_tokens.json`):
/// - one call is its name and arguments and seven tokens of framing (the recipient and the
///   end of the message: exact on the three published single calls, gpt-35-turbo, gpt-4o and
///   gpt-4.1-mini);
/// - several calls are one call of `multi_tool_use.parallel` whose argument is
///   `{"tool_uses":[{"recipient_name":"functions.NAME","parameters":ARGS},...]}` in compact
///   JSON, plus its recipient and four tokens of framing. Fitted to the one published parallel
///   answer (two calls, gpt-35-turbo): the API hands the arguments back re-spaced, so they are
///   counted compact, as the model wrote them.
fn count_calls(enc: Encoding, calls: &[(&str, &str)]) -> u64 {
    match calls {
        [] => 0,
        [(name, args)] => enc.count(name) + enc.count(args) + 7,
        several => {
            let uses: Vec<String> = several
                .iter()
                .map(|(name, args)| {
                    let name =
                        serde_json::to_string(&format!("functions.{name}")).unwrap_or_default();
                    format!(
                        "{{\"recipient_name\":{name},\"parameters\":{}}}",
                        compact_json(args)
                    )
                })
                .collect();
            let wrapper = format!("{{\"tool_uses\":[{}]}}", uses.join(","));
            enc.count(" to=multi_tool_use.parallel") + enc.count(&wrapper) + 4
        }
    }
}

/// `text` without the whitespace between JSON tokens (strings kept as they are, keys in their
/// order); text that is not JSON unchanged.
fn compact_json(text: &str) -> String {
    if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for ch in text.chars() {
        if in_string {
            out.push(ch);
            match (escaped, ch) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if !ch.is_whitespace() {
            in_string = ch == '"';
            out.push(ch);
        }
    }
    out
}

/// Prompt tokens of a legacy completions `prompt` (a string, strings, or token arrays).
pub fn count_completions_prompt(model: &str, prompt: &Value) -> u64 {
    count_inputs(Encoding::for_model(model), prompt)
}

/// Input tokens of an embeddings `input` (a string, strings, or token arrays).
pub fn count_embeddings_input(model: &str, input: &Value) -> u64 {
    count_inputs(Encoding::for_model(model), input)
}

fn count_inputs(enc: Encoding, input: &Value) -> u64 {
    match input {
        Value::String(s) => enc.count(s),
        Value::Array(items) if items.iter().all(Value::is_number) => items.len() as u64,
        Value::Array(items) => items.iter().map(|i| count_inputs(enc, i)).sum(),
        _ => 0,
    }
}

/// Each input of an embeddings or completions request as a list, for per-input processing.
pub fn split_inputs(input: &Value) -> Vec<Value> {
    match input {
        Value::Array(items) if !items.is_empty() && !items.iter().all(Value::is_number) => {
            items.clone()
        }
        Value::Null => Vec::new(),
        other => vec![other.clone()],
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn encodings_by_model() {
        assert_eq!(
            Encoding::for_model("gpt-4o-2024-08-06"),
            Encoding::O200kBase
        );
        assert_eq!(Encoding::for_model("gpt-35-turbo"), Encoding::Cl100kBase);
        assert_eq!(
            Encoding::for_model("text-embedding-3-small"),
            Encoding::Cl100kBase
        );
        assert_eq!(Encoding::for_model("my-deployment"), Encoding::O200kBase);
    }

    #[test]
    fn chat_prompt_matches_cookbook_framing() {
        // Cookbook example: for gpt-4o, system + user "Hi" style messages cost 3 per message,
        // their field values, and 3 for priming.
        let body = json!({"messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello", "name": "bob"}
        ]});
        let enc = Encoding::O200kBase;
        let expected = 3
            + enc.count("system")
            + enc.count("You are a helpful assistant.")
            + 3
            + enc.count("user")
            + enc.count("Hello")
            + enc.count("bob")
            + 1
            + 3;
        assert_eq!(count_chat_prompt("gpt-4o", &body), expected);
    }

    #[test]
    fn reasoning_models() {
        for m in [
            "o1",
            "o3-mini-2025-01-31",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini-2025-08-07",
        ] {
            assert!(is_reasoning_model(m), "{m}");
        }
        for m in ["gpt-4o", "gpt-5-chat-latest", "omni", "gpt-35-turbo", ""] {
            assert!(!is_reasoning_model(m), "{m}");
        }
    }

    #[test]
    fn tools_add_their_rendered_definitions() {
        let without = json!({"messages": [{"role": "user", "content": "weather?"}]});
        let with = json!({
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"type": "function", "function": {
                "name": "get_weather", "description": "Get the weather.",
                "parameters": {"type": "object", "required": ["city"], "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "where": {"type": "object", "properties": {
                        "lat": {"type": "number"}, "unit": {"type": "string", "enum": ["c", "f"]}
                    }}
                }}
            }}]
        });
        let functions = definitions(&with);
        // Nested objects are rendered in place, not dropped as the flat rule did.
        assert_eq!(
            functions::render(&functions),
            "namespace functions {\n\n// Get the weather.\ntype get_weather = (_: {\n// City name\ncity: string,\nwhere?: {\n  lat?: number,\n  unit?: \"c\" | \"f\",\n},\n}) => any;\n\n} // namespace functions"
        );
        let enc = Encoding::O200kBase;
        assert_eq!(
            count_chat_prompt("gpt-4o", &with) - count_chat_prompt("gpt-4o", &without),
            enc.count(&functions::render(&functions)) + 9
        );
    }

    #[test]
    fn images_are_counted_by_detail() {
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:...", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
        ]}]});
        let enc = Encoding::O200kBase;
        let expected = 3 + enc.count("user") + enc.count("what is this") + 85 + 765 + 3;
        assert_eq!(count_chat_prompt("gpt-4o", &body), expected);
    }

    #[test]
    fn a_json_schema_counts_without_what_the_grammar_enforces() {
        let body = serde_json::json!({
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "strict": true,
                "schema": {"$schema": "x", "type": "object", "additionalProperties": false,
                    "required": ["city"],
                    "properties": {"city": {"type": "string", "required": ["not-a-keyword-here"]}}}}}
        });
        let without = serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
        let enc = Encoding::O200kBase;
        // Written out by hand: compact, sorted keys, the three keywords gone at every depth.
        let shown = r#"{"properties":{"city":{"type":"string"}},"type":"object"}"#;
        assert_eq!(
            count_chat_prompt("gpt-4o", &body) - count_chat_prompt("gpt-4o", &without),
            enc.count(shown) + 9
        );
        let json_object = serde_json::json!({"messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"}});
        assert_eq!(
            count_chat_prompt("gpt-4o", &json_object),
            count_chat_prompt("gpt-4o", &without)
        );
    }

    #[test]
    fn completion_counts_text_and_calls() {
        let calls = [("get_weather", r#"{"city":"Paris"}"#)];
        let parts = [
            CompletionParts {
                content: Some("Hello there"),
                ..Default::default()
            },
            CompletionParts {
                calls: &calls,
                ..Default::default()
            },
        ];
        let enc = Encoding::O200kBase;
        // Choices add up; a lone call has its seven tokens of framing (the published figures
        // are in tests/published_completion_tokens.rs).
        let expected = enc.count("Hello there")
            + enc.count("get_weather")
            + enc.count(r#"{"city":"Paris"}"#)
            + 7;
        assert_eq!(count_completion("gpt-4o", &parts), expected);
    }

    #[test]
    fn embeddings_inputs() {
        let enc = Encoding::Cl100kBase;
        let m = "text-embedding-3-small";
        assert_eq!(
            count_embeddings_input(m, &json!("hello world")),
            enc.count("hello world")
        );
        assert_eq!(
            count_embeddings_input(m, &json!(["a b", "c"])),
            enc.count("a b") + enc.count("c")
        );
        assert_eq!(count_embeddings_input(m, &json!([1, 2, 3])), 3);
        assert_eq!(count_embeddings_input(m, &json!([[1, 2], [3]])), 3);
        assert_eq!(split_inputs(&json!([1, 2])).len(), 1);
        assert_eq!(split_inputs(&json!(["a", "b"])).len(), 2);
    }
}
