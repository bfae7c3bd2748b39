//! Function and tool definitions as the model reads them: a TypeScript-like namespace the
//! service renders from the JSON schemas, whose tokens are what the definitions cost. Nested
//! objects, arrays and enums are rendered in place, so a nested schema costs what its text
//! costs (the cookbook's flat rule counts only the top level).
//!
//! The rendering is the one measured against the API for gpt-3.5-turbo-0613 functions
//! (`fixtures/published_prompt_tokens.json`, the hmarr/openai-chat-tokens examples).

use serde_json::Value;

/// The namespace text of `functions` (each a `{name, description, parameters}` object).
pub(crate) fn render(functions: &[&Value]) -> String {
    let mut out = String::from("namespace functions {\n\n");
    for f in functions {
        let name = f.get("name").and_then(Value::as_str).unwrap_or("");
        if let Some(d) = f
            .get("description")
            .and_then(Value::as_str)
            .filter(|d| !d.is_empty())
        {
            out.push_str("// ");
            out.push_str(d);
            out.push('\n');
        }
        let params = f.get("parameters").unwrap_or(&Value::Null);
        if has_properties(params) {
            out.push_str("type ");
            out.push_str(name);
            out.push_str(" = (_: {\n");
            out.push_str(&properties(params, 0));
            out.push_str("\n}) => any;\n\n");
        } else {
            out.push_str("type ");
            out.push_str(name);
            out.push_str(" = () => any;\n\n");
        }
    }
    out.push_str("} // namespace functions");
    out
}

fn has_properties(schema: &Value) -> bool {
    schema
        .get("properties")
        .and_then(Value::as_object)
        .is_some_and(|p| !p.is_empty())
}

/// One line per property (`name?: type,`), a description comment above it at the first two
/// levels; each entry indented by `indent` at its start, nested objects indenting their own.
fn properties(schema: &Value, indent: usize) -> String {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut entries = Vec::new();
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            if indent < 2
                && let Some(d) = prop.get("description").and_then(Value::as_str)
            {
                entries.push(format!("// {d}"));
            }
            let optional = if required.contains(&name.as_str()) {
                ""
            } else {
                "?"
            };
            entries.push(format!("{name}{optional}: {},", type_of(prop, indent)));
        }
    }
    let pad = " ".repeat(indent);
    entries
        .iter()
        .map(|e| format!("{pad}{e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn type_of(schema: &Value, indent: usize) -> String {
    let enumerated = |quote: bool| {
        schema.get("enum").and_then(Value::as_array).map(|values| {
            values
                .iter()
                .map(|v| match (v, quote) {
                    (Value::String(s), true) => format!("\"{s}\""),
                    (Value::String(s), false) => s.clone(),
                    (other, _) => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" | ")
        })
    };
    match schema.get("type").and_then(Value::as_str) {
        Some("string") => enumerated(true).unwrap_or_else(|| "string".to_owned()),
        Some("number" | "integer") => enumerated(false).unwrap_or_else(|| "number".to_owned()),
        Some("boolean") => "boolean".to_owned(),
        Some("null") => "null".to_owned(),
        Some("object") => format!("{{\n{}\n}}", properties(schema, indent + 2)),
        Some("array") => match schema.get("items") {
            Some(items) => format!("{}[]", type_of(items, indent)),
            None => "any[]".to_owned(),
        },
        _ => "any".to_owned(),
    }
}
