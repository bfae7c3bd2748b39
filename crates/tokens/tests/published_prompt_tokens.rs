//! The chat counting rule against prompt_tokens the OpenAI API reported for bodies OpenAI
//! published (`fixtures/published_prompt_tokens.json`, each case with its source).

use serde_json::Value;

#[test]
fn chat_prompts_count_what_the_api_reported() {
    let fixture: Value =
        serde_json::from_str(include_str!("../fixtures/published_prompt_tokens.json"))
            .expect("fixture parses");
    let mut checked = 0;
    let mut wrong = Vec::new();
    for case in fixture["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        for (model, expected) in case["prompt_tokens"].as_object().expect("prompt_tokens") {
            let expected = expected.as_u64().expect("a count");
            let counted = tollgate_tokens::count_chat_prompt(model, &case["body"]);
            checked += 1;
            if counted != expected {
                wrong.push(format!(
                    "{name} on {model}: API {expected}, Tollgate {counted}"
                ));
            }
        }
    }
    assert!(
        checked >= 40,
        "every published figure is checked ({checked})"
    );
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The published figures Tollgate does not match yet, each with Tollgate's count pinned: a
/// change either way (a fix, or a new gap) fails here until the fixture says so.
#[test]
fn known_gaps_are_exactly_as_recorded() {
    let fixture: Value =
        serde_json::from_str(include_str!("../fixtures/published_prompt_tokens.json"))
            .expect("fixture parses");
    let mut gaps = 0;
    for case in fixture["cases"].as_array().expect("cases") {
        let Some(known) = case.get("known_gaps").and_then(Value::as_object) else {
            continue;
        };
        for (model, gap) in known {
            let counted = tollgate_tokens::count_chat_prompt(model, &case["body"]);
            let recorded = gap["tollgate"].as_u64().expect("tollgate's count");
            let published = gap["published"].as_u64().expect("the published count");
            assert_ne!(
                recorded, published,
                "{model}: not a gap; move it to prompt_tokens"
            );
            assert_eq!(counted, recorded, "{model} in {}", case["name"]);
            gaps += 1;
        }
    }
    assert_eq!(gaps, 8);
}
