//! Deterministic content: text made of real tokens of the deployment's encoding, tool-call
//! arguments that fit the declared JSON schema, and unit-length embedding vectors. The same
//! request to the same deployment always yields the same content.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use tollgate_tokens::Encoding;

const WORDS: &[&str] = &[
    "the",
    "gateway",
    "records",
    "every",
    "request",
    "and",
    "response",
    "so",
    "that",
    "platform",
    "teams",
    "can",
    "see",
    "usage",
    "by",
    "consumer",
    "model",
    "deployment",
    "day",
    "with",
    "cost",
    "latency",
    "tokens",
    "stream",
    "chunk",
    "azure",
    "cloud",
    "service",
    "system",
    "data",
    "query",
    "report",
    "limit",
    "quota",
    "minute",
    "second",
    "first",
    "last",
    "value",
    "answer",
    "question",
    "simple",
    "clear",
    "fast",
    "small",
    "large",
    "good",
    "new",
    "old",
    "time",
    "place",
    "world",
    "people",
    "water",
    "light",
    "river",
    "mountain",
    "city",
    "garden",
    "window",
    "table",
    "paper",
    "music",
    "story",
    "morning",
    "evening",
    "summer",
    "winter",
    "green",
    "blue",
    "red",
    "quiet",
    "bright",
    "warm",
    "cold",
    "open",
    "close",
    "build",
    "write",
    "read",
    "learn",
    "find",
    "keep",
    "bring",
    "carry",
    "show",
    "tell",
    "think",
    "know",
    "work",
    "play",
    "move",
    "live",
    "give",
    "take",
    "make",
    "help",
    "start",
    "end",
    "more",
    "less",
    "many",
    "few",
    "some",
    "each",
    "other",
    "also",
    "only",
    "very",
    "often",
    "never",
    "always",
    "here",
    "there",
    "today",
    "tomorrow",
    // Non-ASCII, as real answers have: tokens that are parts of a character, so deltas must
    // be cut where the text is valid UTF-8, and recorded segments may split a character.
    "café",
    "naïve",
    "Zürich",
    "données",
    "日本語",
    "データ",
    "🙂",
    "ñandú",
];

/// A stable 64-bit FNV-1a hash: the seed must not change between runs or builds, which rules
/// out std's randomly keyed hasher.
pub(crate) fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

