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
        checked >= 11,
        "every published figure is checked ({checked})"
    );
    assert!(wrong.is_empty(), "{wrong:#?}");
}
