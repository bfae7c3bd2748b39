//! `embeddings`: one unit-length vector per input, as floats or base64, with the prompt's usage.

use serde_json::{Value, json};

use super::{Answer, Reply};
use crate::config::SimDeployment;
use crate::error::AoaiError;
use crate::generate;

pub(crate) fn answer(d: &SimDeployment, body: &Value, seed: u64) -> Result<Answer, AoaiError> {
    use base64::Engine as _;
    let input = body.get("input").ok_or_else(|| {
        AoaiError::invalid_request("'input' is a required property", Some("input"))
    })?;
    let inputs = tollgate_tokens::split_inputs(input);
    if inputs.is_empty() || inputs.iter().any(|i| i.as_str() == Some("")) {
        return Err(AoaiError::invalid_request(
            "'input' must not be empty.",
            Some("input"),
        ));
    }
    let dims = match body.get("dimensions").and_then(Value::as_u64) {
        Some(n) if n >= 1 && n as usize <= d.dimensions => n as usize,
        Some(_) => {
            return Err(AoaiError::invalid_request(
                format!("'dimensions' must be between 1 and {}.", d.dimensions),
                Some("dimensions"),
            ));
        }
        None => d.dimensions,
    };
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let prompt_tokens = tollgate_tokens::count_embeddings_input(&d.model, input);
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, item)| {
            // Mixing in the input gives each input of one request its own vector.
            let mut rng =
                generate::rng(seed ^ generate::stable_hash(&[item.to_string().as_bytes()]));
            let v = generate::embedding(&mut rng, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let value = json!({"object": "list", "data": data, "model": d.model,
                       "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}});
    Ok(Answer {
        reply: Reply::Json(value),
        figures: super::frames::Figures::new(prompt_tokens, 0),
    })
}