pub(crate) fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub(crate) fn alnum_id(rng: &mut StdRng, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Generated text and why it stopped.
pub(crate) struct Text {
    pub text: String,
    pub finish_reason: &'static str,
}

/// About `target` tokens of sentence-shaped text, cut to at most `cap` tokens (finish reason
/// `length` when cut, at the last whole character within the cap).
pub(crate) fn text(enc: Encoding, rng: &mut StdRng, target: usize, cap: Option<usize>) -> Text {
    let mut out = String::new();
    let mut sentence_left = 0usize;
    let mut words = 0usize;
    while words < target.max(1) {
        if sentence_left == 0 {
            if !out.is_empty() {
                out.push('.');
            }
            sentence_left = rng.random_range(6..14);
            let w = WORDS[rng.random_range(0..WORDS.len())];
            if !out.is_empty() {
                out.push(' ');
            }
            let mut c = w.chars();
            if let Some(first) = c.next() {
                out.extend(first.to_uppercase());
                out.push_str(c.as_str());
            }
        } else {
            out.push(' ');
            out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        }
        sentence_left -= 1;
        words += 1;
    }
    out.push('.');
    if let Some(cap) = cap {
        let tokens = enc.encode(&out);
        if tokens.len() > cap {
            return Text {
                text: whole_prefix(enc, &tokens, cap),
                finish_reason: "length",
            };
        }
    }
    Text {
        text: out,
        finish_reason: "stop",
    }
}

/// What is left of an answer the completion's content filter stopped: its first half (at a
/// whole character).
pub(crate) fn filtered(enc: Encoding, text: &str) -> Text {
    let tokens = enc.encode(text);
    Text {
        text: whole_prefix(enc, &tokens, tokens.len() / 2),
        finish_reason: "content_filter",
    }
}

/// The text of at most the first `n` tokens, ending at the last whole character: a token may
/// be part of one.
fn whole_prefix(enc: Encoding, tokens: &[u32], n: usize) -> String {
    (0..=n.min(tokens.len()))
        .rev()
        .find_map(|n| enc.decode(&tokens[..n]))
        .unwrap_or_default()
}

/// A call of `function` (a chat or Responses function definition): its call id, its name, and
/// arguments generated from its `parameters` schema.
pub(crate) fn call(rng: &mut StdRng, function: &Value) -> (String, String, String) {
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("function")
        .to_owned();
    let args = arguments(rng, function.get("parameters"));
    (format!("call_{}", alnum_id(rng, 24)), name, args)
}

/// Splits text into deltas of about `per_delta` tokens: a delta is a string, so one that
/// would end inside a character takes the next tokens too (as AOAI holds back a partial
/// character), and the deltas concatenate back to exactly `text`.
pub(crate) fn deltas(enc: Encoding, text: &str, per_delta: usize) -> Vec<String> {
    let tokens = enc.encode(text);
    let mut out = Vec::new();
    let mut start = 0;
    let mut end = 0;
    while end < tokens.len() {
        end = (end + per_delta.max(1)).min(tokens.len());
        if let Some(piece) = enc.decode(&tokens[start..end]) {
            out.push(piece);
            start = end;
        }
    }
    if start < tokens.len() {
        out.push(enc.decode(&tokens[start..]).unwrap_or_default());
    }
    out
}

/// Arguments for a function, generated from its `parameters` schema.
pub(crate) fn arguments(rng: &mut StdRng, parameters: Option<&Value>) -> String {
    let value = match parameters {
        Some(schema) => value_for_schema(rng, schema, 0),
        None => Value::Object(Map::new()),
    };
    value.to_string()
}

fn value_for_schema(rng: &mut StdRng, schema: &Value, depth: usize) -> Value {
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.is_empty()
    {
        return options[rng.random_range(0..options.len())].clone();
    }
    let kind = match schema.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Array(types)) => types.iter().filter_map(Value::as_str).next().unwrap_or(""),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match kind {
        "object" if depth < 4 => {
            let mut map = Map::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, v) in props {
                    map.insert(k.clone(), value_for_schema(rng, v, depth + 1));
                }
            }
            Value::Object(map)
        }
        "array" if depth < 4 => {
            let item = schema
                .get("items")
                .cloned()
                .unwrap_or(json!({"type": "string"}));
            let n = rng.random_range(1..3);
            Value::Array(
                (0..n)
                    .map(|_| value_for_schema(rng, &item, depth + 1))
                    .collect(),
            )
        }
        "integer" => json!(rng.random_range(1..100)),
        "number" => json!(f64::from(rng.random_range(0..10_000)) / 100.0),
        "boolean" => json!(rng.random_bool(0.5)),
        "null" => Value::Null,
        _ => Value::String(WORDS[rng.random_range(0..WORDS.len())].to_owned()),
    }
}

/// A unit-length vector of `dims` values.
pub(crate) fn embedding(rng: &mut StdRng, dims: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..dims).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_deterministic_and_deltas_rebuild_it() {
        let enc = Encoding::O200kBase;
        let a = text(enc, &mut rng(7), 40, None);
        let b = text(enc, &mut rng(7), 40, None);
        assert_eq!(a.text, b.text);
        assert_eq!(a.finish_reason, "stop");
        let d = deltas(enc, &a.text, 1);
        assert_eq!(d.concat(), a.text);
        // One token a delta, except where a character spans tokens.
        assert!(d.len() as u64 <= enc.count(&a.text));
    }

    #[test]
    fn non_ascii_text_is_cut_only_between_characters() {
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            let t = "Zürich 日本語 データ 🙂 ñandú café";
            let tokens = enc.count(t);
            assert!(
                tokens > t.split(' ').count() as u64,
                "some characters span tokens"
            );
            for per in 1..4 {
                let d = deltas(enc, t, per);
                assert_eq!(d.concat(), t, "{per}");
            }
            // Capped texts stop at a whole character within the cap.
            for seed in 0..20 {
                for cap in 1..12 {
                    let c = text(enc, &mut rng(seed), 60, Some(cap));
                    assert!(enc.count(&c.text) <= cap as u64);
                }
            }
        }
    }

    #[test]
    fn cap_cuts_to_length() {
        let enc = Encoding::Cl100kBase;
        let t = text(enc, &mut rng(1), 50, Some(5));
        assert_eq!(t.finish_reason, "length");
        assert!(enc.count(&t.text) <= 5);
    }

    #[test]
    fn arguments_follow_the_schema() {
        let schema = json!({"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]},
            "days": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}
        }});
        let args: Value = serde_json::from_str(&arguments(&mut rng(3), Some(&schema))).unwrap();
        assert!(args["city"].is_string());
        assert!(args["unit"] == "c" || args["unit"] == "f");
        assert!(args["days"].is_i64());
        assert!(args["tags"].is_array());
    }

    #[test]
    fn embeddings_are_unit_length() {
        let v = embedding(&mut rng(9), 64);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
}
