//! Completion counting against completion_tokens the API reported for answers that are tool
//! calls (`fixtures/published_completion_tokens.json`, each case with its source).

use serde_json::Value;
use tollgate_tokens::CompletionParts;

#[test]
fn tool_call_answers_count_what_the_api_reported() {
    let fixture: Value =
        serde_json::from_str(include_str!("../fixtures/published_completion_tokens.json"))
            .expect("fixture parses");
    let mut wrong = Vec::new();
    let cases = fixture["cases"].as_array().expect("cases");
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let model = case["model"].as_str().expect("model");
        let calls: Vec<(&str, &str)> = case["calls"]
            .as_array()
            .expect("calls")
            .iter()
            .map(|c| {
                (
                    c[0].as_str().expect("call name"),
                    c[1].as_str().expect("call arguments"),
                )
            })
            .collect();
        let parts = CompletionParts {
            content: case["content"].as_str(),
            refusal: None,
            calls: &calls,
        };
        let counted = tollgate_tokens::count_completion(model, &[parts]);
        let expected = case["completion_tokens"].as_u64().expect("a count");
        if counted != expected {
            wrong.push(format!("{name}: API {expected}, Tollgate {counted}"));
        }
    }
    assert_eq!(cases.len(), 4, "every published answer is checked");
    assert!(wrong.is_empty(), "{wrong:#?}");
}
