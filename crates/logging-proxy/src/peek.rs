//! The two facts the proxy reads from a request body without building it: whether it asks for
//! a stream, and which model (on `/openai/v1/` and the Responses API: which deployment) it
//! names. JSON bodies are peeked whatever their declared content type, so a JSON body sent as
//! `text/plain` is routed and recorded by what AOAI will read from it; multipart bodies (audio
//! transcription, image edits) name their model in a form field.

/// What a body says about itself.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Peeked {
    pub stream: bool,
    pub model: Option<String>,
    /// `store` as sent (chat completions store when true; the Responses API unless false).
    pub store: Option<bool>,
    /// The Responses API continues a stored response.
    pub continues: bool,
}

#[derive(serde::Deserialize)]
struct JsonPeek<'a> {
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default, borrow)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    store: Option<bool>,
    #[serde(default, borrow)]
    previous_response_id: Option<std::borrow::Cow<'a, str>>,
}

/// Longest model name taken from a multipart field; AOAI deployment names are far shorter.
const MAX_MODEL_BYTES: usize = 256;

pub(crate) fn peek(content_type: Option<&str>, bytes: &[u8], max_json_depth: usize) -> Peeked {
    let multipart = content_type.is_some_and(|c| {
        c.trim_start()
            .to_ascii_lowercase()
            .starts_with("multipart/form-data")
    });
    if multipart {
        return Peeked {
            model: content_type.and_then(|c| multipart_field(c, bytes, "model")),
            ..Peeked::default()
        };
    }
    // Deeper than the bound, serde's own recursion limit could refuse it midway; such a body
    // names nothing we act on.
    if tollgate_records::json_depth_exceeds(bytes, max_json_depth) {
        return Peeked::default();
    }
    match serde_json::from_slice::<JsonPeek<'_>>(bytes) {
        Ok(p) => Peeked {
            stream: p.stream.unwrap_or(false),
            model: p.model.map(|m| m.into_owned()),
            store: p.store,
            continues: p.previous_response_id.is_some(),
        },
        Err(_) => Peeked::default(),
    }
}

/// The value of the form field `name` in a `multipart/form-data` body.
fn multipart_field(content_type: &str, body: &[u8], name: &str) -> Option<String> {
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))?
        .trim_matches('"');
    if boundary.is_empty() {
        return None;
    }
    let delimiter = format!("--{boundary}");
    let wanted = format!("name=\"{name}\"");
    let finder = memchr::memmem::Finder::new(delimiter.as_bytes());
    let mut rest = body;
    while let Some(at) = finder.find(rest) {
        rest = &rest[at + delimiter.len()..];
        let headers_end = memchr::memmem::find(rest, b"\r\n\r\n")?;
        let headers = &rest[..headers_end];
        let value = &rest[headers_end + 4..];
        let value_end = finder
            .find(value)
            .map_or(value.len(), |e| e.saturating_sub(2));
        let is_wanted = std::str::from_utf8(headers).is_ok_and(|h| {
            h.lines().any(|line| {
                line.to_ascii_lowercase()
                    .starts_with("content-disposition:")
                    && line.contains(&wanted)
            })
        });
        if is_wanted {
            let value = &value[..value_end];
            if value.len() > MAX_MODEL_BYTES {
                return None;
            }
            return std::str::from_utf8(value).ok().map(|v| v.trim().to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_peeked_whatever_its_content_type() {
        let body = br#"{"model": "gpt-4o", "stream": true, "messages": []}"#;
        for ct in [Some("application/json"), Some("text/plain"), None] {
            let p = peek(ct, body, 64);
            assert_eq!(p.model.as_deref(), Some("gpt-4o"), "{ct:?}");
            assert!(p.stream);
        }
        assert_eq!(peek(None, b"not json", 64), Peeked::default());
        let deep = format!(
            "{{\"model\":\"x\",\"a\":{}1{}}}",
            "[".repeat(100),
            "]".repeat(100)
        );
        assert_eq!(peek(None, deep.as_bytes(), 64), Peeked::default());
    }

    #[test]
    fn multipart_names_its_model_in_a_field() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF....model\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ--\r\n";
        let p = peek(Some("multipart/form-data; boundary=XyZ"), body, 64);
        assert_eq!(p.model.as_deref(), Some("whisper-1"));
        let p = peek(Some("multipart/form-data; boundary=\"XyZ\""), body, 64);
        assert_eq!(p.model.as_deref(), Some("whisper-1"));
        let none =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n--XyZ--\r\n";
        assert_eq!(
            peek(Some("multipart/form-data; boundary=XyZ"), none, 64).model,
            None
        );
    }
}
