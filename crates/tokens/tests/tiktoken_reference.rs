//! tiktoken-rs against OpenAI's own tokenizer: `fixtures/tiktoken_ids.json` holds the ids Python
//! `tiktoken` gives for hard strings (multilingual, emoji, code, whitespace runs, special-token
//! look-alikes) and the encoding it picks per model name; `fixtures/make_tiktoken_ids.py` wrote
//! it. Nothing here is computed by Tollgate's own code on both sides.

#![expect(
    clippy::expect_used,
    reason = "the fixture helpers fail the test on a malformed fixture"
)]

use serde_json::Value;
use tollgate_tokens::Encoding;

fn fixture() -> Value {
    serde_json::from_str(include_str!("../fixtures/tiktoken_ids.json")).expect("fixture parses")
}

fn encoding(name: &str) -> Encoding {
    match name {
        "o200k_base" => Encoding::O200kBase,
        "cl100k_base" => Encoding::Cl100kBase,
        other => panic!("the fixture names an encoding Tollgate does not have: {other}"),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|i| u32::try_from(i.as_u64().expect("id")).expect("id fits"))
        .collect()
}

#[test]
fn token_ids_match_python_tiktoken_for_every_string() {
    let f = fixture();
    let encodings = f["encodings"].as_object().expect("encodings");
    assert_eq!(encodings.len(), 2, "both encodings are covered");
    let mut mismatches = Vec::new();
    let mut cases = 0;
    for (name, list) in encodings {
        let enc = encoding(name);
        for case in list.as_array().expect("cases") {
            let text = case["text"].as_str().expect("text");
            let expected = ids(&case["ids"]);
            cases += 1;
            if enc.encode(text) != expected {
                mismatches.push(format!("{name}: {text:?}"));
            }
            // The count used for billing is the length of that same encoding.
            assert_eq!(enc.count(text), expected.len() as u64, "{name}: {text:?}");
        }
    }
    assert!(cases >= 60, "the fixture has its strings ({cases})");
    assert!(
        mismatches.is_empty(),
        "differ from tiktoken: {mismatches:#?}"
    );
}

#[test]
fn model_names_map_to_the_encoding_tiktoken_picks() {
    let f = fixture();
    let models = f["models"].as_object().expect("models");
    assert!(models.len() >= 15);
    for (model, name) in models {
        let expected = encoding(name.as_str().expect("encoding name"));
        assert_eq!(Encoding::for_model(model), expected, "{model}");
    }
}
